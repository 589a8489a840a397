"""Factorised (space-only + optional temporal) ResNet blocks on the frame layout.

All blocks take frames (B*T, C, H, W) in channels_last memory format (see `layers.video`).
A 1x3x3 space-only 3-D convolution is a per-frame `Conv2d(3x3)`; the 3x1x1 temporal
convolution is a `Conv2d((3, 1))` over the (B, C, T, H*W) view of the same memory, which is
several times faster on CPU than `Conv3d` and needs no copy.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from model_zoo.layers.norm import AdaGroupNorm
from model_zoo.layers.video import frames_to_video, video_to_frames


def clip_group_norm(norm: nn.GroupNorm, frames: Tensor, num_frames: int) -> Tensor:
    """GroupNorm of frames (B*T, C, H, W) with statistics over each whole clip (all T frames of a
    group's channels, as ModelScope's temporal layers normalise) -> (B*T, C, H, W) channels_last."""
    return video_to_frames(norm(frames_to_video(frames, num_frames)))


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of `module` (a residual branch that starts as the identity)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class PointwiseConv(nn.Module):
    """1x1 convolution as a linear map over channels of channels_last frames (no copy; oneDNN's
    1x1 convolution on channels_last falls back to a slow kernel on CPU)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_channels, out_channels)

    def forward(self, frames: Tensor) -> Tensor:
        return self.proj(frames.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (N, C_out, H, W), channels_last


class TemporalConv(nn.Module):
    """Residual branch GroupNorm -> SiLU -> conv over time (kernel 3, zero padding), zero-initialised.

    Returns only the branch (the caller adds it), so at initialisation it contributes zero.
    """

    def __init__(
        self,
        channels: int,
        *,
        groups: int = 32,
        eps: float = 1e-6,
        zero_init: bool = True,
        clip_norm: bool = False,
    ) -> None:
        super().__init__()
        self.clip_norm = clip_norm
        self.norm = nn.GroupNorm(groups, channels, eps=eps)
        self.conv = nn.Conv2d(channels, channels, (3, 1), padding=(1, 0))
        if zero_init:
            zero_module(self.conv)

    def forward(self, frames: Tensor, num_frames: int) -> Tensor:
        bt, c, h, w = frames.shape
        act = F.silu(clip_group_norm(self.norm, frames, num_frames) if self.clip_norm else self.norm(frames))
        clip = act.permute(0, 2, 3, 1).reshape(bt // num_frames, num_frames, h * w, c)  # (B, T, H*W, C)
        out = self.conv(clip.permute(0, 3, 1, 2))  # (B, C, T, H*W), channels_last
        return out.permute(0, 2, 3, 1).reshape(bt, h, w, c).permute(0, 3, 1, 2)  # (B*T, C, H, W)


class TemporalConvStack(nn.Module):
    """Residual branch of several `TemporalConv` stages applied in sequence (ModelScope's four);
    only the last stage is zero-initialised, so the branch contributes zero
    at initialisation."""

    def __init__(
        self, channels: int, layers: int, *, groups: int = 32, eps: float = 1e-5, clip_norm: bool = False
    ) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            TemporalConv(channels, groups=groups, eps=eps, zero_init=i == layers - 1, clip_norm=clip_norm)
            for i in range(layers)
        )

    def forward(self, frames: Tensor, num_frames: int) -> Tensor:
        for stage in self.stages:
            frames = stage(frames, num_frames)
        return frames


class ResBlock(nn.Module):
    """LDM ResNet block with space-only 3x3 convolutions and the embedding injected by AdaGroupNorm.

    GN -> SiLU -> conv3x3 -> AdaGN(emb) -> SiLU -> dropout -> conv3x3 (zero-init), plus a 1x1
    skip when channels change, then an optional `TemporalConv` residual branch. With
    `additive_emb` the embedding is instead a per-channel bias Linear(SiLU(emb)) added after the
    first convolution, followed by an affine GroupNorm (the Stable Diffusion / ModelScope block);
    `temporal_layers > 1` makes the temporal branch a `TemporalConvStack`; `temporal_clip_norm`
    normalises it over whole clips (`clip_group_norm`). `temporal=False` in `forward` skips the
    temporal branch (image batches: each frame is an image of its own).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_dim: int,
        *,
        groups: int = 32,
        dropout: float = 0.0,
        temporal_conv: bool = True,
        eps: float = 1e-6,
        additive_emb: bool = False,
        temporal_layers: int = 1,
        temporal_clip_norm: bool = False,
    ) -> None:
        super().__init__()
        self.in_norm = nn.GroupNorm(groups, in_channels, eps=eps)
        self.in_conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_channels) if additive_emb else None
        self.out_norm: nn.Module = (
            nn.GroupNorm(groups, out_channels, eps=eps)
            if additive_emb
            else AdaGroupNorm(out_channels, emb_dim, groups=groups, eps=eps)
        )
        self.dropout = nn.Dropout(dropout)
        self.out_conv = zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if in_channels == out_channels else PointwiseConv(in_channels, out_channels)
        self.temporal: nn.Module | None = None
        if temporal_conv:
            self.temporal = (
                TemporalConv(out_channels, groups=groups, clip_norm=temporal_clip_norm)
                if temporal_layers == 1
                else TemporalConvStack(
                    out_channels, temporal_layers, groups=groups, clip_norm=temporal_clip_norm
                )
            )

    def forward(self, frames: Tensor, emb: Tensor, num_frames: int, *, temporal: bool = True) -> Tensor:
        h = self.in_conv(F.silu(self.in_norm(frames)))  # (B*T, C_out, H, W)
        if self.emb_proj is not None:
            h = self.out_norm(h + self.emb_proj(F.silu(emb))[:, :, None, None])
        else:
            h = self.out_norm(h, emb)
        h = self.out_conv(self.dropout(F.silu(h)))
        h = self.skip(frames) + h
        if self.temporal is not None and temporal:
            h = h + self.temporal(h, num_frames)
        return h


class Downsample(nn.Module):
    """Spatial 2x downsampling by a stride-2 3x3 convolution (time is untouched)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, frames: Tensor) -> Tensor:
        return self.conv(frames)  # (B*T, C, H/2, W/2)


class Upsample(nn.Module):
    """Spatial 2x nearest upsampling followed by a 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, frames: Tensor, size: tuple[int, int]) -> Tensor:
        return self.conv(F.interpolate(frames, size=size, mode="nearest"))  # (B*T, C, *size)
