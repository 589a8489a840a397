"""The diagonal-Gaussian posterior of a KL autoencoder, and latent scaling shared by the VAEs.

Kingma & Welling (2014); the LDM autoencoders (Rombach et al., 2022) predict `2·C` moment
channels (mean, log-variance) and diffusion runs on `(z - shift_factor) · scale_factor`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

LOGVAR_RANGE = (-30.0, 20.0)


class DiagonalGaussian:
    """`q(z | x) = N(mean, diag(exp(logvar)))` from moments `(B, 2C, ...)` split along channels."""

    def __init__(self, moments: Tensor) -> None:
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(*LOGVAR_RANGE)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None) -> Tensor:
        """A reparameterised draw `mean + std · eps` (differentiable in mean and std).

        With a list of generators, one per batch element, element i's `eps` comes from the i-th:
        each element's draw then depends on its own generator only, not on the batch around it.
        """
        if isinstance(generator, list):
            if len(generator) != self.mean.shape[0]:
                raise ValueError(f"{len(generator)} generators for a batch of {self.mean.shape[0]}")
            noise = torch.stack([self._noise(self.mean.shape[1:], each) for each in generator])
        else:
            noise = self._noise(self.mean.shape, generator)
        return self.mean + self.std * noise

    def _noise(self, shape: torch.Size, generator: torch.Generator | None) -> Tensor:
        return torch.randn(shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per sample, summed over all non-batch dimensions: shape (B,)."""
        per_element = self.mean.square() + self.logvar.exp() - 1.0 - self.logvar
        return 0.5 * per_element.flatten(1).sum(dim=1)


class LatentScalingMixin:
    """`to_latents` / `from_latents` for a VAE with `encode`, `decode` and a config holding
    `scale_factor` and `shift_factor`: diffusion latents are `(z - shift) · scale`. Each VAE also
    declares `downsample_factors`, its (time, height, width) factors from video to latents."""

    config: Any
    downsample_factors: tuple[int, int, int]
    encode: Any
    decode: Any

    @property
    def latent_channels(self) -> int:
        """Channels of the diffusion latents."""
        return self.config.latent_channels

    def to_latents(
        self, video: Tensor, generator: torch.Generator | list[torch.Generator] | None = None
    ) -> Tensor:
        """Video (B, 3, T, H, W) in [-1, 1] -> scaled, shifted posterior sample for diffusion
        (`generator`: one, or one per clip, as `DiagonalGaussian.sample` takes it)."""
        z = self.encode(video).sample(generator)
        return (z - self.config.shift_factor) * self.config.scale_factor

    def from_latents(self, latents: Tensor) -> Tensor:
        """Diffusion latents -> decoded video (B, 3, T, H, W)."""
        return self.decode(latents / self.config.scale_factor + self.config.shift_factor)
