"""The diffusion process a task trains a denoiser against: schedule, draws, loss and a preview.

The loss is `model_zoo.diffusion.objectives.diffusion_loss` (or, for flow matching,
`model_zoo.diffusion.flow.flow_loss`), the function the objective tests check; a task only
chooses what goes in (the clean latents, the condition, a frame weight). See docs/methods.md,
'The denoising loss and its reduction' and 'Flow matching'.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from model_zoo.diffusion.flow import (
    draw_flow_time,
    flow_loss,
    flow_sample,
    flow_sigmas,
    shift_time,
    token_shift,
)
from model_zoo.diffusion.objectives import diffusion_loss
from model_zoo.diffusion.samplers import ddim
from model_zoo.diffusion.schedules import alphas_cumprod, ddim_timesteps, make_betas
from trainer.config import DiffusionConfig, DiffusionObjective, FlowMatchingConfig
from trainer.tasks.encoders import LatentEncoders
from trainer.tasks.interface import Batch, StepOutput

TIMESTEP_BUCKETS = 4
"""Loss is also logged per quarter of the timestep range (loss/t_q0 .. loss/t_q3)."""
PREVIEW_STEPS = 10
"""DDIM steps of the TensorBoard preview video."""


@dataclass(frozen=True)
class Denoising:
    """A task's diffusion process: the schedule, the draws of t and ε, the loss, a preview sample."""

    config: DiffusionConfig
    """Schedule, parameterisation and loss type."""
    alphas_cumprod: Tensor
    """ᾱ_t of the schedule, float32 (T,), on the training device."""

    def draw_timesteps(self, batch_size: int, generator: torch.Generator, device: torch.device) -> Tensor:
        """t ~ U{0..T-1}, int64 (B,)."""
        return torch.randint(0, self.config.num_timesteps, (batch_size,), generator=generator).to(device)

    def draw(self, latents: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Timesteps (B,) and Gaussian noise shaped like `latents`."""
        t = self.draw_timesteps(latents.shape[0], generator, latents.device)
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        return t, noise

    def loss(
        self,
        denoise_fn: Callable[..., Tensor],
        x0: Tensor,
        t: Tensor,
        noise: Tensor,
        *,
        frame_weight: Tensor | None = None,
        engine: str = "model",
        **cond: Any,
    ) -> StepOutput:
        """The batch mean of the per-sample denoising loss, for `engine`, logged per timestep bucket."""
        per_sample = diffusion_loss(
            denoise_fn,
            x0,
            cond=cond,
            t=t,
            noise=noise,
            alphas_cumprod=self.alphas_cumprod,
            parameterization=self.config.parameterization,
            loss_type=self.config.loss_type,
            frame_weight=frame_weight,
        )
        return StepOutput([(engine, per_sample.mean())], bucket_metrics(per_sample, t, self.config.num_timesteps))

    @torch.no_grad()
    def preview(
        self, denoise_fn: Callable[[Tensor, Tensor], Tensor], like: Tensor, vae: nn.Module, generator: torch.Generator
    ) -> Tensor:
        """A DDIM sample of latents shaped like `like`, decoded by `vae` to [-1, 1]."""
        x_T = torch.randn(like.shape, generator=generator).to(like)
        timesteps = ddim_timesteps(self.config.num_timesteps, PREVIEW_STEPS)
        sample = ddim(denoise_fn, x_T, timesteps, alphas_cumprod=self.alphas_cumprod, parameterization=self.config.parameterization)
        return vae.from_latents(sample).clamp(-1, 1)


def build_denoising(config: DiffusionConfig, device: torch.device) -> Denoising:
    """The noise schedule ᾱ_t of `config`."""
    betas = make_betas(config.schedule, config.num_timesteps, beta_start=config.beta_start, beta_end=config.beta_end)
    return Denoising(config, alphas_cumprod(betas).float().to(device))


@dataclass(frozen=True)
class FlowMatching:
    """Flow-matching training (`objective.name: flow_matching`): the same draws, loss and preview
    interface as `Denoising`, with t in (0, 1) instead of integer timesteps."""

    config: FlowMatchingConfig
    """Time draws, shift and loss weighting."""
    num_train_timesteps: int
    """T: the network sees time t' · T."""
    loss_type: str
    """l2 or l1."""

    def shift(self, latents: Tensor) -> float:
        """s: fixed, or from the latent positions per sample (frames × height × width)."""
        config = self.config
        if not config.shift_from_tokens:
            return config.shift
        positions = latents.shape[2] * latents.shape[3] * latents.shape[4]
        return token_shift(
            positions, base_tokens=config.base_tokens, max_tokens=config.max_tokens,
            base_shift=config.base_log_shift, max_shift=config.max_log_shift,
        )

    def draw(self, latents: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Shifted times t' (B,) in (0, 1) and Gaussian noise shaped like `latents`."""
        config = self.config
        t = draw_flow_time(generator, latents.shape[0], config.time_sampling, mean=config.logit_mean, std=config.logit_std)
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        return shift_time(t, self.shift(latents)).to(latents.device), noise

    def loss(
        self,
        denoise_fn: Callable[..., Tensor],
        x0: Tensor,
        t: Tensor,
        noise: Tensor,
        *,
        frame_weight: Tensor | None = None,
        engine: str = "model",
        **cond: Any,
    ) -> StepOutput:
        """The batch mean of the per-sample flow-matching loss, logged per quarter of t."""
        per_sample = flow_loss(
            denoise_fn, x0, cond=cond, t=t, noise=noise, num_train_timesteps=self.num_train_timesteps,
            loss_type=self.loss_type, weighting=self.config.loss_weighting, frame_weight=frame_weight,
        )
        return StepOutput([(engine, per_sample.mean())], bucket_metrics(per_sample, t, 1))

    @torch.no_grad()
    def preview(
        self, denoise_fn: Callable[[Tensor, Tensor], Tensor], like: Tensor, vae: nn.Module, generator: torch.Generator
    ) -> Tensor:
        """A flow Euler sample of latents shaped like `like`, decoded by `vae` to [-1, 1]."""
        x_1 = torch.randn(like.shape, generator=generator).to(like)
        sigmas = flow_sigmas(PREVIEW_STEPS, self.shift(like))
        sample = flow_sample(denoise_fn, x_1, sigmas, num_train_timesteps=self.num_train_timesteps)
        return vae.from_latents(sample).clamp(-1, 1)


def build_process(objective: DiffusionObjective, device: torch.device) -> Denoising | FlowMatching:
    """The training process `objective.name` names: DDPM diffusion or flow matching."""
    if objective.name == "flow_matching":
        return FlowMatching(objective.flow, objective.diffusion.num_timesteps, objective.diffusion.loss_type)
    return build_denoising(objective.diffusion, device)


def text_denoiser(model: Callable[..., Tensor]) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """`denoise_fn(x, t, context)` of a network conditioned on text only."""
    return lambda x, t, context: model(x, t, context=context)


@torch.no_grad()
def text_to_video_preview(
    diffusion: Denoising | FlowMatching,
    encoders: LatentEncoders,
    denoise_fn: Callable[[Tensor, Tensor, Tensor], Tensor],
    batch: Batch,
    generator: torch.Generator,
    device: torch.device,
) -> Tensor | None:
    """A DDIM sample for the first caption of `batch` with `denoise_fn(x, t, context)`, decoded by
    the frozen VAE (None without one: latent shards)."""
    if encoders.vae is None:
        return None
    latents, context = encoders.encode(batch.head(1), generator, device)
    return diffusion.preview(lambda x, t: denoise_fn(x, t, context), latents, encoders.vae, generator)


def bucket_metrics(per_sample: Tensor, t: Tensor, num_timesteps: int) -> dict[str, float]:
    """The mean loss of the samples in each quarter of the timestep range that holds any."""
    buckets = (t * TIMESTEP_BUCKETS // num_timesteps).clamp(max=TIMESTEP_BUCKETS - 1)
    metrics = {}
    for b in range(TIMESTEP_BUCKETS):
        chosen = per_sample[buckets == b]
        if chosen.numel():
            metrics[f"loss/t_q{b}"] = chosen.mean().item()
    return metrics
