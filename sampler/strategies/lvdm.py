"""LVDM long-video sampling (He et al. 2022, §3.3-3.4, Fig. 3; SPEC §4) in latent space.

- Autoregressive: the first clip unconditionally, then each clip conditioned (mask 1) on the last
  k latent frames of the video so far, perturbed to level s (default 100), with unconditional
  guidance ε̃ = ε_c + w(ε_c - ε_u), w = 0.1; each clip adds l - k frames.
- Hierarchical: the prediction model makes sparse keyframes autoregressively (keyframe stride
  = interpolation clip length - 1); the interpolation model fills each gap between two
  consecutive keyframes with both ends masked. Gaps are independent units of work.

The network is called as `predict_fn(net_input, t, perturb_level)` with net_input the mask-
conditioned input (B, C+1, l, h, w) of `objectives.apply_mask_conditioning` and perturb_level
an int64 (B,) tensor, or None for the unconditional branch (all masks zero). The pipeline's
binding (`sampler.denoisers.lvdm_predict_fn`) turns None into the "no condition" level class
that training gave every sample without a mask, so ε_u is a state the network was trained in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from model_zoo.diffusion.guidance import Guide, cfg, unconditional_guidance
from model_zoo.diffusion.objectives import apply_mask_conditioning, build_mask, perturb_condition
from model_zoo.diffusion.samplers import DenoiseFn
from sampler.strategies.common import SamplingSetup, clip_noise, run_ddim
from sampler.strategies.seeding import unit_generator

MaskedPredictFn = Callable[[Tensor, Tensor, Tensor | None], Tensor]
"""`predict_fn(net_input (B, C+1, l, h, w), t (B,), perturb_level (B,) | None) -> ε (B, C, l, h, w)`."""


@dataclass(frozen=True, kw_only=True)
class LVDMConfig:
    """LVDM long-video knobs (its long-video sampling script; SPEC §3-4)."""

    clip_frames: int = 4
    """l: latent frames per clip of the prediction model (its temporal length)."""
    cond_frames: int = 1
    """k: latent frames a prediction clip is conditioned on (LVDM's T_cond)."""
    interp_clip_frames: int = 4
    """Latent frames per clip of the interpolation model; keyframe stride = this - 1."""
    perturb_level: int = 100
    """s: the conditioning latents are q_sample'd to timestep s and s is fed to the network."""
    guidance_weight: float = 0.1
    """w of unconditional guidance ε_c + w(ε_c - ε_u); 0 disables the unconditional branch."""

    @property
    def keyframe_stride(self) -> int:
        return self.interp_clip_frames - 1


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
        predict_fn, z_cond, mask.to(x_T), config.perturb_level, config.guidance_weight, guide
    )
    return run_ddim(denoiser, x_T, setup, generator)


def autoregressive_clip(
    predict_fn: MaskedPredictFn,
    context: Tensor | None,
    clip_index: int,
    *,
    setup: SamplingSetup,
    config: LVDMConfig,
    seed: int,
    guide: Guide = cfg,
) -> Tensor:
    """Clip `clip_index` (B, C, l, h, w): unconditional if `context` is None, else conditioned
    (mask 1) on the last k frames of `context`. Its first k frames are the model's outputs at the
    conditioned positions; the new frames are the last l - k (all l for the first clip)."""
    clip_frames, cond_frames = config.clip_frames, config.cond_frames
    if not 0 < cond_frames < clip_frames:
        raise ValueError(f"need 0 < k < l, got k={cond_frames}, l={clip_frames}")
    generator = unit_generator(seed, "lvdm-clip", clip_index)
    given = torch.zeros(setup.clip_shape(clip_frames), dtype=setup.dtype, device=setup.device)
    mask = torch.zeros(clip_frames)
    if context is not None:
        given[:, :, :cond_frames] = context[:, :, -cond_frames:]
        mask = build_mask("prediction", clip_frames, cond_frames)
    return sample_masked_clip(
        predict_fn, given, mask, setup=setup, config=config, generator=generator, guide=guide
    )


