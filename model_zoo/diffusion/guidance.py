"""Guidance as wrappers: they take denoise functions and return a new one (never a model method).

- Text classifier-free guidance (Ho & Salimans 2022, eq. 6 rewritten):
  ε̃ = ε_u + g (ε_c - ε_u), g = 7.5-10 for text-to-video.
- LVDM's unconditional guidance (He et al. 2022, §3.4): ε̃ = ε_c + w (ε_c - ε_u), where ε_u is
  the same network with every frame mask zeroed (fed the "no condition" level class that training
  gave unmasked samples); w = 0.1 in LVDM's long-video script. It is CFG with g = 1 + w.

The wrapped functions have the `denoise_fn(x_t, t)` signature of `samplers`; bind conditioning
(text context, masks) into each branch beforehand. Guidance is linear in the model output, so it
applies unchanged to ε- and v-parameterised networks.

See docs/methods.md, 'Classifier-free guidance' and 'LVDM: unconditional guidance'.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from model_zoo.diffusion.samplers import DenoiseFn

Guide = Callable[[DenoiseFn, DenoiseFn, float], DenoiseFn]
"""`guide(denoise_fn_cond, denoise_fn_uncond, scale)`: how the two branches are combined and where
they run; `cfg` runs both in this process, the sampler's branch-parallel guide splits them over
two ranks with the same arithmetic."""


def cfg(denoise_fn_cond: DenoiseFn, denoise_fn_uncond: DenoiseFn, scale: float) -> DenoiseFn:
    """Classifier-free guidance: x, t -> u + scale · (c - u) with c, u the two branches' outputs."""

    def guided(x_t: Tensor, t: Tensor) -> Tensor:
        uncond = denoise_fn_uncond(x_t, t)
        return uncond + scale * (denoise_fn_cond(x_t, t) - uncond)

    return guided


def unconditional_guidance(
    denoise_fn_cond: DenoiseFn, denoise_fn_uncond: DenoiseFn, weight: float, guide: Guide = cfg
) -> DenoiseFn:
    """LVDM's unconditional guidance ε_c + w (ε_c - ε_u), i.e. `cfg` with scale 1 + w."""
    return guide(denoise_fn_cond, denoise_fn_uncond, 1.0 + weight)
