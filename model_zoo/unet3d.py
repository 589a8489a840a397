"""Spatio-temporal factorised 3-D U-Net (LVDM / VidRD / ModelScope lineage).

Input latents (B, C_in, T, H, W) -> prediction (B, C_out, T, H, W). Internally the network
runs on the frame layout (B*T, C, H, W), channels_last (see `model_zoo.layers.video`): 1x3x3
space-only convolutions are per-frame `Conv2d`s, temporal convolutions and temporal attention
act over T at every spatial location, spatial self-attention and text cross-attention act
per frame. The timestep (plus LVDM's perturbation level s as a class-like embedding, and the
clip's frame stride when `num_strides > 0`) enters every ResNet block through adaptive GroupNorm.

Structure exposed for the StreamingT2V modules (model_zoo/streaming.py):
- `time_embedding(t, level, stride) -> emb (B, D)`;
- `encode(x, emb, context) -> (h, skips)`: input conv, encoder blocks and middle block;
  `skips` is the list of long-skip features, each (B*T, C_i, H_i, W_i) channels_last, in
  the order they were produced (the decoder consumes them from the end);
- `decode(h, skips, emb, context) -> (B, C_out, T, H, W)`;
- every text cross-attention is a `model_zoo.layers.CrossAttention` that receives `context`.

Image mode (`forward(..., image_mode=True)`, also `encode`/`decode`): every temporal layer (the
temporal convolutions, temporal transformers and `input_temporal`) is skipped, so each frame of
the input is denoised as an image of its own: joint image + video training feeds image batches
this way (LVDM / VidRD / ModelScope practice). At zero-initialised temporal layers a clip's
output equals the image-mode output of its frames.

See docs/methods.md, 'Factorised 3-D U-Net'.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model_zoo.layers import (
    Downsample,
    ResBlock,
    SpatialTransformer,
    TemporalTransformer,
    TimestepEmbedding,
    Upsample,
    frames_to_video,
    per_frame,
    video_to_frames,
    zero_module,
)
from model_zoo.pretrained import PretrainedMixin
from model_zoo.registry import register_family


@dataclass(frozen=True, kw_only=True)
class UNet3DConfig:
    in_channels: int = 4
    """Latent channels of the input (+1 when LVDM's frame mask is concatenated)."""
    out_channels: int = 4
    """Channels of the prediction (eps / v / x0 of the latent)."""
    model_channels: int = 256
    """Channels of the first level; level i has model_channels * channel_mult[i]."""
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    """Channel multiplier per resolution level; each level but the last halves H and W."""
    num_res_blocks: int = 3
    """ResNet blocks per level in the encoder (the decoder has one more per level)."""
    attention_resolutions: tuple[int, ...] = (8, 4, 2)
    """Downsampling factors (1 = input resolution) whose blocks get spatial and temporal attention."""
    num_heads: int = 4
    """Attention heads of every spatial, cross and temporal attention (when head_dim is None)."""
    head_dim: int | None = None
    """Channels per attention head; when set, a block with C channels gets C // head_dim heads
    (SD 2.x style; wide heads are also much faster on CPU than many narrow ones)."""
    context_dim: int | None = None
    """Width of the text tokens for cross-attention; None builds no cross-attention."""
    num_levels: int = 0
    """Classes of the perturbation-level embedding (LVDM's tasks set s_max + 2: s in 0..s_max and
    the "no condition" class); 0 disables it."""
    num_strides: int = 0
    """Classes of the frame-stride embedding (strides 0..num_strides-1 of the training clips, the
    fps conditioning of LVDM's long-video models); zero-initialised, 0 disables it."""
    temporal_conv: bool = True
    """Add a zero-initialised 3x1x1 temporal convolution branch to every ResNet block."""
    temporal_attention: bool = True
    """Add a temporal transformer (attention over T per location) after every spatial transformer."""
    temporal_position: Literal["bias", "rope", "none"] = "bias"
    """Relative position over time in temporal attention: learned clipped-distance bias, RoPE or none."""
    max_temporal_distance: int = 32
    """Largest frame distance with its own learned bias (longer distances share the last entry)."""
    transformer_ff_mult: float = 4.0
    """Hidden width of the (GEGLU) feed-forward of every transformer, as a multiple of channels."""
    num_groups: int = 32
    """Groups of every GroupNorm."""
    dropout: float = 0.0
    """Dropout inside ResNet blocks."""
    time_embed_dim: int | None = None
    """Width of the timestep embedding; None means 4 * model_channels."""
    additive_time_embedding: bool = False
    """ResNet blocks add Linear(SiLU(emb)) as a per-channel bias after their first convolution and
    use an affine GroupNorm (Stable Diffusion / ModelScope) instead of adaptive GroupNorm."""
    norm_eps: float = 1e-6
    """Epsilon of the ResNet blocks' and the output head's GroupNorms."""
    temporal_conv_layers: int = 1
    """GroupNorm -> SiLU -> temporal conv stages in each temporal convolution branch (ModelScope: 4)."""
    temporal_clip_norm: bool = False
    """GroupNorms of the temporal convolutions and temporal transformers take their statistics
    over the whole clip (ModelScope) instead of per frame."""
    temporal_double_attention: bool = False
    """Temporal transformers run a second LayerNorm + self-attention before the feed-forward."""
    input_temporal: tuple[int, int] | None = None
    """(heads, head_dim) of a temporal transformer of width heads * head_dim applied after the input
    convolution (ModelScope's `transformer_in`); None builds none."""


FLAVORS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(1, 2),
        num_heads=2,
        context_dim=32,
        num_levels=251,
        num_groups=8,
    ),
    # LVDM short-video model, unconditional: UNet3DConfig's defaults.
    "lvdm-256": {},
    # LVDM long-video prediction / interpolation model: latent + mask, perturbation level s.
    "lvdm-256-pred": dict(in_channels=5, num_levels=251),
    # Text-to-video (SD-style layout, CLIP ViT-L text context).
    "lvdm-t2v": dict(
        model_channels=320,
        channel_mult=(1, 2, 4, 4),
        num_res_blocks=2,
        attention_resolutions=(4, 2, 1),
        num_heads=8,
        context_dim=768,
    ),
    # ModelScope text-to-video / zeroscope layout: maps 1:1 onto diffusers' UNet3DConditionModel
    # (model_zoo.importers.diffusers_unet).
    "modelscope": dict(
        model_channels=320,
        channel_mult=(1, 2, 4, 4),
        num_res_blocks=2,
        attention_resolutions=(1, 2, 4),
        head_dim=64,
        context_dim=1024,
        additive_time_embedding=True,
        norm_eps=1e-5,
        temporal_conv_layers=4,
        temporal_clip_norm=True,
        temporal_position="none",
        temporal_double_attention=True,
        input_temporal=(8, 64),
    ),
    # Billion-parameter flavour: the t2v layout with OpenCLIP ViT-H text context (1.19e9 params).
    "1b": dict(
        model_channels=320,
        channel_mult=(1, 2, 4, 4),
        num_res_blocks=2,
        attention_resolutions=(4, 2, 1),
        num_heads=8,
        context_dim=1024,
    ),
}


