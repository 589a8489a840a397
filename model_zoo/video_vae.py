"""LVDM's video autoencoder: a 3D-convolutional KL autoencoder.

He et al., "Latent Video Diffusion Models for High-Fidelity Long Video Generation" (2022).
Every convolution pads time by repeating border frames, and normalisation and attention work
per frame, so an interior latent frame depends only on nearby input frames: the encoder is
temporally shift-equivariant away from the borders (a property test checks it). The loss
(reconstruction, KL, adversarial with `VideoDiscriminator`) lives in the trainer.

See docs/methods.md, 'Video VAE: architecture' and 'Video VAE: posterior and latent scaling'.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from model_zoo.layers.gaussian_posterior import DiagonalGaussian, LatentScalingMixin
from model_zoo.layers.time_padded_conv import Conv3d, TimePaddedConv3d
from model_zoo.pretrained import PretrainedMixin
from model_zoo.registry import register_family


@dataclass(frozen=True, kw_only=True)
class VideoVAEConfig:
    in_channels: int = 3
    """Pixel channels of the video (RGB)."""
    base_channels: int = 128
    """Channels of the first encoder level; level i has `base_channels * channel_mult[i]`."""
    channel_mult: tuple[int, ...] = (1, 2, 2, 4)
    """Channel multiplier per resolution level; levels - 1 must cover the downsampling steps."""
    num_res_blocks: int = 2
    """ResNet blocks per encoder level (the decoder uses one more, as in LDM)."""
    latent_channels: int = 4
    """Channels of the latent z."""
    downsample: tuple[int, int, int] = (4, 8, 8)
    """Total (time, height, width) downsampling factors, each a power of two."""
    norm_groups: int = 32
    """GroupNorm groups (normalisation is per frame, see the module docstring)."""
    mid_attention: bool = True
    """Per-frame spatial self-attention in the middle of encoder and decoder."""
    dropout: float = 0.0
    """Dropout inside the ResNet blocks."""
    scale_factor: float = 1.0
    """Diffusion latents are `(z - shift_factor) * scale_factor` (per dataset, std ~1)."""
    shift_factor: float = 0.0
    """See `scale_factor`."""


FLAVORS = {
    "tiny": dict(
        base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, downsample=(2, 4, 4), norm_groups=8
    ),
    # LVDM's sky-timelapse autoencoder: 16x256x256 -> 4x4x32x32; scale/shift are LVDM's constants.
    "lvdm": dict(scale_factor=0.334, shift_factor=1.46),
}


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm over (C, H, W) of each frame separately: statistics never mix frames."""

    def forward(self, x: Tensor) -> Tensor:
        frames = rearrange(x, "b c t h w -> (b t) c h w")
        return rearrange(super().forward(frames), "(b t) c h w -> b c t h w", t=x.shape[2])


