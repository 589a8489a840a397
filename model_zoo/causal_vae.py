"""Causal 3-D video VAE: 4x temporal and 8x spatial compression into 16 latent channels.

Every convolution pads time on the past side only, normalisation and attention work per frame,
and temporal downsampling maps frames (2j - 1, 2j) to one frame while frame 0 stays alone, so
latent frame j depends on input frames up to 4j only: frame 0 is encoded by itself, an image is
a one-frame video, and a clip of 1 + 4k frames has 1 + k latent frames (Wan, CogVideoX,
HunyuanVideo). Because nothing looks ahead, encoding and decoding can run chunk by chunk (frame
0, then 4 frames per latent frame) with each convolution keeping the last input frames of the
previous chunk: memory stays flat in the clip length and the result equals the full pass.

See docs/methods.md, 'Causal video VAE'.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model_zoo.layers.gaussian_posterior import DiagonalGaussian, LatentScalingMixin
from model_zoo.layers.time_padded_conv import Conv3d
from model_zoo.pretrained import PretrainedMixin
from model_zoo.registry import register_family
from model_zoo.video_vae import FrameAttention, FrameGroupNorm


@dataclass(frozen=True, kw_only=True)
class CausalVAEConfig:
    in_channels: int = 3
    """Pixel channels of the video (RGB)."""
    base_channels: int = 96
    """Channels of the first encoder level; level i has `base_channels * channel_mult[i]`."""
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    """Channel multiplier per level; each of the len - 1 level transitions halves height and width."""
    temporal_down: tuple[bool, ...] = (False, True, True)
    """Per level transition: whether it also halves time (two True: 4x temporal compression)."""
    num_res_blocks: int = 2
    """ResNet blocks per encoder level (the decoder uses one more)."""
    latent_channels: int = 16
    """Channels of the latent z."""
    norm_groups: int = 32
    """GroupNorm groups (per frame)."""
    scale_factor: float = 1.0
    """Diffusion latents are `(z - shift_factor) * scale_factor`."""
    shift_factor: float = 0.0
    """See `scale_factor`."""


FLAVORS = {
    "tiny": dict(base_channels=8, channel_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=4),
    # Wan2.1-VAE-like widths (96, 192, 384, 384): 4x8x8 compression into 16 channels.
    "16ch": {},
}


class CausalConv3d(nn.Module):
    """3x3x3 convolution padded by zeros on the past side of time (and by 1 in space).

    Inside `CausalVAE.streaming()` it keeps the input frames of the previous chunk that later
    outputs still need, so chunk-by-chunk calls give the outputs of one call on the whole clip.
    """

    def __init__(
        self, in_channels: int, out_channels: int, *, stride: tuple[int, int, int] = (1, 1, 1)
    ) -> None:
        super().__init__()
        self.conv = Conv3d(in_channels, out_channels, 3, stride=stride, padding=(0, 1, 1))
        self.stride = stride[0]
        self.streaming = False
        self.cache: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        past = (
            self.cache
            if self.streaming and self.cache is not None
            else x.new_zeros(*x.shape[:2], 2, *x.shape[3:])
        )
        frames = torch.cat([past, x], dim=2)  # (B, C, past + T, H, W)
        outputs = (frames.shape[2] - 3) // self.stride + 1
        if self.streaming:
            self.cache = frames[:, :, outputs * self.stride :]
        return self.conv(frames[:, :, : (outputs - 1) * self.stride + 3])  # (B, C_out, outputs, H', W')


class CausalResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            FrameGroupNorm(groups, in_channels),
            nn.SiLU(),
            CausalConv3d(in_channels, out_channels),
            FrameGroupNorm(groups, out_channels),
            nn.SiLU(),
            CausalConv3d(out_channels, out_channels),
        )
        self.skip = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.block(x)  # (B, C_out, T, H, W)


class CausalUpsample(nn.Module):
    """Nearest 2x in space and, when `temporal`, each frame twice in time except frame 0 of the
    clip (1 + k frames -> 1 + 2k), then a causal convolution."""

    def __init__(self, channels: int, temporal: bool) -> None:
        super().__init__()
        self.temporal = temporal
        self.conv = CausalConv3d(channels, channels)
        self.started = False

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=(2 if self.temporal else 1, 2, 2), mode="nearest")
        if self.temporal and not (self.conv.streaming and self.started):
            x = x[:, :, 1:]  # frame 0 of the clip is not doubled
        self.started = self.conv.streaming
        return self.conv(x)  # (B, C, T', 2H, 2W)


def _mid(channels: int, groups: int) -> nn.Sequential:
    return nn.Sequential(
        CausalResBlock(channels, channels, groups),
        FrameAttention(channels, groups),
        CausalResBlock(channels, channels, groups),
    )


class CausalEncoder(nn.Module):
    def __init__(self, config: CausalVAEConfig) -> None:
        super().__init__()
        widths = [config.base_channels * m for m in config.channel_mult]
        groups = config.norm_groups
        blocks: list[nn.Module] = [CausalConv3d(config.in_channels, widths[0])]
        in_ch = widths[0]
        for level, width in enumerate(widths):
            for _ in range(config.num_res_blocks):
                blocks.append(CausalResBlock(in_ch, width, groups))
                in_ch = width
            if level < len(widths) - 1:
                blocks.append(
                    CausalConv3d(width, width, stride=(2 if config.temporal_down[level] else 1, 2, 2))
                )
        blocks += [
            _mid(in_ch, groups),
            FrameGroupNorm(groups, in_ch),
            nn.SiLU(),
            CausalConv3d(in_ch, 2 * config.latent_channels),
        ]
        self.layers = nn.Sequential(*blocks)

    def forward(self, video: Tensor) -> Tensor:
        return self.layers(video)  # (B, 2 * latent_channels, 1 + (T - 1)/ft, H/8, W/8)


class CausalDecoder(nn.Module):
    def __init__(self, config: CausalVAEConfig) -> None:
        super().__init__()
        widths = [config.base_channels * m for m in config.channel_mult]
        groups = config.norm_groups
        in_ch = widths[-1]
        blocks: list[nn.Module] = [CausalConv3d(config.latent_channels, in_ch), _mid(in_ch, groups)]
        for level in reversed(range(len(widths))):
            for _ in range(config.num_res_blocks + 1):
                blocks.append(CausalResBlock(in_ch, widths[level], groups))
                in_ch = widths[level]
            if level > 0:
                blocks.append(CausalUpsample(in_ch, config.temporal_down[level - 1]))
        blocks += [FrameGroupNorm(groups, in_ch), nn.SiLU()]
        self.layers = nn.Sequential(*blocks)
        self.out = CausalConv3d(in_ch, config.in_channels)

    def forward(self, z: Tensor) -> Tensor:
        return self.out(self.layers(z))  # (B, 3, 1 + (t - 1)*ft, 8h, 8w)


@register_family("causal_vae", CausalVAEConfig, FLAVORS)
class CausalVAE(LatentScalingMixin, PretrainedMixin, nn.Module):
    """Causal KL autoencoder: video (B, 3, 1 + 4k, H, W) <-> latents (B, 16, 1 + k, H/8, W/8)."""

    def __init__(self, config: CausalVAEConfig) -> None:
        super().__init__()
        if len(config.temporal_down) != len(config.channel_mult) - 1:
            raise ValueError(
                f"causal_vae: temporal_down {config.temporal_down} needs one entry per level transition "
                f"({len(config.channel_mult) - 1} for channel_mult {config.channel_mult})"
            )
        self.config = config
        self.encoder = CausalEncoder(config)
        self.decoder = CausalDecoder(config)

    @property
    def downsample_factors(self) -> tuple[int, int, int]:
        """(time, height, width) factors from video to latents (time: 1 + ft·k frames -> 1 + k)."""
        return (
            2 ** sum(self.config.temporal_down),
            2 ** len(self.config.temporal_down),
            2 ** len(self.config.temporal_down),
        )

    def latent_frames(self, frames: int) -> int:
        """Latent frames of a clip of `frames` frames (1 + ft·k frames -> 1 + k)."""
        return 1 + (frames - 1) // self.downsample_factors[0]

    def encode(self, video: Tensor, *, chunk: int | None = None) -> DiagonalGaussian:
        """Posterior of video (B, 3, 1 + ft·k, H, W); `chunk` latent frames at a time (frame 0 alone first)."""
        ft = self.downsample_factors[0]
        if (video.shape[2] - 1) % ft:
            raise ValueError(f"causal_vae: a clip needs 1 + {ft}k frames (got {video.shape[2]})")
        if chunk is None:
            return DiagonalGaussian(self.encoder(video))
        edges = [0, 1, *range(1 + ft * chunk, video.shape[2], ft * chunk), video.shape[2]]
        with self.streaming(self.encoder):
            moments = [
                self.encoder(video[:, :, a:b]) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a
            ]
        return DiagonalGaussian(torch.cat(moments, dim=2))  # moments (B, 2 C_z, 1 + k, h, w)

    def decode(self, z: Tensor, *, chunk: int | None = None) -> Tensor:
        """Video (B, 3, 1 + ft·(t - 1), H, W) of latents z (B, C_z, t, h, w); `chunk` latent frames at a time."""
        if chunk is None:
            return self.decoder(z)
        edges = [0, 1, *range(1 + chunk, z.shape[2], chunk), z.shape[2]]
        with self.streaming(self.decoder):
            frames = [self.decoder(z[:, :, a:b]) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]
        return torch.cat(frames, dim=2)

    @contextmanager
    def streaming(self, part: nn.Module) -> Iterator[None]:
        """Inside the block, `part`'s causal convolutions carry their past frames across calls."""
        convs = [m for m in part.modules() if isinstance(m, CausalConv3d)]
        ups = [m for m in part.modules() if isinstance(m, CausalUpsample)]
        for conv in convs:
            conv.streaming, conv.cache = True, None
        for up in ups:
            up.started = False
        try:
            yield
        finally:
            for conv in convs:
                conv.streaming, conv.cache = False, None
            for up in ups:
                up.started = False

    def forward(
        self, video: Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[Tensor, DiagonalGaussian]:
        posterior = self.encode(video)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()  # (B, C_z, t, h, w)
        return self.decode(z), posterior

    def decoder_last_layer(self) -> CausalConv3d:
        """The decoder's output convolution (where the adaptive GAN weight is measured)."""
        return self.decoder.out

    def contract_output(self, video: Tensor) -> Tensor:
        """The deterministic reconstruction (posterior mode), for the generic contract test."""
        return self(video, sample_posterior=False)[0]

    def example_input(self, batch_size: int = 2) -> Tensor:
        """A random clip of 1 + 4 frames at 32x32 (the contract test's input)."""
        return torch.randn(batch_size, self.config.in_channels, 1 + self.downsample_factors[0], 32, 32)

    def checkpoint_modules(self) -> list[nn.Module]:
        return [m for m in self.modules() if isinstance(m, CausalResBlock | FrameAttention)]
