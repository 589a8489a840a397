"""VideoFusion: decomposed diffusion with a shared base noise and per-frame residual noise.

Luo et al., "VideoFusion: Decomposed Diffusion Models for High-Quality Video Generation"
(CVPR 2023). The noise of frame i is `eps_i = sqrt(λ)·b + sqrt(1-λ)·r_i` with one base noise
b per clip (`DecomposedNoise`). A base generator (an image network: a `unet3d` without
temporal layers, run on the middle frame as a 1-frame clip) predicts b from
`z_t^{⌊N/2⌋}`; a residual generator (a video `unet3d` whose per-frame embedding adds a learned
frame-index embedding to the timestep embedding) predicts r_i from the latent with the estimated
base component removed, `z_t^i - sqrt(1-ᾱ_t)·sqrt(λ)·b̂`. The joint prediction is
`sqrt(λ)·b̂ + sqrt(1-λ)·r̂_i`. Wherever b̂ enters frame i ≠ ⌊N/2⌋ (its ε term and its slot of
the residual generator's input) it is detached, so the base generator learns through the middle
frame's slot only (the paper's stop-gradient). The forward takes ᾱ_t (`alpha_bar`) because
the base removal is scaled by the noise level.

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
    """The image network (base generator); its temporal layers must be off."""
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
        if config.base.temporal_conv or config.base.temporal_attention:
            raise ValueError(
                "VideoFusion: the base generator is an image network: set base.temporal_conv and base.temporal_attention false"
            )
        self.config = config
        self.noise = DecomposedNoise(config.lam)
        self.base = UNet3D(config.base)
        self.residual = UNet3D(config.residual)
        emb_dim = self.residual.time_embed.mlp[-1].out_features
        self.frame_embed = nn.Embedding(config.max_frames, emb_dim)
        nn.init.normal_(self.frame_embed.weight, std=0.02)

    def predict_base(
        self, z_t: Tensor, t: Tensor, *, context: Tensor | None = None, context_mask: Tensor | None = None
    ) -> Tensor:
        """b̂ from the middle frame: z_t (B, C, T, H, W) -> (B, C, 1, H, W)."""
        middle = z_t.shape[2] // 2
        return self.base(z_t[:, :, middle : middle + 1], t, context=context, context_mask=context_mask)  # (B, C, 1, H, W)

    def remove_base(self, z_t: Tensor, base: Tensor, alpha_bar: Tensor) -> Tensor:
        """The residual generator's input z_t^i - sqrt(1-ᾱ_t)·sqrt(λ)·b̂: z_t (B, C, T, H, W), base
        (B, C, 1 or T, H, W), alpha_bar (B,) -> (B, C, T, H, W)."""
        noise_std = (1.0 - alpha_bar).sqrt().view(-1, 1, 1, 1, 1).to(z_t)
        return z_t - noise_std * math.sqrt(self.config.lam) * base

    def predict_residual(
        self, residual_input: Tensor, t: Tensor, *, context: Tensor | None = None, context_mask: Tensor | None = None
    ) -> Tensor:
        """r̂_i for every frame, given frame i's index: the base-removed latent (B, C, T, H, W) -> (B, C, T, H, W)."""
        num_frames = residual_input.shape[2]
        if num_frames > self.config.max_frames:
            raise ValueError(f"clip of {num_frames} frames exceeds max_frames={self.config.max_frames}")
        frame_index = torch.arange(num_frames, device=residual_input.device)
        emb = self.residual.time_embedding(t)[:, None] + self.frame_embed(frame_index)[None]  # (B, T, D)
        h, skips = self.residual.encode(residual_input, emb, context, context_mask)
        return self.residual.decode(h, skips, emb, context, context_mask)  # (B, C, T, H, W)

    def forward(
        self,
        z_t: Tensor,
        t: Tensor,
        *,
        alpha_bar: Tensor,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> Tensor:
        """Predicted ε (B, C, T, H, W) of z_t at timesteps t (B,) with ᾱ_t = alpha_bar (B,);
        context_mask (B, L) bool marks the real text tokens (None: all).

        b̂ keeps its gradient in frame ⌊T/2⌋'s slots only (its ε term and its residual input)."""
        num_frames = z_t.shape[2]
        base = self.predict_base(z_t, t, context=context, context_mask=context_mask)  # (B, C, 1, H, W)
        keep = torch.zeros(num_frames, device=z_t.device, dtype=z_t.dtype)
        keep[num_frames // 2] = 1.0
        keep = keep.view(1, 1, num_frames, 1, 1)
        base_per_frame = keep * base + (1.0 - keep) * base.detach()  # (B, C, T, H, W), same values
        residual = self.predict_residual(
            self.remove_base(z_t, base_per_frame, alpha_bar), t, context=context, context_mask=context_mask
        )
        return self.noise.combine(base_per_frame, residual)

    def load_base(self, image_model: nn.Module, source: str) -> None:
        """Initialise the base generator from an image network (`source` names it in errors)."""
        if getattr(image_model, "family", None) != "unet3d":
            raise ValueError(
                f"{source}: the base generator starts from a unet3d image network, not {getattr(image_model, 'family', type(image_model).__name__)!r}"
            )
        expected, given = self.base.state_dict(), image_model.state_dict()
        mismatched = sorted(expected.keys() ^ given.keys()) + [
            key for key in expected.keys() & given.keys() if expected[key].shape != given[key].shape
        ]
        if mismatched:
            raise ValueError(
                f"{source}: its weights do not fit the base generator; first mismatched keys: {mismatched[:5]}"
            )
        self.base.load_state_dict(given)

    def example_inputs(self, x: Tensor) -> dict[str, Tensor]:
        """Forward keyword arguments for a sample input: timesteps, text tokens when used, and a
        stand-in ᾱ_t = 1 - t/1000 (any value in (0, 1) that falls with t serves a shape test)."""
        inputs = {
            key: value for key, value in self.residual.example_inputs(x).items() if key in ("t", "context")
        }
        return {**inputs, "alpha_bar": 1.0 - inputs["t"].float() / 1000.0}

    def example_input(self, batch_size: int = 2, num_frames: int = 4, size: int = 16) -> Tensor:
        return self.residual.example_input(batch_size, num_frames, size)

    def checkpoint_modules(self) -> list[nn.Module]:
        return self.base.checkpoint_modules() + self.residual.checkpoint_modules()
