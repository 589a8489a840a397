"""LVDM long-video sampling (He et al. 2022, §3.3-3.4, Fig. 3; docs/methods.md §6.1) in latent
space: what its two strategies share, a clip sampled with some frames given under a mask.

- Autoregressive (`lvdm_autoregressive`): the first clip unconditionally, then each clip
  conditioned (mask 1) on the last k latent frames of the video so far, perturbed to level s,
  with unconditional guidance ε̃ = ε_c + w(ε_c - ε_u); each clip adds l - k frames.
- Hierarchical (`lvdm_hierarchical`): the prediction model makes sparse keyframes
  autoregressively (keyframe stride = interpolation clip length - 1); the interpolation model
  fills each gap between two consecutive keyframes with both ends masked. Gaps are independent
  units of work.

The network is called as `predict_fn(net_input, t, perturb_level)` with net_input the mask-
conditioned input (B, C+1, l, h, w) of `objectives.apply_mask_conditioning` and perturb_level
an int64 (B,) tensor, or None for the unconditional branch (all masks zero). The pipeline's
binding (`sampler.denoisers.lvdm_predict_fn`) turns None into the "no condition" level class
that training gave every sample without a mask, so ε_u is a state the network was trained in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from model_zoo.diffusion.guidance import Guide, cfg, unconditional_guidance
from model_zoo.diffusion.objectives import apply_mask_conditioning, perturb_condition
from model_zoo.diffusion.samplers import DenoiseFn
from sampler.strategies.common import SamplingSetup, clip_noise, run_sampler

MaskedPredictFn = Callable[[Tensor, Tensor, Tensor | None], Tensor]
"""`predict_fn(net_input (B, C+1, l, h, w), t (B,), perturb_level (B,) | None) -> ε (B, C, l, h, w)`."""


@dataclass(frozen=True, kw_only=True)
class LVDMConfig:
    """LVDM's autoregressive knobs (the defaults of its long-video sampling script)."""

    clip_frames: int = field(default=4, metadata={"alias": "--N"})
    """l: latent frames per clip of the prediction model (its temporal length)."""
    cond_frames: int = field(default=1, metadata={"alias": "--k"})
    """k: latent frames a prediction clip is conditioned on (LVDM's T_cond)."""
    perturb_level: int = field(default=100, metadata={"alias": "--s"})
    """s: the conditioning latents are q_sample'd to timestep s and s is fed to the network."""
    uncond_weight: float = field(default=0.1, metadata={"alias": "--w"})
    """w of unconditional guidance ε_c + w(ε_c - ε_u); 0 disables the unconditional branch."""


def _masked_denoiser(
    predict_fn: MaskedPredictFn,
    z_cond: Tensor,
    mask: Tensor,
    perturb_level: int,
    guidance_weight: float,
    guide: Guide,
) -> DenoiseFn:
    """ε̃(x, t) for a clip whose frames with mask 1 are given as `z_cond` (already perturbed)."""
    zero_mask = torch.zeros_like(mask)

    def unconditional(x: Tensor, t: Tensor) -> Tensor:
        return predict_fn(apply_mask_conditioning(x, torch.zeros_like(x), zero_mask), t, None)

    def conditional(x: Tensor, t: Tensor) -> Tensor:
        level = torch.full_like(t, perturb_level)
        return predict_fn(apply_mask_conditioning(x, z_cond, mask), t, level)

    if not mask.any():
        return unconditional
    if guidance_weight == 0:
        return conditional
    return unconditional_guidance(conditional, unconditional, guidance_weight, guide)


def sample_masked_clip(
    predict_fn: MaskedPredictFn,
    given: Tensor,
    mask: Tensor,
    *,
    setup: SamplingSetup,
    config: LVDMConfig,
    generator: torch.Generator,
    guide: Guide = cfg,
) -> Tensor:
    """One clip (B, C, l, h, w) with the frames where `mask` (l,) is 1 conditioned on `given`.

    `given` (B, C, l, h, w) holds clean latents at masked frames (anything elsewhere); they are
    perturbed to level s (LVDM's conditional latent perturbation) before conditioning. `guide`
    combines the conditional and unconditional branches (see `guidance.Guide`).
    """
    num_frames = mask.numel()
    x_T = clip_noise(setup, num_frames, generator)
    perturbation = clip_noise(setup, num_frames, generator)
    z_cond = perturb_condition(given, config.perturb_level, perturbation, setup.alphas_cumprod)
    denoiser = _masked_denoiser(
        predict_fn, z_cond, mask.to(x_T), config.perturb_level, config.uncond_weight, guide
    )
    return run_sampler(denoiser, x_T, setup, generator)
