"""StreamingT2V's conditional attention module (CAM) and appearance preservation module (APM)
attached to a frozen `unet3d` base.

See docs/methods.md, 'StreamingT2V: conditional attention module' and 'StreamingT2V:
appearance preservation module'.

Henschel et al., "StreamingT2V: Consistent, Dynamic, and Extendable Long Video Generation
from Text" (2024).
- CAM (short-term memory): a frame encoder and a trainable copy of the base U-Net's encoder
  (input conv and encoder blocks) run on the last F_cond latent frames of the
  previous chunk. Each long-skip feature of the base is updated by temporal cross-attention
  (queries: the skip features of the T frames at one location; keys/values: the CAM features
  of the F_cond frames there) through a zero-initialised output projection.
- APM (long-term memory): the CLIP image embedding of the anchor frame is expanded by a
  linear layer to k tokens, concatenated with the text tokens and projected: x_mixed. Every
  cross-attention layer l of the base returns `(1 - α_l)·attn(x_text) + α_l·attn(x_mixed)`,
  α_l learned and initialised at 0. (The paper mixes keys/values, `x_text + SiLU(α_l)·x_mixed`
  on zero-padded text; mixing the outputs keeps the model exactly the base model at α = 0,
  which padding the text with zero tokens would not.)
At initialisation the output is exactly the base U-Net's; `trainable_parameters()` are the
CAM and APM parameters, the base is frozen.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from model_zoo import unet3d
from model_zoo.layers import CrossAttention, Downsample, frames_to_tokens, tokens_to_frames, video_to_frames
from model_zoo.pretrained import PretrainedMixin
from model_zoo.registry import register_family
from model_zoo.unet3d import UNet3D, UNet3DConfig


@dataclass(frozen=True, kw_only=True)
class StreamingT2VConfig:
    base: UNet3DConfig = UNet3DConfig(**unet3d.FLAVORS["1b"])
    """The text-to-video U-Net the modules attach to (frozen); needs `context_dim`."""
    cond_frames: int = 8
    """F_cond: latent frames of the previous chunk that CAM reads."""
    image_embed_dim: int = 1024
    """Width of the anchor frame's CLIP image embedding (OpenCLIP ViT-H: 1024)."""
    anchor_tokens: int = 8
    """k: tokens the anchor embedding is expanded to."""
    cam_heads: int = 8
    """Heads of CAM's temporal cross-attention."""

    @property
    def in_channels(self) -> int:
        return self.base.in_channels

    @property
    def out_channels(self) -> int:
        return self.base.out_channels


FLAVORS: dict[str, dict[str, Any]] = {
    "tiny": dict(base=UNet3DConfig(**unet3d.FLAVORS["tiny"]), cond_frames=2, image_embed_dim=32, cam_heads=2),
    # The paper: ModelScope-size t2v U-Net with OpenCLIP ViT-H text/image embeddings
    # (StreamingT2VConfig's defaults).
    "paper": {},
}


class FrameEncoder(nn.Module):
    """Per-frame convolutions turning conditioning latents into the CAM encoder copy's input."""

    def __init__(self, in_channels: int, out_channels: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(hidden, out_channels, 3, padding=1),
        )

    def forward(self, frames: Tensor) -> Tensor:
        b, _, f, h, w = frames.shape
        out = self.layers(video_to_frames(frames))  # (B*F, C_in, H, W)
        return out.reshape(b, f, -1, h, w).transpose(1, 2)  # (B, C_in, F, H, W)


