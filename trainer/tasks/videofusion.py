"""Task `videofusion`: decomposed noise ε_i = √λ·b + √(1-λ)·r_i, the base and residual generators
trained jointly (Luo et al. 2023, "VideoFusion"; docs/methods.md, 'VideoFusion: decomposed noise').

λ is the model's (`model.overrides.lam`), so the export carries the value the sampler uses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor, nn

import model_zoo
from trainer.config import ModelConfig, VideoFusionObjective
from trainer.tasks.denoising import build_denoising, text_denoiser, text_to_video_preview
from trainer.tasks.encoders import latent_encoders
from trainer.tasks.interface import Batch, Engines, StepOutput
from trainer.tasks.networks import init_from_or_build


class VideoFusionTask:
    """Trains the base and residual generators of one VideoFusion network."""

    components = {"model": "denoiser"}

    def __init__(self, objective: VideoFusionObjective, model: ModelConfig, *, latent: bool, seed: int, device: torch.device):
        self.device = device
        self.encoders = latent_encoders(model, vae=not latent, seed=seed, device=device)
        self.diffusion = build_denoising(objective.diffusion, device)
        self.frozen = self.encoders.helpers()
        config = model_zoo.make_config(model.family, model.flavor, **model.overrides)
        c, d = self.encoders.latent_channels(model), self.encoders.context_dim()
        generators = {
            name: dataclasses.replace(getattr(config, name), in_channels=c, out_channels=c, context_dim=d)
            for name in ("base", "residual")
        }
        self.trained: dict[str, nn.Module] = {"model": init_from_or_build(model, dataclasses.replace(config, **generators))}

    def tokenizer(self) -> Callable[[list[str]], Tensor]:
        return self.encoders.tokenizer()

    def draw_noise(self, latents: Tensor, generator: torch.Generator) -> Tensor:
        """The decomposed noise of a clip: one base noise b shared by its frames, a residual each."""
        noise, _, _ = self.trained["model"].noise.sample(latents.shape, generator)
        return noise.to(latents)

    def losses(self, engines: Engines, batch: Batch, generator: torch.Generator, step: int) -> StepOutput:
        latents, context = self.encoders.encode(batch, generator, self.device)
        t = self.diffusion.draw_timesteps(latents.shape[0], generator, self.device)
        noise = self.draw_noise(latents, generator)
        return self.diffusion.loss(engines["model"], latents, t, noise, context=context)

    def preview(self, engines: Engines, batch: Batch, generator: torch.Generator) -> Tensor | None:
        return text_to_video_preview(self.diffusion, self.encoders, text_denoiser(engines["model"]), batch, generator, self.device)
