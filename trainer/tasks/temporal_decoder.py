"""Task `temporal_decoder`: VidRD's temporal-aware decoder; only its new temporal layers train, on
reconstruction, the image encoder stays frozen (docs/methods.md, 'VidRD: temporal-aware decoder')."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.config import ModelConfig, TemporalDecoderObjective
from trainer.tasks.interface import Batch, Engines, StepOutput
from trainer.tasks.losses import reconstruction_loss
from trainer.tasks.networks import train_only, trained_model


class TemporalDecoderTask:
    """Trains the decoder's temporal branches; the rest of the VAE stays frozen."""

    components = {"model": "vae"}

    def __init__(self, objective: TemporalDecoderObjective, model: ModelConfig, *, latent: bool, seed: int, device: torch.device):
        self.objective = objective
        self.device = device
        self.frozen: dict[str, nn.Module] = {}
        vae = trained_model(model)
        parameters = dict(vae.named_parameters())
        train_only(vae, [parameters[name] for name in vae.trainable_parameter_names()])
        self.trained: dict[str, nn.Module] = {"model": vae}

    def tokenizer(self) -> None:
        return None

    def losses(self, engines: Engines, batch: Batch, generator: torch.Generator, step: int) -> StepOutput:
        video = batch.pixels().to(self.device)
        vae = self.trained["model"]  # its decode, not the engine's forward; the engine still owns backward
        with torch.no_grad():
            z = vae.encode(video).sample(generator)  # the encoder is frozen
        recon = vae.decode(z)
        rec = reconstruction_loss(recon, video, self.objective.loss_type)
        frame_diff = F.l1_loss(recon.diff(dim=2), video.diff(dim=2))
        return StepOutput([("model", rec)], {"rec": rec.item(), "frame_diff_err": frame_diff.item()})

    def preview(self, engines: Engines, batch: Batch, generator: torch.Generator) -> Tensor | None:
        return None