def autoregressive_clips(
    predict_fn: MaskedPredictFn,
    *,
    setup: SamplingSetup,
    config: LVDMConfig,
    seed: int,
    context: Tensor | None = None,
    start_clip: int = 0,
) -> Iterator[Tensor]:
    """Endless new latent frames, clip by clip: l for the first clip, then l - k per clip.

    Resume by passing the previous clip (at least its last k frames) as `context` with the
    index of the next clip as `start_clip`.
    """
    clip_index = start_clip
    while True:
        clip = autoregressive_clip(predict_fn, context, clip_index, setup=setup, config=config, seed=seed)
        new_frames = clip if context is None else clip[:, :, config.cond_frames :]
        context = clip
        clip_index += 1
        yield new_frames


def autoregressive(
    predict_fn: MaskedPredictFn, *, num_frames: int, setup: SamplingSetup, config: LVDMConfig, seed: int
) -> Tensor:
    """A long latent video (B, C, num_frames, h, w) by LVDM's autoregressive prediction."""
    clips = autoregressive_clips(predict_fn, setup=setup, config=config, seed=seed)
    frames, total = [], 0
    while total < num_frames:
        frames.append(next(clips))
        total += frames[-1].shape[2]
    return torch.cat(frames, dim=2)[:, :, :num_frames]


@dataclass(frozen=True, kw_only=True)
class HierarchicalPlan:
    """Where keyframes and gaps lie in a hierarchical generation of `num_frames` latent frames."""

    num_frames: int
    """Latent frames asked for (the assembled video is cut to this)."""
    keyframe_stride: int
    """Latent frames from one keyframe to the next."""

    @property
    def num_keyframes(self) -> int:
        return max(2, math.ceil((self.num_frames - 1) / self.keyframe_stride) + 1)

    @property
    def gaps(self) -> list[tuple[int, int]]:
        """(start, end) keyframe indices of each gap: the independent units of interpolation work."""
        return [(index, index + 1) for index in range(self.num_keyframes - 1)]


def fill_gap(
    predict_fn: MaskedPredictFn,
    key_start: Tensor,
    key_end: Tensor,
    *,
    gap_index: int,
    setup: SamplingSetup,
    config: LVDMConfig,
    seed: int,
    guide: Guide = cfg,
) -> Tensor:
    """The stride - 1 latent frames between two keyframes (B, C, 1, h, w) each, by interpolation.

    Depends only on its two keyframes and (seed, gap_index): any rank can compute any gap.
    """
    generator = unit_generator(seed, "lvdm-gap", gap_index)
    given = torch.zeros(setup.clip_shape(config.interp_clip_frames), dtype=setup.dtype, device=setup.device)
    given[:, :, :1], given[:, :, -1:] = key_start, key_end
    mask = build_mask("interpolation", config.interp_clip_frames)
    clip = sample_masked_clip(
        predict_fn, given, mask, setup=setup, config=config, generator=generator, guide=guide
    )
    return clip[:, :, 1:-1]


def assemble_hierarchical(keyframes: Tensor, fills: list[Tensor], plan: HierarchicalPlan) -> Tensor:
    """Interleave keyframes (B, C, K, h, w) and gap fills into (B, C, num_frames, h, w)."""
    pieces = []
    for (start, _), fill in zip(plan.gaps, fills, strict=True):
        pieces += [keyframes[:, :, start : start + 1], fill]
    pieces.append(keyframes[:, :, -1:])
    return torch.cat(pieces, dim=2)[:, :, : plan.num_frames]


def hierarchical(
    predict_fn: MaskedPredictFn,
    interpolate_fn: MaskedPredictFn,
    *,
    num_frames: int,
    setup: SamplingSetup,
    config: LVDMConfig,
    seed: int,
) -> Tensor:
    """LVDM's hierarchical generation in one process: keyframes, then every gap in turn."""
    plan = HierarchicalPlan(num_frames=num_frames, keyframe_stride=config.keyframe_stride)
    keyframes = autoregressive(
        predict_fn, num_frames=plan.num_keyframes, setup=setup, config=config, seed=seed
    )
    fills = [
        fill_gap(
            interpolate_fn,
            keyframes[:, :, start : start + 1],
            keyframes[:, :, end : end + 1],
            gap_index=index,
            setup=setup,
            config=config,
            seed=seed,
        )
        for index, (start, end) in enumerate(plan.gaps)
    ]
    return assemble_hierarchical(keyframes, fills, plan)
