"""`--strategy ddim`: plain DDIM windows, each from its own noise, concatenated in time.

No long-video method: the baseline the other strategies are compared with (by default the whole
video is one window; see docs/methods.md §6).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from model_zoo.diffusion.samplers import DenoiseFn
from sampler.denoisers import counted
from sampler.job import VideoJob
from sampler.strategies.common import SamplingSetup, clip_noise, run_sampler
from sampler.strategies.seeding import unit_generator
from sampler.work import State, run_chunks_to_video


@dataclass(frozen=True, kw_only=True)
class DDIMConfig:
    """Plain DDIM's knobs."""

    clip_frames: int | None = field(default=None, metadata={"alias": "--N"})
    """Latent frames per window; None: the whole video in one window."""


def window_frames(config: DDIMConfig, num_frames: int) -> int:
    """Latent frames per window for a video of `num_frames` latent frames."""
    return config.clip_frames or num_frames


def sample_window(denoise_fn: DenoiseFn, index: int, num_frames: int, *, setup: SamplingSetup, seed: int) -> Tensor:
    """Window `index` (B, C, num_frames, h, w) from its own noise."""
    generator = unit_generator(seed, "ddim-window", index)
    x_T = clip_noise(setup, num_frames, generator)
    return run_sampler(denoise_fn, x_T, setup, generator)


def ddim_windows(
    denoise_fn: DenoiseFn, *, num_frames: int, setup: SamplingSetup, config: DDIMConfig, seed: int
) -> Tensor:
    """A latent video (B, C, num_frames, h, w) of independent windows, in one process."""
    frames = window_frames(config, num_frames)
    windows = [
        sample_window(denoise_fn, index, frames, setup=setup, seed=seed)
        for index in range(math.ceil(num_frames / frames))
    ]
    return torch.cat(windows, dim=2)[:, :, :num_frames]


def run(job: VideoJob, config: DDIMConfig) -> None:
    """The windows in order, each a resumable unit, into the mp4; --image conditions the first."""
    tick = job.tick_steps()
    first, rest = (counted(job.prompt_denoiser(first_window=first), tick) for first in (True, False))
    frames = window_frames(config, job.latent_frames)

    def step(index: int, state: State | None) -> tuple[Tensor, State]:
        return sample_window(rest if index else first, index, frames, setup=job.setup, seed=job.seed), {}

    run_chunks_to_video(job, "chunk", step, math.ceil(job.latent_frames / frames))
