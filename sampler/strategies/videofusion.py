"""VideoFusion long videos (Luo et al. 2023, §3.1-3.2; SPEC §2.6, §4): windows share one base noise.

Every window of N frames starts from z_T^i = √λ b + √(1-λ) r_i (`model_zoo.videofusion.
DecomposedNoise`), with one base noise b for the whole video and fresh residual noise r_i per
window, so windows share their content-defining component. Given b, windows are independent
units of work; the denoiser is the VideoFusion network (or any ε-predictor of a window).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from model_zoo.diffusion.samplers import DenoiseFn
from model_zoo.videofusion import DecomposedNoise
from sampler.strategies.common import SamplingSetup, clip_noise, run_ddim
from sampler.strategies.seeding import unit_generator


@dataclass(frozen=True, kw_only=True)
class VideoFusionWindowsConfig:
    """Windowed VideoFusion sampling knobs."""

    window_frames: int = 16
    """N: latent frames per window (the model's temporal length)."""
    base_ratio: float = 0.5
    """λ in [0, 1]: share of the noise variance in the base noise (paper default 0.5)."""


def base_noise(setup: SamplingSetup, seed: int) -> Tensor:
    """The video's one base noise b ~ N(0, I), shape (B, C, 1, h, w)."""
    return clip_noise(setup, 1, unit_generator(seed, "videofusion-base"))


def window_initial_noise(
    base: Tensor, window_index: int, *, setup: SamplingSetup, config: VideoFusionWindowsConfig, seed: int
) -> tuple[Tensor, torch.Generator]:
    """z_T of window `window_index` and the window's generator (which then serves its η > 0 steps)."""
    generator = unit_generator(seed, "videofusion-window", window_index)
    residual = clip_noise(setup, config.window_frames, generator)
    return DecomposedNoise(config.base_ratio).combine(base, residual), generator


def sample_window(
    denoise_fn: DenoiseFn,
    base: Tensor,
    window_index: int,
    *,
    setup: SamplingSetup,
    config: VideoFusionWindowsConfig,
    seed: int,
) -> Tensor:
    """One window (B, C, N, h, w) from the shared base noise and its own residual noise."""
    z_T, generator = window_initial_noise(base, window_index, setup=setup, config=config, seed=seed)
    return run_ddim(denoise_fn, z_T, setup, generator)


def videofusion(
    denoise_fn: DenoiseFn,
    *,
    num_frames: int,
    setup: SamplingSetup,
    config: VideoFusionWindowsConfig,
    seed: int,
) -> Tensor:
    """A long latent video (B, C, num_frames, h, w): ⌈num_frames / N⌉ windows sharing b, concatenated."""
    base = base_noise(setup, seed)
    windows = [
        sample_window(denoise_fn, base, index, setup=setup, config=config, seed=seed)
        for index in range(math.ceil(num_frames / config.window_frames))
    ]
    return torch.cat(windows, dim=2)[:, :, :num_frames]
