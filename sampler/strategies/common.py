"""What every strategy shares: the DDIM setup, noise of a clip's shape, and one denoising step."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from model_zoo.diffusion.objectives import Parameterization
from model_zoo.diffusion.samplers import DenoiseFn, ddim, ddim_step, previous_timesteps, standard_normal_like
from sampler.pipeline import Pipeline, latent_channels, vae_factors


@dataclass(frozen=True, kw_only=True)
class SamplingSetup:
    """The DDIM run every window of a strategy uses (DDIM, Song et al. 2021), and the latent geometry."""

    timesteps: Tensor
    """Descending timesteps, e.g. `schedules.ddim_timesteps(1000, 50)` (the usual 50 DDIM steps)."""
    alphas_cumprod: Tensor
    """ᾱ_t of the model's training schedule, shape (T,)."""
    frame_shape: tuple[int, int, int, int]
    """(B, C, h, w) of one latent frame: batch, latent channels, latent height and width."""
    eta: float = 0.0
    """DDIM η: 0 deterministic, 1 the DDPM posterior variance (LVDM's long-video script used 1)."""
    parameterization: Parameterization = "eps"
    """What the denoiser predicts: eps, v or x0."""
    final_alpha_cumprod: float = 1.0
    """ᾱ after the last step: 1.0 (diffusers), or ᾱ_0 as LDM/LVDM's DDIM does."""
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


def pipeline_setup(
    pipeline: Pipeline, *, height: int, width: int, steps: int, eta: float, device: str
) -> SamplingSetup:
    """The DDIM run of `steps` steps of `pipeline`'s schedule on its latents of height x width pixels
    (one video per batch)."""
    _, factor_h, factor_w = vae_factors(pipeline.vae)
    schedule = pipeline.schedule
    return SamplingSetup(
        timesteps=schedule.timesteps(steps),
        alphas_cumprod=schedule.alphas_cumprod,
        frame_shape=(1, latent_channels(pipeline.vae), height // factor_h, width // factor_w),
        eta=eta,
        parameterization=schedule.parameterization,
        final_alpha_cumprod=schedule.final_alpha_cumprod,
        device=device,
    )


def clip_noise(setup: SamplingSetup, num_frames: int, generator: torch.Generator) -> Tensor:
    """N(0, I) latents of shape (B, C, num_frames, h, w), drawn on the CPU from `generator`."""
    noise = torch.randn(setup.clip_shape(num_frames), generator=generator, dtype=setup.dtype)
    return noise.to(setup.device)


def denoise_step(
    denoise_fn: DenoiseFn, x: Tensor, step_index: int, setup: SamplingSetup, generator: torch.Generator
) -> Tensor:
    """Step `step_index` of the DDIM run: one model call, then `samplers.ddim_step`."""
    t = int(setup.timesteps[step_index])
    t_prev = previous_timesteps(setup.timesteps)[step_index]
    model_output = denoise_fn(x, torch.full((x.shape[0],), t, dtype=torch.int64, device=x.device))
    noise = standard_normal_like(x, generator) if setup.eta > 0 else None
    return ddim_step(
        x,
        model_output,
        t=t,
        t_prev=t_prev,
        alphas_cumprod=setup.alphas_cumprod,
        parameterization=setup.parameterization,
        eta=setup.eta,
        noise=noise,
        final_alpha_cumprod=setup.final_alpha_cumprod,
    )


def run_ddim(denoise_fn: DenoiseFn, x_T: Tensor, setup: SamplingSetup, generator: torch.Generator) -> Tensor:
    """A whole DDIM run of one window from x_T with `samplers.ddim` (the same draws as `denoise_step`)."""
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
