"""Task `diffusion`: text-to-video latent diffusion (ε/v/x0) or flow matching (caption dropout is
the loader's), optionally image-to-video by first-frame concatenation (`objective.image_rate`).
See docs/methods.md, 'Training: what every task shares', 'Flow matching' and 'Image-to-video'."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from model_zoo.diffusion.image_condition import conditioned_channels, with_image_condition
from trainer.config import DiffusionObjective, ModelConfig
from trainer.tasks.denoising import build_process, text_denoiser, text_to_video_preview
from trainer.tasks.encoders import latent_encoders
from trainer.tasks.images import image_denoiser
from trainer.tasks.interface import Batch, Engines, StepOutput
from trainer.tasks.networks import trained_model


class DiffusionTask:
    """A text-conditioned `unet3d` or `dit` denoising the latents of the frozen VAE."""

    components = {"model": "denoiser"}

    def __init__(self, objective: DiffusionObjective, model: ModelConfig, *, latent: bool, seed: int, device: torch.device):
        self.device = device
        self.encoders = latent_encoders(model, vae=not latent, seed=seed, device=device)
        self.diffusion = build_process(objective, device)
        self.image_rate = objective.image_rate
        channels = self.encoders.latent_channels(model)
        in_channels = conditioned_channels(channels) if self.image_rate > 0 else channels
        self.frozen = self.encoders.helpers()
        self.trained: dict[str, nn.Module] = {
            "model": trained_model(model, in_channels=in_channels, out_channels=channels, context_dim=self.encoders.context_dim())
        }

    def tokenizer(self) -> Callable[[list[str]], Tensor]:
        return self.encoders.tokenizer()

    def losses(self, engines: Engines, batch: Batch, generator: torch.Generator, step: int) -> StepOutput:
        latents, context = self.encoders.encode(batch, generator, self.device)
        t, noise = self.diffusion.draw(latents, generator)
        model = engines["model"] if batch.modality == "video" else image_denoiser(self.trained["model"], engines["model"])
        mask = self.encoders.mask_input(batch, self.device)  # {} for CLIP prompts
        return self.diffusion.loss(
            self.denoiser(model, latents, generator, batch.modality), latents, t, noise, context=context, **mask
        )

    def denoiser(
        self, model: Callable[..., Tensor], latents: Tensor, generator: torch.Generator, modality: str = "video"
    ) -> Callable[..., Tensor]:
        """The network as the loss calls it: with image conditioning, each sample gets its clean first
        latent frame with probability `image_rate` (the others all-zero condition channels); an
        image batch gets none (its one frame is the target)."""
        if self.image_rate == 0:
            return model
        if modality == "image":
            keep = torch.zeros(latents.shape[0], dtype=torch.bool)
        else:
            keep = torch.rand(latents.shape[0], generator=generator) < self.image_rate
        return with_image_condition(model, latents[:, :, 0], keep.to(latents.device))

    def preview(self, engines: Engines, batch: Batch, generator: torch.Generator) -> Tensor | None:
        model = engines["model"] if self.image_rate == 0 else with_image_condition(engines["model"], None)
        return text_to_video_preview(self.diffusion, self.encoders, text_denoiser(model), batch, generator, self.device)
