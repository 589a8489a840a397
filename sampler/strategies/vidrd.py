"""`--strategy vidrd`: "Reuse and Diffuse" (Gu et al. 2023, §2.3; docs/methods.md §6.2), clip-by-clip
long-video latents.

Clip i has N frames z^{i,0..N-1}; the first M are guided by clip i-1 (superscripts as in the paper):
- FNR (frame-level noise reversion): z_T^{i,j} = z_T^{i-1,N-j-1} for j < M.
- PNS (past-dependent noise sampling), j >= M: z_T^{i,j} = α/√(1+α²) z_T^{i-1,N-j-1} + ε,
  ε ~ N(0, I/(1+α²)), so every z_T^{i,j} stays N(0, I).
- DSG (denoising with staged guidance), j < M: z_{t-1}^{i,j} = z_{t-1}^{i-1,N-j-1} while
  t > (1-β)T + βTj/M, with t = T..1 counting DDIM steps, i.e. during the first (M-j)(T/M)β steps;
  plain DDIM steps afterwards and for j >= M.
Clip i's N frames follow clip i-1's in the video; the reversed indexing makes frame 0 of clip i
start from (and be guided longest by) the last frame of clip i-1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from model_zoo.diffusion.samplers import DenoiseFn
from sampler.denoisers import counted
from sampler.job import VideoJob
from sampler.strategies.common import SamplingSetup, clip_noise, denoise_step
from sampler.strategies.seeding import unit_generator
from sampler.work import State, run_chunks_to_video


@dataclass(frozen=True, kw_only=True)
class VidRDConfig:
    """VidRD's knobs (the defaults of its official code)."""

    clip_frames: int = field(default=8, metadata={"alias": "--N"})
    """N: latent frames per clip (the model's temporal length)."""
    overlap: int = field(default=4, metadata={"alias": "--M"})
    """M: frames of each clip guided by the previous clip (0 < M <= N)."""
    alpha: float = 4.0
    """α of PNS: how strongly a clip's initial noise follows the previous clip's (α >= 0)."""
    beta: float = 0.4
    """β of DSG in [0, 1]: the fraction of the denoising steps during which frame 0 is copied."""
    noise_reversion: bool = True
    """FNR: the first M frames start from the previous clip's reversed initial noise;
    --no-noise-reversion draws them fresh (with --alpha 0 --beta 0: naive chunking, every clip
    independent)."""

    def __post_init__(self) -> None:
        if not 0 < self.overlap <= self.clip_frames:
            raise ValueError(f"need 0 < M <= N, got M={self.overlap}, N={self.clip_frames}")


@dataclass(frozen=True, kw_only=True)
class VidRDState:
    """What clip i needs from clip i-1: a resumable per-clip state (tensors only, no generator)."""

    clip_index: int
    """Index i of the clip this state produces next."""
    initial_noise: Tensor
    """z_T^{i-1} (B, C, N, h, w): the previous clip's initial noise, for FNR and PNS."""
    guide_trajectory: Tensor
    """(S_g, B, C, M, h, w): z_{t-1}^{i-1, N-M..N-1} after each of the first S_g steps, for DSG."""


def reused_noise(previous_noise: Tensor, noise: Tensor, config: VidRDConfig) -> Tensor:
    """FNR + PNS: clip i's z_T from clip i-1's z_T and fresh N(0, I) `noise` of the same shape
    (PNS alone on every frame with --no-noise-reversion)."""
    reversed_previous = previous_noise.flip(2)  # frame j <- frame N-j-1
    alpha = config.alpha
    z_T = alpha / math.sqrt(1 + alpha**2) * reversed_previous + noise / math.sqrt(1 + alpha**2)
    if config.noise_reversion:
        z_T[:, :, : config.overlap] = reversed_previous[:, :, : config.overlap]
    return z_T


def dsg_schedule(num_steps: int, config: VidRDConfig) -> Tensor:
    """(num_steps, M) bool: entry [k, j] is True when step k (t = num_steps - k) copies frame j.

    Copy iff t > (1-β)T + βTj/M (the threshold rounded to 1e-9 so that β = 0.4, T = 50 gives
    exactly 20, 15, 10, 5 guided steps for M = 4).
    """
    t = torch.arange(num_steps, 0, -1, dtype=torch.float64).unsqueeze(1)
    j = torch.arange(config.overlap, dtype=torch.float64)
    beta = config.beta
    threshold = ((1 - beta) * num_steps + beta * num_steps * j / config.overlap).round(decimals=9)
    return t > threshold


