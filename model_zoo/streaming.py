"""StreamingT2V's conditional attention module (CAM) and appearance preservation module (APM)
attached to a frozen `unet3d` base.

See docs/methods.md, 'StreamingT2V: conditional attention module' and 'StreamingT2V:
appearance preservation module'.

Henschel et al., "StreamingT2V: Consistent, Dynamic, and Extendable Long Video Generation
from Text" (2024), §4.1 and §4.2. Notation:
- CAM (short-term memory, ControlNet-like): a trainable copy of the base's input conv, encoder
  blocks and middle block runs on the first F_cond frames of the noisy chunk x_t. The frame
  encoder E_cond encodes the F_cond conditioning latent frames of the previous chunk; a
  zero-initialised 1x1 convolution of its output is added to the output of the copy's first
  temporal transformer block. Every long skip x_SC of the base (and the middle block's output)
  is then updated by
      x' = P_in(GN_spatiotemporal(x_SC))            reshaped to ((b·h·w), F, c)
      x'' = T-MHA(Q = P_Q(x'), K = P_K(x_CAM), V = P_V(x_CAM))     x_CAM: ((b·h·w), F_cond, c)
      x''' = x_SC + R(P_out(x''))                   P_out zero-initialised.
- APM (long-term memory): the anchor frame's CLIP image token is expanded by a linear layer to
  k tokens, concatenated with the text tokens x_text (L = `text_tokens`) along the token axis,
  and projected back to L tokens: x_mixed (B, L, D), the text context's shape. Cross-attention
  layer l attends to x_cross = SiLU(α_l)·x_mixed + x_text (keys and values), α_l learned and
  initialised at 0.
At initialisation (P_out, the fusion conv and every α_l zero) the output is exactly the base
U-Net's for any input; `trainable_parameters()` are the CAM and APM parameters and the α_l.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model_zoo import unet3d
from model_zoo.layers import (
    CrossAttention,
    Downsample,
    frames_to_tokens,
    frames_to_video,
    per_frame,
    tokens_to_frames,
    video_to_frames,
    zero_module,
)
from model_zoo.pretrained import PretrainedMixin
from model_zoo.registry import register_family
from model_zoo.unet3d import UNet3D, UNet3DConfig, UNetBlock


@dataclass(frozen=True, kw_only=True)
class StreamingT2VConfig:
    base: UNet3DConfig = UNet3DConfig(**unet3d.FLAVORS["1b"])
    """The text-to-video U-Net the modules attach to (frozen); needs `context_dim` and temporal attention."""
    cond_frames: int = 8
    """F_cond: latent frames of the previous chunk that CAM reads (the chunk needs at least as many)."""
    image_embed_dim: int = 1024
    """Width of the anchor frame's CLIP image embedding (OpenCLIP ViT-H: 1024)."""
    anchor_tokens: int = 8
    """k: tokens the anchor embedding is expanded to."""
    text_tokens: int = 77
    """L: tokens of the text context; APM projects the L + k mixed tokens back to L."""
    cam_heads: int = 8
    """Heads of CAM's temporal cross-attention (T-MHA)."""

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
    """E_cond: per-frame convolutions from conditioning latents to `channels` feature maps,
    halving H and W `downsamples` times (to the resolution of the copy's first temporal block)."""

    def __init__(self, in_channels: int, channels: int, downsamples: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 3, padding=1), nn.SiLU()]
        for _ in range(downsamples):
            layers += [nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.SiLU()]
        layers.append(nn.Conv2d(channels, channels, 3, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, frames: Tensor) -> Tensor:
        return self.layers(video_to_frames(frames))  # (B*F, C, H / 2^d, W / 2^d)


class EncoderCopy(nn.Module):
    """Trainable copy of the base's input conv, encoder blocks and middle block (weights copied).

    `forward` returns one feature per long skip of the base (input conv, every encoder block)
    and the middle block's output; `fused` is added to the output of block `fuse_at` (the first
    block with a temporal transformer, counted over encoder then middle blocks).
    """

    def __init__(self, base: UNet3D) -> None:
        super().__init__()
        self.input_conv = copy.deepcopy(base.input_conv)
        self.encoder = copy.deepcopy(base.encoder)
        self.middle = copy.deepcopy(base.middle)
        blocks = [*self.encoder, *self.middle]
        temporal = [i for i, b in enumerate(blocks) if isinstance(b, UNetBlock) and b.temporal is not None]
        if not temporal:
            raise ValueError(
                "StreamingT2V: CAM fuses E_cond after the first temporal transformer block, and this base "
                "has none (base.temporal_attention=False or no attention_resolutions)"
            )
        self.fuse_at = temporal[0]
        self.requires_grad_(True)

    def fusion_point(self) -> tuple[int, int]:
        """(channels, downsamplings before it) of the block whose output receives E_cond."""
        blocks = [*self.encoder, *self.middle]
        downsamples = sum(isinstance(b, Downsample) for b in blocks[: self.fuse_at])
        return blocks[self.fuse_at].temporal.norm.num_channels, downsamples

    def forward(
        self, x: Tensor, fused: Tensor, emb: Tensor, context: Tensor | None, context_mask: Tensor | None = None
    ) -> list[Tensor]:
        """x (B, C_in, F, H, W) noisy frames; fused (B*F, C_k, H_k, W_k) -> features (B*F, C_i, H_i, W_i)."""
        num_frames = x.shape[2]
        frame_emb = per_frame(emb, num_frames)  # (B*F, D)
        h = self.input_conv(video_to_frames(x))  # (B*F, C, H, W)
        features = [h]
        for index, block in enumerate([*self.encoder, *self.middle]):
            h = block(h) if isinstance(block, Downsample) else block(h, frame_emb, context, num_frames, context_mask)
            if index == self.fuse_at:
                h = h + fused
            if index < len(self.encoder):
                features.append(h)
        return [*features, h]

    def checkpoint_modules(self) -> list[nn.Module]:
        return [m for m in self.modules() if isinstance(m, UNetBlock)]


class SkipInjection(nn.Module):
    """x_SC + R(P_out(T-MHA(P_in(GN_st(x_SC)), x_CAM))): temporal cross-attention from the T frames
    of a skip feature (queries) to the F_cond CAM frames (keys/values) at every location.

    P_Q, P_K, P_V and the zero-initialised P_out are the `CrossAttention`'s projections, so the
    update is exactly zero at initialisation.
    """

    def __init__(self, channels: int, heads: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.attn = CrossAttention(channels, channels, heads, zero_init=True)

    def forward(self, skip: Tensor, cam: Tensor, batch: int) -> Tensor:
        bt, c, h, w = skip.shape
        num_frames = bt // batch
        # GroupNorm on the (B, C, T, H, W) video normalises each group over time and space.
        normed = video_to_frames(self.norm(frames_to_video(skip, num_frames)))  # (B*T, C, H, W)
        query = self.proj_in(_per_location(normed, batch))  # (B*H*W, T, C)
        update = self.attn(query, _per_location(cam, batch))  # (B*H*W, T, C)
        update = update.view(batch, h * w, num_frames, c).transpose(1, 2)  # (B, T, H*W, C)
        return skip + tokens_to_frames(update.reshape(bt, h * w, c), h, w)


def _per_location(frames: Tensor, batch: int) -> Tensor:
    """(B*T, C, H, W) -> (B*H*W, T, C): the time series at every spatial location."""
    bt, c, h, w = frames.shape
    tokens = frames_to_tokens(frames).reshape(batch, bt // batch, h * w, c)  # (B, T, H*W, C)
    return tokens.transpose(1, 2).reshape(batch * h * w, bt // batch, c)


class CAM(nn.Module):
    """E_cond + zero-initialised fusion conv + encoder copy + one `SkipInjection` per long skip
    and one for the middle block's output."""

    def __init__(self, base: UNet3D, config: StreamingT2VConfig) -> None:
        super().__init__()
        base_cfg = config.base
        self.cond_frames = config.cond_frames
        self.encoder = EncoderCopy(base)
        channels, downsamples = self.encoder.fusion_point()
        self.frame_encoder = FrameEncoder(base_cfg.out_channels, base_cfg.model_channels, downsamples)
        self.fuse = zero_module(nn.Conv2d(base_cfg.model_channels, channels, 1))
        self.inject = nn.ModuleList(
            SkipInjection(ch, config.cam_heads, base_cfg.num_groups) for ch in _feature_channels(base)
        )

    def features(
        self, x: Tensor, cond_latents: Tensor, emb: Tensor, context: Tensor, context_mask: Tensor | None = None
    ) -> list[Tensor]:
        """x_CAM of the noisy chunk x (B, C_in, T, H, W) and the conditioning frames (B, C, F_cond, H, W):
        one (B*F_cond, C_i, H_i, W_i) per long skip, then the middle block's."""
        if cond_latents.shape[2] != self.cond_frames or x.shape[2] < self.cond_frames:
            raise ValueError(
                f"StreamingT2V: CAM needs cond_latents of cond_frames={self.cond_frames} frames and a chunk of at "
                f"least as many; got {cond_latents.shape[2]} conditioning and {x.shape[2]} chunk frames"
            )
        fused = self.fuse(self.frame_encoder(cond_latents))  # (B*F_cond, C_k, H_k, W_k)
        return self.encoder(x[:, :, : self.cond_frames], fused, emb, context, context_mask)

    def forward(self, streams: list[Tensor], cam: list[Tensor], batch: int) -> list[Tensor]:
        """Inject x_CAM into the base's long skips and middle output (same order as `features`)."""
        return [
            inject(stream, feature, batch)
            for inject, stream, feature in zip(self.inject, streams, cam, strict=True)
        ]


def _feature_channels(base: UNet3D) -> list[int]:
    """Channels of the long-skip features `UNet3D.encode` returns, in order, then the middle block's."""
    channels = [base.input_conv.out_channels]
    for block in base.encoder:
        conv = block.conv if isinstance(block, Downsample) else block.res.out_conv
        channels.append(conv.out_channels)
    return [*channels, channels[-1]]


class APM(nn.Module):
    """x_mixed = Proj(concat_tokens[x_text, Linear(anchor) -> k tokens]), shaped like x_text.

    Proj is a linear map over the token axis (L + k -> L) followed by LayerNorm over channels.
    """

    def __init__(self, config: StreamingT2VConfig) -> None:
        super().__init__()
        context_dim = config.base.context_dim
        self.tokens, self.text_tokens = config.anchor_tokens, config.text_tokens
        self.expand = nn.Linear(config.image_embed_dim, config.anchor_tokens * context_dim)
        # No bias: a per-token constant would be removed by the LayerNorm over channels.
        self.project = nn.Linear(config.text_tokens + config.anchor_tokens, config.text_tokens, bias=False)
        self.norm = nn.LayerNorm(context_dim)

    def forward(self, text: Tensor, anchor: Tensor) -> Tensor:
        """text (B, L, D), anchor (B, D_img) -> x_mixed (B, L, D)."""
        if text.shape[1] != self.text_tokens:
            raise ValueError(
                f"StreamingT2V APM: text context has {text.shape[1]} tokens, text_tokens={self.text_tokens}"
            )
        anchor_tokens = self.expand(anchor).view(anchor.shape[0], self.tokens, -1)  # (B, k, D)
        tokens = torch.cat([text, anchor_tokens], dim=1)  # (B, L + k, D)
        mixed = self.project(tokens.transpose(1, 2)).transpose(1, 2)  # (B, L, D)
        return self.norm(mixed)


class MixedCrossAttention(CrossAttention):
    """A base `CrossAttention` whose keys and values come from x_cross = SiLU(α)·x_mixed + x_text, α init 0.

    It has the wrapped layer's parameter names (plus `alpha`), so base U-Net state dicts still
    load, and it receives the packed context `[x_text; x_mixed]` (B, 2L, D) and, optionally, the
    packed mask `[text_mask; mixed_mask]` (B, 2L): token j of x_cross is attended when either holds.
    """

    def __init__(self, dim: int, context_dim: int, heads: int, *, qkv_bias: bool) -> None:
        super().__init__(dim, context_dim, heads, qkv_bias=qkv_bias)
        self.alpha = nn.Parameter(torch.zeros(1))  # shape (1,): DeepSpeed cannot broadcast 0-dim parameters

    @classmethod
    def replacing(cls, layer: CrossAttention) -> MixedCrossAttention:
        mixed = cls(
            layer.q.in_features, layer.kv.in_features, layer.heads, qkv_bias=layer.q.bias is not None
        ).to(layer.q.weight.device)
        mixed.load_state_dict(layer.state_dict(), strict=False)
        return mixed

    def forward(self, x: Tensor, context: Tensor, context_mask: Tensor | None = None) -> Tensor:
        text, mixed = context.chunk(2, dim=1)  # 2 x (B, L, D)
        keep = None
        if context_mask is not None:
            text_keep, mixed_keep = context_mask.bool().chunk(2, dim=1)  # 2 x (B, L)
            keep = text_keep | mixed_keep
        return super().forward(x, F.silu(self.alpha) * mixed + text, keep)


def _mix_cross_attention(model: nn.Module) -> list[MixedCrossAttention]:
    """Replace every `CrossAttention` of `model` by a `MixedCrossAttention`; return them."""
    replaced = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is CrossAttention:
                mixed = MixedCrossAttention.replacing(child)
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
        self.cam = CAM(self.base, config)  # copies the base before its cross-attentions are wrapped
        self.apm = APM(config)
        mixers = _mix_cross_attention(self.base)
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
        copied = ("input_conv.", "encoder.", "middle.")
        self.cam.encoder.load_state_dict({k: v for k, v in state.items() if k.startswith(copied)})

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        *,
        context: Tensor,
        cond_latents: Tensor,
        anchor: Tensor | None,
        level: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> Tensor:
        """x (B, C_in, T, H, W) noisy chunk; context (B, L, D) text tokens; cond_latents
        (B, C_out, F_cond, H, W) last latent frames of the previous chunk; anchor (B, D_img)
        CLIP image embedding of the anchor frame, or None for the model without APM (x_mixed = 0,
        so every cross-attention reads x_text alone); context_mask (B, L) bool the real text
        tokens (None: all) -> prediction (B, C_out, T, H, W).

        With a mask, APM mixes the text with its padding zeroed, and every x_mixed token is
        attended (each mixes all real text tokens and the anchor); without APM only the real
        text tokens are."""
        emb = self.base.time_embedding(t, level)  # (B, D_emb)
        packed_mask = None
        if context_mask is not None:
            context = context * context_mask[..., None].to(context.dtype)
            mixed_mask = context_mask if anchor is None else torch.ones_like(context_mask)
            packed_mask = torch.cat([context_mask, mixed_mask], dim=1)  # (B, 2L)
        mixed = torch.zeros_like(context) if anchor is None else self.apm(context, anchor)  # (B, L, D)
        packed = torch.cat([context, mixed], dim=1)  # (B, 2L, D)
        h, skips = self.base.encode(x, emb, packed, packed_mask)
        cam = self.cam.features(x, cond_latents, emb, context, context_mask)
        *skips, h = self.cam([*skips, h], cam, x.shape[0])
        return self.base.decode(h, skips, emb, packed, packed_mask)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """CAM and APM parameters (the α_l of every cross-attention included); the base is frozen."""
        return [p for p in self.parameters() if p.requires_grad]

    def example_inputs(self, x: Tensor) -> dict[str, Tensor]:
        b, cfg = x.shape[0], self.config
        inputs = self.base.example_inputs(x)
        h, w = x.shape[-2:]
        inputs["context"] = torch.randn(b, cfg.text_tokens, cfg.base.context_dim, device=x.device)
        inputs["cond_latents"] = torch.randn(b, cfg.base.out_channels, cfg.cond_frames, h, w, device=x.device)
        inputs["anchor"] = torch.randn(b, cfg.image_embed_dim, device=x.device)
        return inputs

    def example_input(self, batch_size: int = 2, num_frames: int = 4, size: int = 16) -> Tensor:
        return self.base.example_input(batch_size, num_frames, size)

    def checkpoint_modules(self) -> list[nn.Module]:
        return self.base.checkpoint_modules() + self.cam.encoder.checkpoint_modules()
