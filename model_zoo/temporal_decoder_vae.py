"""VidRD's temporal-aware decoder: a frame-wise image VAE whose decoder learns time.

Gu et al., "Reuse and Diffuse: Iterative Denoising for Text-to-Video Generation" (2023).
The image VAE is diffusers' `AutoencoderKL` in Stable Diffusion's layout. After every ResNet
block of its decoder a temporal convolution (kernel 3 over time, the shared `TemporalConv`) is
added in a residual branch whose convolution is zero-initialised, so at initialisation `decode` equals the
image decoder applied frame by frame, bit for bit. The image VAE is frozen; only the temporal
branches train (`trainable_parameter_names()` lists them).

See docs/methods.md, 'VidRD: temporal-aware decoder'.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from einops import rearrange
from safetensors.torch import load_file
from torch import Tensor, nn

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

from model_zoo.layers.gaussian_posterior import DiagonalGaussian, LatentScalingMixin
from model_zoo.layers.resnet import TemporalConv
from model_zoo.pretrained import PretrainedMixin
from model_zoo.registry import register_family

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


@dataclass(frozen=True, kw_only=True)
class TemporalDecoderVAEConfig:
    in_channels: int = 3
    """Pixel channels."""
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    """`AutoencoderKL` block widths; len - 1 spatial halvings (4 blocks: H/8)."""
    layers_per_block: int = 2
    """ResNet blocks per encoder block (the decoder has one more)."""
    latent_channels: int = 4
    """Channels of the frame latents."""
    norm_num_groups: int = 32
    """GroupNorm groups of the image VAE and of the temporal branches."""
    scale_factor: float = 0.18215
    """Diffusion latents are `(z - shift_factor) * scale_factor` (SD 1.x/2.x: 0.18215)."""
    shift_factor: float = 0.0
    """See `scale_factor`."""
    pretrained_path: str | None = None
    """Local diffusers `AutoencoderKL` folder (config.json + diffusion_pytorch_model.safetensors)
    whose weights initialise the image VAE. Consumed at build time: the built model's config
    has it reset to None, because its own saved weights then contain the image VAE."""


FLAVORS = {
    "tiny": dict(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8),
    # Stable Diffusion 1.x / 2.x VAE (diffusers `AutoencoderKL` config of those checkpoints):
    # TemporalDecoderVAEConfig's defaults.
    "sd": {},
}


def _image_vae(config: TemporalDecoderVAEConfig) -> AutoencoderKL:
    from diffusers import AutoencoderKL  # imported here: diffusers costs seconds at import time

    blocks = len(config.block_out_channels)
    return AutoencoderKL(
        in_channels=config.in_channels,
        out_channels=config.in_channels,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        latent_channels=config.latent_channels,
        norm_num_groups=config.norm_num_groups,
    )


def _load_image_vae(vae: AutoencoderKL, folder: str) -> None:
    weights = Path(folder) / DIFFUSERS_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(
            f"{weights}: no diffusers AutoencoderKL weights (expected {DIFFUSERS_WEIGHTS})"
        )
    state = load_file(str(weights))
    expected = vae.state_dict()
    mismatched = sorted(state.keys() ^ expected.keys()) + [
        k for k in state.keys() & expected.keys() if state[k].shape != expected[k].shape
    ]
    if mismatched:
        raise ValueError(
            f"{weights} does not fit the configured AutoencoderKL (check block_out_channels, "
            f"layers_per_block, latent_channels); first mismatched keys: {mismatched[:5]}"
        )
    vae.load_state_dict(state)


@register_family("temporal_decoder_vae", TemporalDecoderVAEConfig, FLAVORS)
class TemporalDecoderVAE(LatentScalingMixin, PretrainedMixin, nn.Module):
    """Frame-wise KL autoencoder: video (B, 3, T, H, W) <-> latents (B, 4, T, H/8, W/8)."""

    def __init__(self, config: TemporalDecoderVAEConfig) -> None:
        super().__init__()
        self.vae = _image_vae(config)
        if config.pretrained_path is not None:
            _load_image_vae(self.vae, config.pretrained_path)
        self.config = dataclasses.replace(config, pretrained_path=None)
        self.vae.requires_grad_(False)
        decoder = self.vae.decoder
        groups = config.norm_num_groups
        self.mid_temporal = nn.ModuleList(
            TemporalConv(r.conv2.out_channels, groups=groups) for r in decoder.mid_block.resnets
        )
        self.up_temporal = nn.ModuleList(
            nn.ModuleList(TemporalConv(r.conv2.out_channels, groups=groups) for r in block.resnets)
            for block in decoder.up_blocks
        )

    @property
    def downsample_factors(self) -> tuple[int, int, int]:
        """(time, height, width) factors from video to latents: frame-wise, each block but the
        last of the image encoder halves height and width."""
        spatial = 2 ** (len(self.config.block_out_channels) - 1)
        return (1, spatial, spatial)

    def encode(self, video: Tensor) -> DiagonalGaussian:
        frames = rearrange(video, "b c t h w -> (b t) c h w")
        moments = self.vae.quant_conv(self.vae.encoder(frames))  # (B*T, 2 C_z, H/8, W/8)
        return DiagonalGaussian(rearrange(moments, "(b t) c h w -> b c t h w", t=video.shape[2]))

    def decode(self, z: Tensor) -> Tensor:
        """Latents (B, C_z, T, h, w) -> video (B, 3, T, 8h, 8w).

        Runs the diffusers decoder's own submodules in its order (conv_in, mid block, up
        blocks, output head) with a temporal branch after each ResNet block.
        """
        num_frames = z.shape[2]
        decoder = self.vae.decoder
        h = self.vae.post_quant_conv(rearrange(z, "b c t h w -> (b t) c h w"))  # (B*T, C_z, h, w)
        h = decoder.conv_in(h)  # (B*T, C_top, h, w)
        mid = decoder.mid_block
        h = _with_temporal(mid.resnets[0], self.mid_temporal[0], h, num_frames)
        for attention, resnet, temporal in zip(mid.attentions, mid.resnets[1:], self.mid_temporal[1:]):
            h = attention(h) if attention is not None else h
            h = _with_temporal(resnet, temporal, h, num_frames)
        for block, temporals in zip(decoder.up_blocks, self.up_temporal):
            for resnet, temporal in zip(block.resnets, temporals):
                h = _with_temporal(resnet, temporal, h, num_frames)
            for upsampler in block.upsamplers or []:
                h = upsampler(h)  # (B*T, C, 2H, 2W)
        frames = decoder.conv_out(decoder.conv_act(decoder.conv_norm_out(h)))  # (B*T, 3, H, W)
        return rearrange(frames, "(b t) c h w -> b c t h w", t=num_frames)

    def forward(
        self, video: Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[Tensor, DiagonalGaussian]:
        posterior = self.encode(video)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()  # (B, C_z, T, h, w)
        return self.decode(z), posterior

    def contract_output(self, video: Tensor) -> Tensor:
        """The deterministic reconstruction (posterior mode), for the generic contract test."""
        return self(video, sample_posterior=False)[0]

    def trainable_parameter_names(self) -> list[str]:
        """Names of the parameters that train: the temporal branches only."""
        return [name for name, p in self.named_parameters() if p.requires_grad]

    def checkpoint_modules(self) -> list[nn.Module]:
        return [m for m in self.modules() if isinstance(m, TemporalConv)]


def _with_temporal(resnet: nn.Module, temporal: TemporalConv, frames: Tensor, num_frames: int) -> Tensor:
    """A frozen image ResNet block followed by its residual temporal convolution (0 at init)."""
    h = resnet(frames, None)  # (B*T, C, H, W)
    return h + temporal(h, num_frames)