def _guide(x: Tensor, reference_tail: Tensor, copy: Tensor) -> Tensor:
    """Overwrite frames j < M of x with reference frame N-j-1 where `copy[j]`."""
    overlap = copy.numel()
    reversed_tail = reference_tail.flip(2)  # tail frame N-j-1 -> position j
    guided = torch.where(copy.view(1, 1, overlap, 1, 1).to(x.device), reversed_tail, x[:, :, :overlap])
    return torch.cat([guided, x[:, :, overlap:]], dim=2)


def vidrd_clip(
    denoise_fn: DenoiseFn,
    state: VidRDState | None,
    *,
    setup: SamplingSetup,
    config: VidRDConfig,
    seed: int,
    callback: Callable[[int, Tensor], None] | None = None,
) -> tuple[Tensor, VidRDState]:
    """One clip (B, C, N, h, w) and the state for the next; `state=None` makes the first clip.

    `callback(step_index, x)` sees the clip's latents after every step (after DSG's copy).
    """
    clip_index = 0 if state is None else state.clip_index
    generator = unit_generator(seed, "vidrd-clip", clip_index)
    fresh = clip_noise(setup, config.clip_frames, generator)
    z_T = fresh if state is None else reused_noise(state.initial_noise, fresh, config)
    copy = dsg_schedule(setup.num_steps, config)
    guided_steps = int(copy.any(dim=1).sum())
    tail = slice(config.clip_frames - config.overlap, config.clip_frames)
    x, trajectory = z_T, []
    for step_index in range(setup.num_steps):
        x = denoise_step(denoise_fn, x, step_index, setup, generator)
        if step_index < guided_steps:
            if state is not None:
                x = _guide(x, state.guide_trajectory[step_index], copy[step_index])
            trajectory.append(x[:, :, tail])
        if callback is not None:
            callback(step_index, x)
    tail_shape = (0, *z_T[:, :, tail].shape)
    guide_trajectory = torch.stack(trajectory) if trajectory else z_T.new_zeros(tail_shape)
    return x, VidRDState(clip_index=clip_index + 1, initial_noise=z_T, guide_trajectory=guide_trajectory)


def vidrd_clips(
    denoise_fn: DenoiseFn,
    *,
    setup: SamplingSetup,
    config: VidRDConfig,
    seed: int,
    state: VidRDState | None = None,
) -> Iterator[tuple[Tensor, VidRDState]]:
    """Endless clips (each N new frames) with their states; resume by passing a saved `state`."""
    while True:
        clip, state = vidrd_clip(denoise_fn, state, setup=setup, config=config, seed=seed)
        yield clip, state


def vidrd(
    denoise_fn: DenoiseFn, *, num_frames: int, setup: SamplingSetup, config: VidRDConfig, seed: int
) -> Tensor:
    """A long latent video (B, C, num_frames, h, w): ⌈num_frames / N⌉ clips, concatenated in time."""
    num_clips = math.ceil(num_frames / config.clip_frames)
    clips = vidrd_clips(denoise_fn, setup=setup, config=config, seed=seed)
    return torch.cat([next(clips)[0] for _ in range(num_clips)], dim=2)[:, :, :num_frames]


def run(job: VideoJob, config: VidRDConfig) -> None:
    """The clips in order, each a resumable unit holding what the next clip needs (its z_T and
    the DSG guide trajectory), into the mp4."""
    denoise = counted(job.prompt_denoiser(), job.tick_steps())

    def step(index: int, state: State | None) -> tuple[Tensor, State]:
        previous = None if state is None else VidRDState(clip_index=index, **state)
        clip, new = vidrd_clip(denoise, previous, setup=job.setup, config=config, seed=job.seed)
        return clip, {"initial_noise": new.initial_noise, "guide_trajectory": new.guide_trajectory}

    run_chunks_to_video(job, "chunk", step, math.ceil(job.latent_frames / config.clip_frames))
