"""Task `autoencoder`: LVDM's video VAE, trained on reconstruction + KL, plus a hinge GAN with a
3D patch discriminator from step `disc_start` on (docs/methods.md, 'Video VAE: training losses')."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

import model_zoo
from trainer.config import AutoencoderObjective, ModelConfig
from trainer.tasks.interface import Batch, Engines, StepOutput
from trainer.tasks.losses import hinge_d_loss, reconstruction_loss
from trainer.tasks.networks import trained_model


class AutoencoderTask:
    """Trains the VAE (engine "model") and, from `disc_start` on, the discriminator ("disc")."""

    components = {"model": "vae", "disc": "discriminator"}

    def __init__(self, objective: AutoencoderObjective, model: ModelConfig, *, latent: bool, seed: int, device: torch.device):
        if objective.perceptual is not None:
            raise ValueError(
                f"objective.perceptual: {objective.perceptual!r} was given, but no perceptual network "
                "can be loaded from it (LPIPS weights are not supported yet); set objective.perceptual=null"
            )
        self.objective = objective
        self.device = device
        self.frozen: dict[str, nn.Module] = {}
        family, _, flavor = model.discriminator.partition("/")
        self.trained: dict[str, nn.Module] = {"model": trained_model(model), "disc": model_zoo.build_model(family, flavor or "tiny")}

    def tokenizer(self) -> None:
        return None

    def losses(self, engines: Engines, batch: Batch, generator: torch.Generator, step: int) -> StepOutput:
        objective = self.objective
        video = batch.pixels().to(self.device)
        recon, posterior = engines["model"](video, True, generator)
        rec = reconstruction_loss(recon, video, objective.loss_type)
        kl = posterior.kl().mean()
        loss = rec + objective.kl_weight * kl
        metrics = {"rec": rec.item(), "kl": kl.item()}
        adversarial = step >= objective.disc_start
        if adversarial:
            # The plain module, not the engine: this backward belongs to the VAE's engine.
            with frozen(self.trained["disc"]):
                g_adv = -self.trained["disc"](recon).mean()
            loss = loss + objective.adv_weight * g_adv
            metrics["g_adv"] = g_adv.item()
        out = [("model", loss)]
        if adversarial:
            d_loss = hinge_d_loss(engines["disc"](video), engines["disc"](recon.detach()))
            out.append(("disc", d_loss))
            metrics["d_loss"] = d_loss.item()
        return StepOutput(out, metrics)

    def preview(self, engines: Engines, batch: Batch, generator: torch.Generator) -> Tensor | None:
        """The first clip and its reconstruction side by side (1, 3, T, H, 2W)."""
        with torch.no_grad():
            video = batch.pixels()[:1].to(self.device)
            recon, _ = engines["model"](video, False, None)
        return torch.cat([video, recon.clamp(-1, 1)], dim=-1)


@contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Parameters of `module` receive no gradient inside the block (the generator's pass through D)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)