class UNetBlock(nn.Module):
    """One U-Net stage step: ResBlock, then (optionally) spatial and temporal transformers.

    The unit the trainer may wrap with activation checkpointing.
    """

    def __init__(
        self, in_channels: int, out_channels: int, emb_dim: int, config: UNet3DConfig, *, attention: bool
    ) -> None:
        super().__init__()
        groups = config.num_groups
        heads = out_channels // config.head_dim if config.head_dim else config.num_heads
        self.res = ResBlock(
            in_channels,
            out_channels,
            emb_dim,
            groups=groups,
            dropout=config.dropout,
            temporal_conv=config.temporal_conv,
            eps=config.norm_eps,
            additive_emb=config.additive_time_embedding,
            temporal_layers=config.temporal_conv_layers,
            temporal_clip_norm=config.temporal_clip_norm,
        )
        self.spatial = (
            SpatialTransformer(
                out_channels,
                heads,
                context_dim=config.context_dim,
                groups=groups,
                ff_mult=config.transformer_ff_mult,
            )
            if attention
            else None
        )
        self.temporal = (
            TemporalTransformer(
                out_channels,
                heads,
                groups=groups,
                ff_mult=config.transformer_ff_mult,
                position=config.temporal_position,
                max_distance=config.max_temporal_distance,
                double_attention=config.temporal_double_attention,
                clip_norm=config.temporal_clip_norm,
            )
            if attention and config.temporal_attention
            else None
        )

    def forward(
        self,
        frames: Tensor,
        emb: Tensor,
        context: Tensor | None,
        num_frames: int,
        context_mask: Tensor | None = None,
        temporal: bool = True,
    ) -> Tensor:
        h = self.res(frames, emb, num_frames, temporal=temporal)
        if self.spatial is not None:
            h = self.spatial(h, context, num_frames, context_mask)
        if self.temporal is not None and temporal:
            h = self.temporal(h, num_frames)
        return h