class ResBlock3D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.block = nn.Sequential(
            FrameGroupNorm(groups, in_channels),
            nn.SiLU(),
            TimePaddedConv3d(in_channels, out_channels),
            FrameGroupNorm(groups, out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            TimePaddedConv3d(out_channels, out_channels),
        )
        self.skip = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.block(x)  # (B, C_out, T, H, W)


class FrameAttention(nn.Module):
    """Single-head spatial self-attention inside each frame (residual)."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = FrameGroupNorm(groups, channels)
        self.qkv = nn.Conv3d(channels, 3 * channels, 1)
        self.proj = nn.Conv3d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        _, _, t, h, w = x.shape
        q, k, v = rearrange(
            self.qkv(self.norm(x)), "b (n c) t h w -> n (b t) (h w) c", n=3
        )  # 3 x (BT, HW, C)
        out = F.scaled_dot_product_attention(q, k, v)  # (BT, HW, C)
        out = rearrange(out, "(b t) (h w) c -> b c t h w", t=t, h=h, w=w)
        return x + self.proj(out)


class Resample(nn.Module):
    """Down- (strided conv) or up- (nearest + conv) sampling by 2 along the chosen axes."""

    def __init__(self, channels: int, factors: tuple[int, int, int], up: bool) -> None:
        super().__init__()
        self.factors = factors
        self.up = up
        self.conv = TimePaddedConv3d(channels, channels, stride=(1, 1, 1) if up else factors)

    def forward(self, x: Tensor) -> Tensor:
        if self.up:
            x = F.interpolate(x, scale_factor=self.factors, mode="nearest")  # (B, C, T*ft, H*fh, W*fw)
        return self.conv(x)  # down: (B, C, T/ft, H/fh, W/fw)


def _level_factors(config: VideoVAEConfig) -> list[tuple[int, int, int]]:
    """Per-level (t, h, w) resampling factors (1 or 2): time and space downsample in the first levels."""
    steps = [int(math.log2(f)) for f in config.downsample]
    levels = len(config.channel_mult) - 1
    if any(2**s != f for s, f in zip(steps, config.downsample)) or max(steps) > levels:
        raise ValueError(
            f"downsample {config.downsample} must be powers of two with at most {levels} halvings "
            f"(len(channel_mult) - 1) per axis"
        )
    return [tuple(2 if i < s else 1 for s in steps) for i in range(levels)]


class Encoder3D(nn.Module):
    def __init__(self, config: VideoVAEConfig) -> None:
        super().__init__()
        widths = [config.base_channels * m for m in config.channel_mult]
        groups, dropout = config.norm_groups, config.dropout
        factors = _level_factors(config)
        self.conv_in = TimePaddedConv3d(config.in_channels, widths[0])
        blocks: list[nn.Module] = []
        in_ch = widths[0]
        for level, width in enumerate(widths):
            for _ in range(config.num_res_blocks):
                blocks.append(ResBlock3D(in_ch, width, groups, dropout))
                in_ch = width
            if level < len(widths) - 1:
                blocks.append(Resample(width, factors[level], up=False))
        self.down = nn.Sequential(*blocks)
        self.mid = _mid_block(in_ch, config)
        self.out = nn.Sequential(
            FrameGroupNorm(groups, in_ch), nn.SiLU(), TimePaddedConv3d(in_ch, 2 * config.latent_channels)
        )

    def forward(self, video: Tensor) -> Tensor:
        h = self.down(self.conv_in(video))  # (B, C_top, T/ft, H/fh, W/fw)
        return self.out(self.mid(h))  # (B, 2 * latent_channels, T/ft, H/fh, W/fw)


class Decoder3D(nn.Module):
    def __init__(self, config: VideoVAEConfig) -> None:
        super().__init__()
        widths = [config.base_channels * m for m in config.channel_mult]
        groups, dropout = config.norm_groups, config.dropout
        factors = _level_factors(config)
        self.conv_in = TimePaddedConv3d(config.latent_channels, widths[-1])
        self.mid = _mid_block(widths[-1], config)
        blocks: list[nn.Module] = []
        in_ch = widths[-1]
        for level in reversed(range(len(widths))):
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResBlock3D(in_ch, widths[level], groups, dropout))
                in_ch = widths[level]
            if level > 0:
                blocks.append(Resample(in_ch, factors[level - 1], up=True))
        self.up = nn.Sequential(*blocks)
        self.out = nn.Sequential(
            FrameGroupNorm(groups, in_ch), nn.SiLU(), TimePaddedConv3d(in_ch, config.in_channels)
        )

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))  # (B, C_top, t, h, w)
        return self.out(self.up(h))  # (B, 3, t*ft, h*fh, w*fw)


def _mid_block(channels: int, config: VideoVAEConfig) -> nn.Sequential:
    attention = [FrameAttention(channels, config.norm_groups)] if config.mid_attention else []
    return nn.Sequential(
        ResBlock3D(channels, channels, config.norm_groups, config.dropout),
        *attention,
        ResBlock3D(channels, channels, config.norm_groups, config.dropout),
    )


@register_family("video_vae", VideoVAEConfig, FLAVORS)
class VideoVAE(LatentScalingMixin, PretrainedMixin, nn.Module):
    """3D-conv KL autoencoder: video (B, 3, T, H, W) <-> latents (B, C_z, T/ft, H/fh, W/fw)."""

    def __init__(self, config: VideoVAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder3D(config)
        self.decoder = Decoder3D(config)

    @property
    def downsample_factors(self) -> tuple[int, int, int]:
        """(time, height, width) factors from video to latents."""
        return tuple(self.config.downsample)

    def encode(self, video: Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.encoder(video))  # moments (B, 2 C_z, t, h, w)

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)  # (B, 3, T, H, W)

    def forward(
        self, video: Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[Tensor, DiagonalGaussian]:
        posterior = self.encode(video)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()  # (B, C_z, t, h, w)
        return self.decode(z), posterior

    def decoder_last_layer(self) -> TimePaddedConv3d:
        """The decoder's output convolution (where the adaptive GAN weight is measured)."""
        return self.decoder.out[-1]

    def contract_output(self, video: Tensor) -> Tensor:
        """The deterministic reconstruction (posterior mode), for the generic contract test."""
        return self(video, sample_posterior=False)[0]

    def checkpoint_modules(self) -> list[nn.Module]:
        return [m for m in self.modules() if isinstance(m, ResBlock3D | FrameAttention)]


@dataclass(frozen=True, kw_only=True)
class VideoDiscriminatorConfig:
    in_channels: int = 3
    """Pixel channels of the video."""
    base_channels: int = 64
    """Channels of the first layer; doubled per strided layer up to 8x."""
    num_layers: int = 3
    """Strided (time, space) downsampling layers, as in the PatchGAN with n_layers."""
    norm_groups: int = 32
    """GroupNorm groups (GroupNorm, not BatchNorm: per-rank batches are small under ZeRO)."""


DISCRIMINATOR_FLAVORS = {
    "tiny": dict(base_channels=8, num_layers=2, norm_groups=4),
    # The 3D PatchGAN used with LVDM/TATS video autoencoders: VideoDiscriminatorConfig's defaults.
    "paper": {},
}


def _disc_layer(in_ch: int, out_ch: int, stride: int, groups: int | None) -> list[nn.Module]:
    # Kernel 3 in time (clips are short) and 4 in space, as in the 2D PatchGAN.
    conv = Conv3d(in_ch, out_ch, (3, 4, 4), stride=(stride, stride, stride), padding=1, bias=groups is None)
    norm = [nn.GroupNorm(groups, out_ch)] if groups is not None else []
    return [conv, *norm, nn.LeakyReLU(0.2)]


@register_family("video_discriminator", VideoDiscriminatorConfig, DISCRIMINATOR_FLAVORS)
class VideoDiscriminator(PretrainedMixin, nn.Module):
    """3D PatchGAN: video (B, 3, T, H, W) -> real/fake logits per space-time patch (B, 1, t, h, w)."""

    def __init__(self, config: VideoDiscriminatorConfig) -> None:
        super().__init__()
        self.config = config
        widths = [config.base_channels * min(2**i, 8) for i in range(config.num_layers + 1)]
        layers = _disc_layer(config.in_channels, widths[0], 2, None)
        for i in range(1, config.num_layers):
            layers += _disc_layer(widths[i - 1], widths[i], 2, config.norm_groups)
        layers += _disc_layer(widths[config.num_layers - 1], widths[config.num_layers], 1, config.norm_groups)
        layers.append(Conv3d(widths[config.num_layers], 1, (3, 4, 4), padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, video: Tensor) -> Tensor:
        return self.layers(video)  # (B, 1, ~T/2^n, ~H/2^n - 2, ~W/2^n - 2)
