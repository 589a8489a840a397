"""VideoFusion: decomposed diffusion with a shared base noise and per-frame residual noise.

Luo et al., "VideoFusion: Decomposed Diffusion Models for High-Quality Video Generation"
(CVPR 2023). The noise of frame i is `eps_i = sqrt(λ)·b + sqrt(1-λ)·r_i` with one base noise
b per clip (`DecomposedNoise`). A base generator (an image network: a `unet3d` without
temporal layers, run on the middle frame as a 1-frame clip) predicts b from
`z_t^{⌊N/2⌋}`; a residual generator (a video `unet3d` whose per-frame embedding adds a learned
frame-index embedding to the timestep embedding) predicts r_i. The joint prediction is
`sqrt(λ)·b̂ + sqrt(1-λ)·r̂_i`, with the base prediction's gradient kept only at frame ⌊N/2⌋.
Simplification: the residual generator sees z_t itself, not z_t with the estimated base noise
removed; sampling code can still remove b̂ first and r̂ second with `predict_base` /
`predict_residual`.

See docs/methods.md, 'VideoFusion: decomposed noise' and 'VideoFusion: base and residual
generators'.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from model_zoo import unet3d
from model_zoo.pretrained import PretrainedMixin
from model_zoo.registry import register_family
from model_zoo.unet3d import UNet3D, UNet3DConfig


class DecomposedNoise:
    """Sampler of VideoFusion's decomposed noise, `eps_i = sqrt(lam)·b + sqrt(1-lam)·r_i`.

    b, r_i ~ N(0, I), so every frame's noise is marginally N(0, I) and two frames of a clip
    have correlation `lam`.
    """

    def __init__(self, lam: float) -> None:
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam must be in [0, 1], got {lam}")
        self.lam = lam

    def combine(self, base: Tensor, residual: Tensor) -> Tensor:
        """base (B, C, 1, H, W) + residual (B, C, T, H, W) -> eps (B, C, T, H, W)."""
        return math.sqrt(self.lam) * base + math.sqrt(1.0 - self.lam) * residual

    def sample(
        self,
        shape: tuple[int, int, int, int, int],
        generator: torch.Generator | None = None,
        *,
        base: Tensor | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Noise for a (B, C, T, H, W) clip -> (eps, base (B, C, 1, H, W), residual (B, C, T, H, W)).

        Pass `base` to keep the base noise of an earlier window (long videos) and redraw only
        the residuals.
        """
        b, c, _, h, w = shape
        if base is None:
            base = torch.randn((b, c, 1, h, w), generator=generator, device=device)
        residual = torch.randn(shape, generator=generator, device=base.device, dtype=base.dtype)
        return self.combine(base, residual), base, residual


@dataclass(frozen=True, kw_only=True)
class VideoFusionConfig:
    base: UNet3DConfig = UNet3DConfig()
    """The image network (base generator); its temporal layers should be off."""
    residual: UNet3DConfig = UNet3DConfig()
    """The video network (residual generator)."""
    lam: float = 0.5
    """λ: share of the noise variance that is common to all frames of a clip."""
    max_frames: int = 64
    """Frames with their own learned frame-index embedding (clip length upper bound)."""

    @property
    def in_channels(self) -> int:
        return self.residual.in_channels

    @property
    def out_channels(self) -> int:
        return self.residual.out_channels


def _generator(name: str, *, video: bool) -> UNet3DConfig:
    # No perturbation-level embedding (LVDM's s); the image network has no temporal layers.
    temporal = dict(temporal_conv=video, temporal_attention=video)
    return UNet3DConfig(**{**unet3d.FLAVORS[name], "num_levels": 0, **temporal})


FLAVORS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        base=_generator("tiny", video=False), residual=_generator("tiny", video=True), max_frames=16
    ),
    # Text-to-video at the LVDM t2v size for both generators (the paper pairs a pretrained
    # image model with a video model of similar size).
    "paper": dict(base=_generator("lvdm-t2v", video=False), residual=_generator("lvdm-t2v", video=True)),
}


@register_family("videofusion", VideoFusionConfig, FLAVORS)
class VideoFusion(PretrainedMixin, nn.Module):
    """Base + residual generators; forward(z_t, t, context) -> predicted eps per frame."""

    def __init__(self, config: VideoFusionConfig) -> None:
        super().__init__()
        if (
            config.base.in_channels != config.residual.in_channels
            or config.base.out_channels != config.residual.out_channels
        ):
            raise ValueError("VideoFusion: base and residual generators must share in/out channels")
        self.config = config
        self.noise = DecomposedNoise(config.lam)
        self.base = UNet3D(config.base)
        self.residual = UNet3D(config.residual)
        emb_dim = self.residual.time_embed.mlp[-1].out_features
        self.frame_embed = nn.Embedding(config.max_frames, emb_dim)
        nn.init.normal_(self.frame_embed.weight, std=0.02)

    def predict_base(self, z_t: Tensor, t: Tensor, *, context: Tensor | None = None) -> Tensor:
        """b̂ from the middle frame: z_t (B, C, T, H, W) -> (B, C, 1, H, W)."""
        middle = z_t.shape[2] // 2
        return self.base(z_t[:, :, middle : middle + 1], t, context=context)  # (B, C, 1, H, W)

    def predict_residual(self, z_t: Tensor, t: Tensor, *, context: Tensor | None = None) -> Tensor:
        """r̂_i for every frame: z_t (B, C, T, H, W) -> (B, C, T, H, W)."""
        num_frames = z_t.shape[2]
        if num_frames > self.config.max_frames:
            raise ValueError(f"clip of {num_frames} frames exceeds max_frames={self.config.max_frames}")
        frame_index = torch.arange(num_frames, device=z_t.device)
        emb = self.residual.time_embedding(t)[:, None] + self.frame_embed(frame_index)[None]  # (B, T, D)
        h, skips = self.residual.encode(z_t, emb, context)
        return self.residual.decode(h, skips, emb, context)  # (B, C, T, H, W)

    def forward(self, z_t: Tensor, t: Tensor, *, context: Tensor | None = None) -> Tensor:
        """Predicted eps (B, C, T, H, W); the base prediction keeps its gradient at frame ⌊T/2⌋ only."""
        num_frames = z_t.shape[2]
        base = self.predict_base(z_t, t, context=context)  # (B, C, 1, H, W)
        keep = torch.zeros(num_frames, device=z_t.device, dtype=z_t.dtype)
        keep[num_frames // 2] = 1.0
        keep = keep.view(1, 1, num_frames, 1, 1)
        base_per_frame = keep * base + (1.0 - keep) * base.detach()  # (B, C, T, H, W), same values
        return self.noise.combine(base_per_frame, self.predict_residual(z_t, t, context=context))

    def example_inputs(self, x: Tensor) -> dict[str, Tensor]:
        """Forward keyword arguments for a sample input: timesteps and text tokens when used."""
        inputs = self.residual.example_inputs(x)
        return {key: value for key, value in inputs.items() if key in ("t", "context")}

    def example_input(self, batch_size: int = 2, num_frames: int = 4, size: int = 16) -> Tensor:
        return self.residual.example_input(batch_size, num_frames, size)

    def checkpoint_modules(self) -> list[nn.Module]:
        return self.base.checkpoint_modules() + self.residual.checkpoint_modules()
