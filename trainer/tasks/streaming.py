"""Task `streaming`: StreamingT2V's CAM + APM trained over a frozen `unet3d` base (Henschel et
al. 2024, "StreamingT2V"; docs/methods.md, 'StreamingT2V: training').

A training clip of T latent frames is split: the first `cond_frames` are the previous chunk
(E_cond's input, clean), the rest is the chunk to denoise (at least `cond_frames` frames: CAM's
encoder copy reads the first ones, noised); the clip's first frame is the anchor of APM (its
image embedding from the frozen image encoder). Only CAM, APM and the α_l reach the optimizer;
the base U-Net stays as loaded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

import model_zoo
from trainer.config import ModelConfig, StreamingObjective
from trainer.tasks.denoising import build_denoising
from trainer.tasks.encoders import latent_encoders
from trainer.tasks.interface import Batch, Engines, StepOutput
from trainer.tasks.networks import build_helper, init_from_or_build, train_only

IMAGE_ENCODER_SEED, BASE_SEED = 3, 4
"""Offsets from `train.seed` of the random initialisation of the image encoder and the base."""


class StreamingTask:
    """Trains CAM and APM; the base U-Net inside the network stays frozen."""

    components = {"model": "denoiser"}

    def __init__(
        self,
        objective: StreamingObjective,
        model: ModelConfig,
        *,
        latent: bool,
        seed: int,
        device: torch.device,
    ):
        self.device = device
        self.encoders = latent_encoders(model, vae=True, seed=seed, device=device)
        image_encoder = build_helper(
            model.image_encoder, seed=seed + IMAGE_ENCODER_SEED, device=device, role="image_encoder"
        )
        self.diffusion = build_denoising(objective.diffusion, device)
        self.frozen = {**self.encoders.helpers(), "image_encoder": image_encoder}
        if model.base is None or not Path(model.base).is_dir():
            raise ValueError(
                f"model.base: {model.base!r} is not a model folder; the streaming task trains CAM/APM over a "
                "trained text-to-video unet3d (e.g. <export>/denoiser). A freshly initialised U-Net has a "
                "zero output layer, so CAM and APM would receive no gradient at all"
            )
        base = build_helper(model.base, seed=seed + BASE_SEED, device=torch.device("cpu"))
        config = model_zoo.make_config(model.family, model.flavor, **model.overrides)
        config = dataclasses.replace(
            config,
            base=base.config,
            image_embed_dim=int(image_encoder.config.context_dim),
            text_tokens=int(self.encoders.text_encoder.config.context_length),
        )
        network = init_from_or_build(model, config)
        if not model.init_from:  # a fine-tuned CAM/APM checkpoint already holds its base
            network.load_base_state_dict(base.state_dict())
        train_only(network, network.trainable_parameters())
        self.trained: dict[str, nn.Module] = {"model": network}
        self.cond_frames = config.cond_frames

    def tokenizer(self) -> Callable[[list[str]], Tensor]:
        return self.encoders.tokenizer()

    def losses(self, engines: Engines, batch: Batch, generator: torch.Generator, step: int) -> StepOutput:
        latents, context = self.encoders.encode(batch, generator, self.device)
        if latents.shape[2] < 2 * self.cond_frames:
            raise ValueError(
                f"data.frames: clips give {latents.shape[2]} latent frames; the streaming task needs cond_frames="
                f"{self.cond_frames} conditioning frames and a chunk of at least as many (CAM reads its first ones)"
            )
        cond, chunk = latents[:, :, : self.cond_frames], latents[:, :, self.cond_frames :]
        with torch.no_grad():
            anchor = self.frozen["image_encoder"](batch.pixels()[:, :, 0].to(self.device))[:, 0]  # (B, D_img)
        t, noise = self.diffusion.draw(chunk, generator)
        return self.diffusion.loss(
            engines["model"], chunk, t, noise, context=context, cond_latents=cond, anchor=anchor,
            **self.encoders.mask_input(batch, self.device),
        )

    def preview(self, engines: Engines, batch: Batch, generator: torch.Generator) -> Tensor | None:
        return None
