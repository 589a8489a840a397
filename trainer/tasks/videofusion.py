"""Task `videofusion`: decomposed noise ε_i = √λ·b + √(1-λ)·r_i, the base and residual generators
trained jointly (Luo et al. 2023, "VideoFusion"; docs/methods.md, 'VideoFusion: decomposed noise'
and 'VideoFusion: the base generator from an image model').

λ is the model's (`model.overrides.lam`), so the export carries the value the sampler uses. The
network is told ᾱ_t of each sample (the residual generator's input removes √(1-ᾱ_t)·√λ·b̂).
`model.base_init_from` starts the base generator from an exported image network or a Stable
Diffusion (diffusers UNet2DConditionModel) U-Net.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import model_zoo
from trainer.config import ModelConfig, VideoFusionObjective
from trainer.tasks.denoising import build_denoising, text_to_video_preview
from trainer.tasks.encoders import latent_encoders
from trainer.tasks.interface import Batch, Engines, StepOutput
from trainer.tasks.networks import image_unet, init_from_or_build


class VideoFusionTask:
    """Trains the base and residual generators of one VideoFusion network."""

    components = {"model": "denoiser"}

    def __init__(
        self,
        objective: VideoFusionObjective,
        model: ModelConfig,
        *,
        latent: bool,
        seed: int,
        device: torch.device,
    ):
        self.device = device
        self.encoders = latent_encoders(model, vae=not latent, seed=seed, device=device)
        self.diffusion = build_denoising(objective.diffusion, device)
        self.frozen = self.encoders.helpers()
        # Latent channels (`out_channels`, which latent shards need set) size both generators
        # below; VideoFusionConfig itself has no such field.
        overrides = {key: value for key, value in model.overrides.items() if key not in ("in_channels", "out_channels")}
        config = model_zoo.make_config(model.family, model.flavor, **overrides)
        channels = self.encoders.latent_channels(model)
        sizes = dict(in_channels=channels, out_channels=channels, context_dim=self.encoders.context_dim())
        image = None if model.base_init_from is None else load_image_network(model, sizes)
        if image is not None:
            config = dataclasses.replace(config, base=image.config)
        generators = {
            name: dataclasses.replace(getattr(config, name), **sizes) for name in ("base", "residual")
        }
        network = init_from_or_build(model, dataclasses.replace(config, **generators))
        if image is not None:
            network.load_base(image, str(model.base_init_from))
        self.trained: dict[str, nn.Module] = {"model": network}

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
        alpha_bar = self.diffusion.alphas_cumprod[t]  # (B,)
        mask = self.encoders.mask_input(batch, self.device)  # {} for CLIP prompts
        return self.diffusion.loss(engines["model"], latents, t, noise, context=context, alpha_bar=alpha_bar, **mask)

    def preview(self, engines: Engines, batch: Batch, generator: torch.Generator) -> Tensor | None:
        model, alphas_cumprod = engines["model"], self.diffusion.alphas_cumprod

        def denoise(x: Tensor, t: Tensor, context: Tensor) -> Tensor:
            return model(x, t, context=context, alpha_bar=alphas_cumprod[t])

        return text_to_video_preview(self.diffusion, self.encoders, denoise, batch, generator, self.device)


def load_image_network(model: ModelConfig, sizes: dict[str, Any]) -> nn.Module:
    """The image network `model.base_init_from` names: an `lvd export` folder (its `denoiser`) or a
    model folder, a `unet3d` without temporal layers; or a diffusers UNet2DConditionModel folder
    (or a pipeline folder, its unet: Stable Diffusion's U-Net), loaded as such a `unet3d`. It must
    have this run's `sizes` (latent channels, text width); an error naming the path and the key
    otherwise."""
    source = Path(str(model.base_init_from))
    if model.init_from:
        raise ValueError(
            f"model.base_init_from={source} and model.init_from={model.init_from}: give one (init_from already holds a base generator)"
        )
    return image_unet(str(source), "model.base_init_from", sizes, role="the base generator")
