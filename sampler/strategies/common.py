"""What every strategy shares: the sampling setup, noise of a clip's shape, one denoising step and a
whole one-window run, for ε/v/x0 models (DDIM, DPM-Solver++(2M)) and flow-matching models (flow
Euler and Heun; docs/methods.md, 'Flow matching')."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

from common.pipeline_folder import FlowSchedulerSpec
from model_zoo.diffusion.flow import (
    flow_euler_step,
    flow_forward,
    flow_heun_step,
    flow_sample,
    flow_sigmas,
    token_shift,
)
from model_zoo.diffusion.objectives import Parameterization, q_sample
from model_zoo.diffusion.samplers import (
    DenoiseFn,
    ddim,
    ddim_step,
    dpm_solver_pp_2m,
    previous_timesteps,
    standard_normal_like,
)
from sampler.pipeline import Pipeline, latent_channels, vae_factors

SamplerName = Literal["ddim", "dpmpp_2m", "euler", "heun"]
DIFFUSION_SAMPLERS = ("ddim", "dpmpp_2m")
"""Samplers of ε/v/x0 models; the first is the default."""
FLOW_SAMPLERS = ("euler", "heun")
"""Samplers of flow-matching models; the first is the default."""


@dataclass(frozen=True, kw_only=True)
class SamplingSetup:
    """The DDIM run every window of a strategy uses (DDIM, Song et al. 2021), and the latent geometry."""

    timesteps: Tensor
    """Descending timesteps, e.g. `schedules.ddim_timesteps(1000, 50)` (the usual 50 DDIM steps);
    for a flow-matching model the network's time inputs t' · T (float)."""
    alphas_cumprod: Tensor | None = None
    """ᾱ_t of the model's training schedule, shape (T,); None for a flow-matching model."""
    frame_shape: tuple[int, int, int, int]
    """(B, C, h, w) of one latent frame: batch, latent channels, latent height and width."""
    eta: float = 0.0
    """DDIM η: 0 deterministic, 1 the DDPM posterior variance (LVDM's long-video script used 1)."""
    parameterization: Parameterization = "eps"
    """What the denoiser predicts: eps, v or x0."""
    final_alpha_cumprod: float = 1.0
    """ᾱ after the last step: 1.0 (diffusers), or ᾱ_0 as LDM/LVDM's DDIM does."""
    sampler: SamplerName = "ddim"
    """ddim or dpmpp_2m (ε/v/x0 models), euler or heun (flow-matching models)."""
    sigmas: Tensor | None = None
    """Flow-matching models: the descending times t' (S + 1,), float64, ending at 0."""
    num_train_timesteps: int | None = None
    """Flow-matching models: T of the network's time input t' · T."""
    dtype: torch.dtype = torch.float32
    """Latent dtype."""
    device: str = "cpu"
    """Device of the latents; noise is always drawn on the CPU and moved, so it is device-independent."""

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def clip_shape(self, num_frames: int) -> tuple[int, int, int, int, int]:
        batch, channels, height, width = self.frame_shape
        return (batch, channels, num_frames, height, width)


    @property
    def is_flow(self) -> bool:
        return self.sigmas is not None


