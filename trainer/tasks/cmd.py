"""Task `cmd`: CMD's content-motion autoencoder (reconstruction) and, on its detached latents,
the motion DiT conditioned on the content frame (diffusion), trained side by side (Yu et al.
2024, "Efficient Video Diffusion Models via Content-Frame Motion-Latent Decomposition";
docs/methods.md, 'CMD: training').

The paper trains them one after the other; here both engines step every iteration and the DiT
only ever sees detached autoencoder outputs, so neither objective leaks into the other.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

import model_zoo
from model_zoo.cmd import content_condition, motion_model_config, pack_motion
from trainer.config import CMDObjective, ModelConfig
from trainer.tasks.denoising import build_denoising
from trainer.tasks.encoders import TEXT_ENCODER_SEED
from trainer.tasks.interface import Batch, Engines, StepOutput
from trainer.tasks.losses import reconstruction_loss
from trainer.tasks.networks import build_helper, trained_model


class CMDTask:
    """Trains the content-motion autoencoder ("model") and the motion DiT ("motion") side by side."""

    components = {"model": "autoencoder", "motion": "motion_denoiser"}

    def __init__(self, objective: CMDObjective, model: ModelConfig, *, latent: bool, seed: int, device: torch.device):
        self.objective = objective
        self.device = device
        self.text_encoder = build_helper(model.text_encoder, seed=seed + TEXT_ENCODER_SEED, device=device)
        self.diffusion = build_denoising(objective.diffusion, device)
        self.frozen = {"text_encoder": self.text_encoder}
        autoencoder = trained_model(model)
        size = "tiny" if model.flavor == "tiny" else "S"
        context_dim = int(self.text_encoder.config.context_dim)
        motion = model_zoo.build_from_config(motion_model_config(autoencoder.config, size, context_dim=context_dim))
        self.trained: dict[str, nn.Module] = {"model": autoencoder, "motion": motion}

    def tokenizer(self) -> Callable[[list[str]], Tensor]:
        return self.text_encoder.tokenize

    def losses(self, engines: Engines, batch: Batch, generator: torch.Generator, step: int) -> StepOutput:
        video = batch.pixels().to(self.device)
        recon, content, motion = engines["model"](video)
        rec = reconstruction_loss(recon, video, self.objective.loss_type)
        with torch.no_grad():
            context = self.text_encoder(batch.tokens.to(self.device))
            x0 = pack_motion(type(motion)(*(z.detach() for z in motion)))  # (B, 2m, L, h, w)
            cond_frame = content_condition(content.detach(), self.trained["model"].config.patch_size)
        t, noise = self.diffusion.draw(x0, generator)
        diffusion = self.diffusion.loss(engines["motion"], x0, t, noise, engine="motion", context=context, cond_frame=cond_frame)
        motion_loss = diffusion.losses[0][1]
        return StepOutput([("model", rec), ("motion", motion_loss)], {"rec": rec.item(), "motion_loss": motion_loss.item(), **diffusion.metrics})

    def preview(self, engines: Engines, batch: Batch, generator: torch.Generator) -> Tensor | None:
        return None