class SkipCrossAttention(nn.Module):
    """Temporal cross-attention from a skip feature's T frames to CAM's F_cond frames, per location.

    Returns skip + zero-initialised update (exactly `skip` at initialisation).
    """

    def __init__(self, channels: int, heads: int, groups: int) -> None:
        super().__init__()
        self.norm_query = nn.GroupNorm(groups, channels, eps=1e-6)
        self.norm_memory = nn.GroupNorm(groups, channels, eps=1e-6)
        self.attn = CrossAttention(channels, channels, heads, zero_init=True)

    def forward(self, skip: Tensor, memory: Tensor, batch: int) -> Tensor:
        bt, c, h, w = skip.shape
        query = _per_location(self.norm_query(skip), batch)  # (B*H*W, T, C)
        keys = _per_location(self.norm_memory(memory), batch)  # (B*H*W, F, C)
        update = self.attn(query, keys)  # (B*H*W, T, C)
        update = (
            update.view(batch, h * w, bt // batch, c).transpose(1, 2).reshape(bt, h * w, c)
        )  # (B*T, H*W, C)
        return skip + tokens_to_frames(update, h, w)


def _per_location(frames: Tensor, batch: int) -> Tensor:
    """(B*T, C, H, W) -> (B*H*W, T, C): the time series at every spatial location."""
    bt, c, h, w = frames.shape
    tokens = frames_to_tokens(frames).reshape(batch, bt // batch, h * w, c)  # (B, T, H*W, C)
    return tokens.transpose(1, 2).reshape(batch * h * w, bt // batch, c)


class CAM(nn.Module):
    """Frame encoder + encoder copy of the base U-Net + one `SkipCrossAttention` per long skip."""

    def __init__(self, base: UNet3D, config: StreamingT2VConfig) -> None:
        super().__init__()
        base_cfg = config.base
        self.frame_encoder = FrameEncoder(
            base_cfg.out_channels, base_cfg.in_channels, base_cfg.model_channels
        )
        self.encoder = _encoder_copy(base)
        self.inject = nn.ModuleList(
            SkipCrossAttention(ch, config.cam_heads, base_cfg.num_groups) for ch in _skip_channels(base)
        )

    def memory(self, cond_latents: Tensor, emb: Tensor, context: Tensor | None) -> list[Tensor]:
        """CAM features of the conditioning frames (B, C, F, H, W): one per long skip (B*F, C_i, H_i, W_i)."""
        _, skips = self.encoder.encode(self.frame_encoder(cond_latents), emb, context)
        return skips

    def forward(self, skips: list[Tensor], memory: list[Tensor], batch: int) -> list[Tensor]:
        return [inject(skip, mem, batch) for inject, skip, mem in zip(self.inject, skips, memory)]


def _encoder_copy(base: UNet3D) -> UNet3D:
    """A trainable copy of the base's input conv and encoder blocks (weights copied).

    Only `encode` of the copy is used, for its skip features; its middle block, decoder,
    output head and embeddings are dropped.
    """
    encoder = copy.deepcopy(base)
    encoder.middle = nn.ModuleList()
    encoder.decoder = nn.ModuleList()
    encoder.out_norm = nn.Identity()
    encoder.out_conv = nn.Identity()
    encoder.time_embed = nn.Identity()
    encoder.level_embed = None
    return encoder.requires_grad_(True)


def _skip_channels(base: UNet3D) -> list[int]:
    """Channels of the long-skip features `UNet3D.encode` returns, in order."""
    channels = [base.input_conv.out_channels]
    for block in base.encoder:
        conv = block.conv if isinstance(block, Downsample) else block.res.out_conv
        channels.append(conv.out_channels)
    return channels


class APM(nn.Module):
    """Anchor embedding -> k tokens, concatenated with the text tokens and projected (x_mixed)."""

    def __init__(self, config: StreamingT2VConfig) -> None:
        super().__init__()
        context_dim = config.base.context_dim
        self.tokens = config.anchor_tokens
        self.expand = nn.Linear(config.image_embed_dim, config.anchor_tokens * context_dim)
        self.project = nn.Linear(context_dim, context_dim)

    def forward(self, text: Tensor, anchor: Tensor) -> Tensor:
        """text (B, L, D), anchor (B, D_img) -> x_mixed (B, L + k, D)."""
        anchor_tokens = self.expand(anchor).view(anchor.shape[0], self.tokens, -1)  # (B, k, D)
        return self.project(torch.cat([text, anchor_tokens], dim=1))  # (B, L + k, D)


class MixedCrossAttention(CrossAttention):
    """A base `CrossAttention` returning `(1 - α)·attn(x, text) + α·attn(x, mixed)`, α init 0.

    It has the wrapped layer's parameter names (plus `alpha`), so base U-Net state dicts still
    load, and it receives the packed context `[text (L tokens); mixed (L + k tokens)]`.
    """

    def __init__(self, dim: int, context_dim: int, heads: int, *, qkv_bias: bool, anchor_tokens: int) -> None:
        super().__init__(dim, context_dim, heads, qkv_bias=qkv_bias)
        self.anchor_tokens = anchor_tokens
        self.alpha = nn.Parameter(torch.zeros(1))  # shape (1,): DeepSpeed cannot broadcast 0-dim parameters

    @classmethod
    def replacing(cls, layer: CrossAttention, anchor_tokens: int) -> MixedCrossAttention:
        mixed = cls(
            layer.q.in_features,
            layer.kv.in_features,
            layer.heads,
            qkv_bias=layer.q.bias is not None,
            anchor_tokens=anchor_tokens,
        ).to(layer.q.weight.device)
        mixed.load_state_dict(layer.state_dict(), strict=False)
        return mixed

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        text_len = (context.shape[1] - self.anchor_tokens) // 2
        text, mixed = context[:, :text_len], context[:, text_len:]  # (B, L, D), (B, L + k, D)
        with_text = super().forward(x, text)  # (N, L_q, C)
        return with_text + self.alpha * (super().forward(x, mixed) - with_text)


def _mix_cross_attention(model: nn.Module, anchor_tokens: int) -> list[MixedCrossAttention]:
    """Replace every `CrossAttention` of `model` by a `MixedCrossAttention`; return them."""
    replaced = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is CrossAttention:
                mixed = MixedCrossAttention.replacing(child, anchor_tokens)
                setattr(parent, name, mixed)
                replaced.append(mixed)
    return replaced


@register_family("streaming_t2v", StreamingT2VConfig, FLAVORS)
class StreamingT2V(PretrainedMixin, nn.Module):
    """Frozen `unet3d` + CAM + APM: forward(x, t, context, cond_latents, anchor) -> (B, C_out, T, H, W)."""

    def __init__(self, config: StreamingT2VConfig) -> None:
        super().__init__()
        if not config.base.context_dim:
            raise ValueError("StreamingT2V needs a text-conditioned base (base.context_dim)")
        self.config = config
        self.base = UNet3D(config.base)
        self.cam = CAM(self.base, config)
        self.apm = APM(config)
        mixers = _mix_cross_attention(self.base, config.anchor_tokens)
        self.base.requires_grad_(False)
        for mixer in mixers:
            mixer.alpha.requires_grad_(True)

    def load_base_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load a plain `unet3d` state dict into the base and into CAM's encoder copy."""
        missing, unexpected = self.base.load_state_dict(state, strict=False)
        if unexpected or any(not key.endswith(".alpha") for key in missing):
            raise ValueError(
                f"not a state dict of this base U-Net: missing={missing[:5]} unexpected={unexpected[:5]}"
            )
        encoder_keys = self.cam.encoder.state_dict().keys()
        self.cam.encoder.load_state_dict({k: v for k, v in state.items() if k in encoder_keys})

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        *,
        context: Tensor,
        cond_latents: Tensor,
        anchor: Tensor,
        level: Tensor | None = None,
    ) -> Tensor:
        """x (B, C_in, T, H, W) noisy chunk; context (B, L, D) text tokens; cond_latents
        (B, C_out, F_cond, H, W) last latent frames of the previous chunk; anchor (B, D_img)
        CLIP image embedding of the anchor frame -> prediction (B, C_out, T, H, W)."""
        emb = self.base.time_embedding(t, level)  # (B, D_emb)
        packed = torch.cat([context, self.apm(context, anchor)], dim=1)  # (B, 2L + k, D)
        h, skips = self.base.encode(x, emb, packed)
        memory = self.cam.memory(cond_latents, emb, context)
        return self.base.decode(h, self.cam(skips, memory, x.shape[0]), emb, packed)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """CAM and APM parameters (the α_l of every cross-attention included); the base is frozen."""
        return [p for p in self.parameters() if p.requires_grad]

    def example_inputs(self, x: Tensor) -> dict[str, Tensor]:
        b, cfg = x.shape[0], self.config
        inputs = self.base.example_inputs(x)
        h, w = x.shape[-2:]
        inputs["cond_latents"] = torch.randn(b, cfg.base.out_channels, cfg.cond_frames, h, w, device=x.device)
        inputs["anchor"] = torch.randn(b, cfg.image_embed_dim, device=x.device)
        return inputs

    def example_input(self, batch_size: int = 2, num_frames: int = 4, size: int = 16) -> Tensor:
        return self.base.example_input(batch_size, num_frames, size)

    def checkpoint_modules(self) -> list[nn.Module]:
        return self.base.checkpoint_modules() + self.cam.encoder.checkpoint_modules()