def pipeline_setup(
    pipeline: Pipeline,
    *,
    height: int,
    width: int,
    steps: int,
    eta: float,
    device: str,
    sampler: str | None = None,
    shift: float | None = None,
    num_frames: int = 1,
) -> SamplingSetup:
    """The run of `steps` steps of `pipeline`'s schedule with `sampler` (None: ddim for ε/v/x0
    models, euler for flow-matching ones) on its latents of height x width pixels (one video per
    batch). `shift` overrides a flow-matching export's; a shift derived from the token count
    counts `num_frames` latent frames at this size. Refuses a sampler or knob the model's
    objective does not have."""
    _, factor_h, factor_w = vae_factors(pipeline.vae)
    frame_shape = (1, latent_channels(pipeline.vae), height // factor_h, width // factor_w)
    schedule = pipeline.schedule
    if isinstance(schedule, FlowSchedulerSpec):
        chosen = check_sampler(pipeline, sampler, FLOW_SAMPLERS)
        if eta > 0:
            raise ValueError(f"--eta {eta}: {pipeline.path} is a flow-matching model, whose samplers are deterministic")
        sigmas = flow_sigmas(steps, flow_shift(schedule, shift, num_frames * frame_shape[2] * frame_shape[3]))
        return SamplingSetup(
            timesteps=sigmas[:-1] * schedule.num_train_timesteps,
            frame_shape=frame_shape,
            sampler=chosen,
            sigmas=sigmas,
            num_train_timesteps=schedule.num_train_timesteps,
            device=device,
        )
    if shift is not None:
        raise ValueError(f"--shift {shift}: {pipeline.path} is not a flow-matching model (it has no timestep shift)")
    chosen = check_sampler(pipeline, sampler, DIFFUSION_SAMPLERS)
    if chosen == "dpmpp_2m" and eta > 0:
        raise ValueError(f"--eta {eta}: DPM-Solver++(2M) is deterministic; --eta is DDIM's")
    return SamplingSetup(
        timesteps=schedule.timesteps(steps),
        alphas_cumprod=schedule.alphas_cumprod,
        frame_shape=frame_shape,
        eta=eta,
        parameterization=schedule.parameterization,
        final_alpha_cumprod=schedule.final_alpha_cumprod,
        sampler=chosen,
        device=device,
    )


def check_sampler(pipeline: Pipeline, sampler: str | None, valid: tuple[str, ...]) -> SamplerName:
    """`sampler` (None: the first valid one), refused when the model's objective lacks it."""
    if sampler is None:
        return valid[0]  # type: ignore[return-value]
    if sampler not in valid:
        raise ValueError(
            f"--sampler {sampler}: {pipeline.path} is a {pipeline.objective} model, whose samplers are {', '.join(valid)}"
        )
    return sampler  # type: ignore[return-value]


def flow_shift(schedule: FlowSchedulerSpec, shift: float | None, num_tokens: int) -> float:
    """The timestep shift: `shift` when given, else the export's, fixed or from `num_tokens`."""
    if shift is not None:
        return shift
    if not schedule.shift_from_tokens:
        return schedule.shift
    return token_shift(
        num_tokens,
        base_tokens=schedule.base_tokens,
        max_tokens=schedule.max_tokens,
        base_shift=schedule.base_log_shift,
        max_shift=schedule.max_log_shift,
    )


def steps_from(setup: SamplingSetup, first: int) -> SamplingSetup:
    """The run's steps from step index `first` on (an SDEdit start part-way down the schedule)."""
    sigmas = None if setup.sigmas is None else setup.sigmas[first:]
    return replace(setup, timesteps=setup.timesteps[first:], sigmas=sigmas)


def noised_to_first_step(latents: Tensor, noise: Tensor, setup: SamplingSetup) -> Tensor:
    """SDEdit start: clean `latents` taken to the run's first step by the model's forward process,
    q_sample (x_t = √ᾱ x_0 + √(1-ᾱ) ε) or the flow's x_t = (1 - t) x_0 + t ε."""
    if setup.sigmas is not None:
        return flow_forward(latents, float(setup.sigmas[0]), noise)
    return q_sample(latents, int(setup.timesteps[0]), noise, setup.alphas_cumprod)


def clip_noise(setup: SamplingSetup, num_frames: int, generator: torch.Generator) -> Tensor:
    """N(0, I) latents of shape (B, C, num_frames, h, w), drawn on the CPU from `generator`."""
    noise = torch.randn(setup.clip_shape(num_frames), generator=generator, dtype=setup.dtype)
    return noise.to(setup.device)


def denoise_step(
    denoise_fn: DenoiseFn, x: Tensor, step_index: int, setup: SamplingSetup, generator: torch.Generator
) -> Tensor:
    """Step `step_index` of the run: a model call, then `samplers.ddim_step` or a flow Euler/Heun
    step. DPM-Solver++(2M) is multistep (each step needs the previous one's output), so it is
    refused here: strategies that edit the latents between steps use a one-step sampler."""
    if setup.sampler == "dpmpp_2m":
        raise ValueError("--sampler dpmpp_2m is multistep: this strategy steps its windows one step at a time; use ddim")
    t = setup.timesteps[step_index]
    if setup.sigmas is not None:
        model_output = denoise_fn(x, torch.full((x.shape[0],), float(t), dtype=torch.float32, device=x.device))
        t_now, t_next = float(setup.sigmas[step_index]), float(setup.sigmas[step_index + 1])
        if setup.sampler == "heun":
            return flow_heun_step(
                denoise_fn, x, model_output, t=t_now, t_next=t_next, num_train_timesteps=setup.num_train_timesteps
            )
        return flow_euler_step(x, model_output, t=t_now, t_next=t_next)
    model_output = denoise_fn(x, torch.full((x.shape[0],), int(t), dtype=torch.int64, device=x.device))
    noise = standard_normal_like(x, generator) if setup.eta > 0 else None
    return ddim_step(
        x,
        model_output,
        t=int(t),
        t_prev=previous_timesteps(setup.timesteps)[step_index],
        alphas_cumprod=setup.alphas_cumprod,
        parameterization=setup.parameterization,
        eta=setup.eta,
        noise=noise,
        final_alpha_cumprod=setup.final_alpha_cumprod,
    )


def run_sampler(denoise_fn: DenoiseFn, x_T: Tensor, setup: SamplingSetup, generator: torch.Generator) -> Tensor:
    """A whole run of one window from x_T with the setup's sampler (`samplers.ddim` takes the
    same draws as `denoise_step`)."""
    if setup.sigmas is not None:
        return flow_sample(
            denoise_fn, x_T, setup.sigmas, method=setup.sampler, num_train_timesteps=setup.num_train_timesteps
        )
    if setup.sampler == "dpmpp_2m":
        return dpm_solver_pp_2m(
            denoise_fn, x_T, setup.timesteps, alphas_cumprod=setup.alphas_cumprod, parameterization=setup.parameterization
        )
    return ddim(
        denoise_fn,
        x_T,
        setup.timesteps,
        alphas_cumprod=setup.alphas_cumprod,
        parameterization=setup.parameterization,
        eta=setup.eta,
        generator=generator,
        final_alpha_cumprod=setup.final_alpha_cumprod,
    )
