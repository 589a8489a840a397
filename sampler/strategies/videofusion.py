"""`--strategy videofusion`: windows that share one base noise (Luo et al. 2023, §3.1-3.2;
docs/methods.md, 'VideoFusion: long videos').

Every window of N frames starts from z_T^i = √λ b + √(1-λ) r_i (`model_zoo.videofusion.
DecomposedNoise`), with one base noise b for the whole video and fresh residual noise r_i per
window, so windows share their content-defining component; with η > 0 every DDIM step's fresh
noise is decomposed the same way, its base part shared by the windows too. Given the base
noises, windows are independent
units of work; the denoiser is the VideoFusion network told ᾱ_t at every call
(`videofusion_denoiser`), whose base generator removes √(1-ᾱ_t)·√λ·b̂ before its residual
generator runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from model_zoo.diffusion.guidance import Guide, cfg
from model_zoo.diffusion.samplers import DenoiseFn, ddim, standard_normal_like
from model_zoo.videofusion import DecomposedNoise
from sampler.denoisers import conditioned_denoiser, counted
from sampler.distributed import branch_parallel_guide
from sampler.job import VideoJob
from sampler.pipeline import Pipeline
from sampler.strategies.common import SamplingSetup, clip_noise
from sampler.strategies.seeding import unit_generator
from sampler.work import State, run_chunks_to_video


@dataclass(frozen=True, kw_only=True)
class VideoFusionConfig:
    """VideoFusion's windowed sampling knobs."""

    clip_frames: int = field(default=16, metadata={"alias": "--N"})
    """N: latent frames per window (the model's temporal length)."""
    lam: float | None = field(default=None, metadata={"alias": "--lambda"})
    """λ in [0, 1]: share of the noise variance in the base noise; None: the λ the model was trained with."""


def with_model_lam(config: VideoFusionConfig, model_lam: float) -> VideoFusionConfig:
    """`config` with λ set: its own, else the model's."""
    return config if config.lam is not None else replace(config, lam=model_lam)


def videofusion_denoiser(
    pipeline: Pipeline, prompt: str, guidance: float, alphas_cumprod: Tensor, guide: Guide = cfg
) -> DenoiseFn:
    """The VideoFusion network with the prompt, text CFG and ᾱ_t of each call's timesteps bound."""
    model = pipeline.denoiser

    def scheduled(x: Tensor, t: Tensor, **text: Tensor) -> Tensor:
        alpha_bar = alphas_cumprod.to(t.device)[t]  # (B,)
        return model(x, t, **text, alpha_bar=alpha_bar)

    return conditioned_denoiser(scheduled, pipeline, prompt, guidance, guide)


def base_noise(setup: SamplingSetup, seed: int) -> Tensor:
    """The video's one base noise b ~ N(0, I), shape (B, C, 1, h, w)."""
    return clip_noise(setup, 1, unit_generator(seed, "videofusion-base"))


def window_residual_noise(
    window_index: int, *, setup: SamplingSetup, config: VideoFusionConfig, seed: int
) -> tuple[Tensor, torch.Generator]:
    """The residual noise r (B, C, N, h, w) of window `window_index`, drawn anew for each window,
    and the window's generator (which then serves its η > 0 steps)."""
    generator = unit_generator(seed, "videofusion-window", window_index)
    return clip_noise(setup, config.clip_frames, generator), generator


def required_lam(config: VideoFusionConfig) -> float:
    """λ of `config`; an error when it is unset."""
    if config.lam is None:
        raise ValueError("VideoFusion sampling needs λ: set it, or take the model's (`with_model_lam`)")
    return config.lam


def window_initial_noise(
    base: Tensor, window_index: int, *, setup: SamplingSetup, config: VideoFusionConfig, seed: int
) -> tuple[Tensor, torch.Generator]:
    """z_T = √λ·b + √(1-λ)·r of window `window_index` (the shared b, its own r) and its generator."""
    residual, generator = window_residual_noise(window_index, setup=setup, config=config, seed=seed)
    return DecomposedNoise(required_lam(config)).combine(base, residual), generator


def step_base_noise(setup: SamplingSetup, seed: int, step_index: int) -> Tensor:
    """The base part b_k (B, C, 1, h, w) of DDIM step k's η > 0 noise: one per video and step."""
    return clip_noise(setup, 1, unit_generator(seed, "videofusion-step-base", step_index))


def window_step_noise(
    lam: float, generator: torch.Generator, *, setup: SamplingSetup, seed: int
) -> Callable[[int, Tensor], Tensor]:
    """η > 0: the fresh noise of DDIM step k of a window, √λ·b_k + √(1-λ)·r_k, decomposed like the
    forward process's noise (so the marginals keep their inter-frame correlation λ): b_k is the
    video's (`step_base_noise`, the same in every window), r_k a draw from the window's generator."""
    noise = DecomposedNoise(lam)

    def draw(step_index: int, x: Tensor) -> Tensor:
        residual = standard_normal_like(x, generator)
        return noise.combine(step_base_noise(setup, seed, step_index), residual)

    return draw


def sample_window(
    denoise_fn: DenoiseFn,
    base: Tensor,
    window_index: int,
    *,
    setup: SamplingSetup,
    config: VideoFusionConfig,
    seed: int,
) -> Tensor:
    """One window (B, C, N, h, w) from the shared base noise and its own residual noise."""
    z_T, generator = window_initial_noise(base, window_index, setup=setup, config=config, seed=seed)
    return ddim(
        denoise_fn,
        z_T,
        setup.timesteps,
        alphas_cumprod=setup.alphas_cumprod,
        parameterization=setup.parameterization,
        eta=setup.eta,
        final_alpha_cumprod=setup.final_alpha_cumprod,
        step_noise=window_step_noise(required_lam(config), generator, setup=setup, seed=seed),
    )


def videofusion(
    denoise_fn: DenoiseFn,
    *,
    num_frames: int,
    setup: SamplingSetup,
    config: VideoFusionConfig,
    seed: int,
) -> Tensor:
    """A long latent video (B, C, num_frames, h, w): ⌈num_frames / N⌉ windows sharing b, concatenated."""
    base = base_noise(setup, seed)
    windows = [
        sample_window(denoise_fn, base, index, setup=setup, config=config, seed=seed)
        for index in range(math.ceil(num_frames / config.clip_frames))
    ]
    return torch.cat(windows, dim=2)[:, :, :num_frames]


def run(job: VideoJob, config: VideoFusionConfig) -> None:
    """The windows in order, each a resumable unit (b is recomputed from the seed), into the mp4."""
    if job.setup.sampler != "ddim":
        raise ValueError(
            f"--strategy videofusion steps with DDIM (its step noise is decomposed too); --sampler {job.setup.sampler} is not offered"
        )
    config = with_model_lam(config, job.pipeline.denoiser.config.lam)
    guide = branch_parallel_guide(job.world)
    denoiser = videofusion_denoiser(
        job.pipeline, job.prompt, job.config.guidance, job.setup.alphas_cumprod, guide
    )
    denoise = counted(denoiser, job.tick_steps())
    base = base_noise(job.setup, job.seed)

    def step(index: int, state: State | None) -> tuple[Tensor, State]:
        return sample_window(denoise, base, index, setup=job.setup, config=config, seed=job.seed), {}

    run_chunks_to_video(job, "chunk", step, math.ceil(job.latent_frames / config.clip_frames))