@register_family("unet3d", UNet3DConfig, FLAVORS)
class UNet3D(PretrainedMixin, nn.Module):
    """Factorised spatio-temporal U-Net denoiser (see the module docstring for its structure)."""

    def __init__(self, config: UNet3DConfig) -> None:
        super().__init__()
        self.config = config
        ch = config.model_channels
        emb_dim = config.time_embed_dim or 4 * ch
        self.time_embed = TimestepEmbedding(emb_dim, frequency_dim=ch)
        self.level_embed = nn.Embedding(config.num_levels, emb_dim) if config.num_levels else None
        self.stride_embed = (
            zero_module(nn.Embedding(config.num_strides, emb_dim)) if config.num_strides else None
        )
        self.input_conv = nn.Conv2d(config.in_channels, ch, 3, padding=1)
        self.input_temporal = self._build_input_temporal()
        self.encoder, skip_channels, ch = self._build_encoder(emb_dim)
        self.middle = nn.ModuleList(
            [
                UNetBlock(ch, ch, emb_dim, config, attention=True),
                UNetBlock(ch, ch, emb_dim, config, attention=False),
            ]
        )
        self.decoder, ch = self._build_decoder(emb_dim, skip_channels, ch)
        self.out_norm = nn.GroupNorm(config.num_groups, ch, eps=config.norm_eps)
        self.out_conv = zero_module(nn.Conv2d(ch, config.out_channels, 3, padding=1))
        # Conv weights in the activations' channels_last format: no per-call weight reorder copy.
        self.to(memory_format=torch.channels_last)

    def _build_input_temporal(self) -> TemporalTransformer | None:
        cfg = self.config
        if cfg.input_temporal is None:
            return None
        heads, head_dim = cfg.input_temporal
        return TemporalTransformer(
            cfg.model_channels,
            heads,
            groups=cfg.num_groups,
            ff_mult=cfg.transformer_ff_mult,
            position=cfg.temporal_position,
            max_distance=cfg.max_temporal_distance,
            width=heads * head_dim,
            double_attention=cfg.temporal_double_attention,
            clip_norm=cfg.temporal_clip_norm,
        )

    def _build_encoder(self, emb_dim: int) -> tuple[nn.ModuleList, list[int], int]:
        cfg = self.config
        blocks: list[nn.Module] = []
        ch = cfg.model_channels
        skip_channels = [ch]
        for level, mult in enumerate(cfg.channel_mult):
            attention = 2**level in cfg.attention_resolutions
            for _ in range(cfg.num_res_blocks):
                blocks.append(UNetBlock(ch, cfg.model_channels * mult, emb_dim, cfg, attention=attention))
                ch = cfg.model_channels * mult
                skip_channels.append(ch)
            if level < len(cfg.channel_mult) - 1:
                blocks.append(Downsample(ch))
                skip_channels.append(ch)
        return nn.ModuleList(blocks), skip_channels, ch

    def _build_decoder(self, emb_dim: int, skip_channels: list[int], ch: int) -> tuple[nn.ModuleList, int]:
        cfg = self.config
        blocks: list[nn.Module] = []
        skips = list(skip_channels)
        for level in reversed(range(len(cfg.channel_mult))):
            attention = 2**level in cfg.attention_resolutions
            out = cfg.model_channels * cfg.channel_mult[level]
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(UNetBlock(ch + skips.pop(), out, emb_dim, cfg, attention=attention))
                ch = out
            if level > 0:
                blocks.append(Upsample(ch))
        return nn.ModuleList(blocks), ch

    def time_embedding(self, t: Tensor, level: Tensor | None = None, stride: Tensor | None = None) -> Tensor:
        """Timestep embedding (B, D), plus the perturbation-level embedding when `level` is given
        and the frame-stride embedding when `stride` (B,) long is given."""
        emb = self.time_embed(t)  # (B, D)
        if level is not None:
            if self.level_embed is None:
                raise ValueError("level was given but this UNet3D has num_levels=0")
            emb = emb + self.level_embed(level)
        if stride is not None:
            if self.stride_embed is None:
                raise ValueError("stride was given but this UNet3D has num_strides=0")
            if int(stride.max()) >= self.config.num_strides:
                raise ValueError(
                    f"stride {int(stride.max())} is outside this UNet3D's num_strides={self.config.num_strides}"
                )
            emb = emb + self.stride_embed(stride)
        return emb

    def encode(
        self,
        x: Tensor,
        emb: Tensor,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        *,
        image_mode: bool = False,
    ) -> tuple[Tensor, list[Tensor]]:
        """Input conv, encoder and middle block. x (B, C_in, T, H, W); emb (B, D) or per-frame (B, T, D);
        context_mask (B, L) bool: the real text tokens (None: all).

        Returns the middle features (B*T, C, h, w) and the long-skip features (see module doc).
        """
        num_frames, temporal = x.shape[2], not image_mode
        frame_emb = per_frame(emb, num_frames)  # (B*T, D)
        h = self.input_conv(video_to_frames(x))  # (B*T, C, H, W)
        if self.input_temporal is not None and temporal:
            h = self.input_temporal(h, num_frames)
        skips = [h]
        for block in self.encoder:
            h = (
                block(h)
                if isinstance(block, Downsample)
                else block(h, frame_emb, context, num_frames, context_mask, temporal)
            )
            skips.append(h)
        for block in self.middle:
            h = block(h, frame_emb, context, num_frames, context_mask, temporal)
        return h, skips

    def decode(
        self,
        h: Tensor,
        skips: list[Tensor],
        emb: Tensor,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        *,
        image_mode: bool = False,
    ) -> Tensor:
        """Decoder blocks consuming `skips` from the end, then the output head -> (B, C_out, T, H, W)."""
        num_frames = emb.shape[1] if emb.dim() == 3 else h.shape[0] // emb.shape[0]
        frame_emb = per_frame(emb, num_frames)  # (B*T, D)
        skips = list(skips)
        for block in self.decoder:
            if isinstance(block, Upsample):
                h = block(h, skips[-1].shape[-2:])  # (B*T, C, 2h, 2w)
            else:
                h = block(
                    torch.cat([h, skips.pop()], dim=1), frame_emb, context, num_frames, context_mask, not image_mode
                )  # (B*T, C', h, w)
        out = self.out_conv(F.silu(self.out_norm(h)))  # (B*T, C_out, H, W)
        return frames_to_video(out, num_frames).contiguous()  # (B, C_out, T, H, W)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        *,
        context: Tensor | None = None,
        level: Tensor | None = None,
        stride: Tensor | None = None,
        context_mask: Tensor | None = None,
        image_mode: bool = False,
    ) -> Tensor:
        """x (B, C_in, T, H, W), t (B,), context (B, L, context_dim), level and stride (B,) long,
        context_mask (B, L) bool (True = a real token; None = all real) -> (B, C_out, T, H, W).
        `image_mode`: skip every temporal layer (see the module doc)."""
        emb = self.time_embedding(t, level, stride)
        h, skips = self.encode(x, emb, context, context_mask, image_mode=image_mode)
        return self.decode(h, skips, emb, context, context_mask, image_mode=image_mode)

    def example_inputs(self, x: Tensor) -> dict[str, Tensor]:
        """Forward keyword arguments for a sample input x: timesteps, 77 text tokens, levels."""
        b = x.shape[0]
        inputs = {"t": torch.linspace(50, 950, b, device=x.device).long()}
        if self.config.context_dim:
            inputs["context"] = torch.randn(b, 77, self.config.context_dim, device=x.device)
        if self.config.num_levels:
            inputs["level"] = torch.arange(b, device=x.device) % self.config.num_levels
        if self.config.num_strides:
            inputs["stride"] = torch.arange(1, b + 1, device=x.device) % self.config.num_strides
        return inputs

    def example_input(self, batch_size: int = 2, num_frames: int = 4, size: int = 16) -> Tensor:
        """A random latent clip (B, C_in, T, size, size) on the model's device."""
        device = self.input_conv.weight.device
        return torch.randn(batch_size, self.config.in_channels, num_frames, size, size, device=device)

    def checkpoint_modules(self) -> list[nn.Module]:
        """The `UNetBlock`s (ResBlock + transformers) the trainer may wrap with activation checkpointing."""
        return [m for m in self.modules() if isinstance(m, UNetBlock)]
