"""Task `diffusion`: text-to-video latent diffusion (ε/v/x0) or flow matching (caption dropout is
the loader's). See docs/methods.md, 'Training: what every task shares' and 'Flow matching'."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from trainer.config import DiffusionObjective, ModelConfig
from trainer.tasks.denoising import build_process, text_denoiser, text_to_video_preview
from trainer.tasks.encoders import latent_encoders
from trainer.tasks.interface import Batch, Engines, StepOutput
from trainer.tasks.networks import trained_model


class DiffusionTask:
    """A text-conditioned `unet3d` or `dit` denoising the latents of the frozen VAE."""

    components = {"model": "denoiser"}

    def __init__(self, objective: DiffusionObjective, model: ModelConfig, *, latent: bool, seed: int, device: torch.device):
        self.device = device
        self.encoders = latent_encoders(model, vae=not latent, seed=seed, device=device)
        self.diffusion = build_process(objective, device)
        channels = self.encoders.latent_channels(model)
        self.frozen = self.encoders.helpers()
        self.trained: dict[str, nn.Module] = {
            "model": trained_model(model, in_channels=channels, out_channels=channels, context_dim=self.encoders.context_dim())
        }

    def tokenizer(self) -> Callable[[list[str]], Tensor]:
        return self.encoders.tokenizer()

    def losses(self, engines: Engines, batch: Batch, generator: torch.Generator, step: int) -> StepOutput:
        latents, context = self.encoders.encode(batch, generator, self.device)
        t, noise = self.diffusion.draw(latents, generator)
        return self.diffusion.loss(engines["model"], latents, t, noise, context=context)

    def preview(self, engines: Engines, batch: Batch, generator: torch.Generator) -> Tensor | None:
        return text_to_video_preview(self.diffusion, self.encoders, text_denoiser(engines["model"]), batch, generator, self.device)
