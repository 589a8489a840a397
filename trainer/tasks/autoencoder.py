"""Task `autoencoder`: LVDM's video VAE, trained on reconstruction (+ a perceptual distance when
weights are given) + KL, plus a hinge GAN with a 3D patch discriminator and an adaptive weight
from step `disc_start` on (docs/methods.md, 'Video VAE: training losses')."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor, nn

import model_zoo
from model_zoo.perceptual import PerceptualDistance, load_perceptual
from trainer.config import AutoencoderObjective, ModelConfig, TemporalDecoderObjective
from trainer.tasks.interface import Batch, Engines, StepOutput
from trainer.tasks.losses import adaptive_gan_weight, hinge_d_loss, perceptual_loss, reconstruction_loss
from trainer.tasks.networks import trained_model

log = logging.getLogger(__name__)

NO_PERCEPTUAL = "autoencoder: training without a perceptual loss (objective.perceptual is not set)"
"""The run log's line when no perceptual weights are given."""
FIXED_GAN_WEIGHT = (
    "autoencoder: ZeRO-3 partitions the decoder's last layer, so the adaptive GAN weight cannot be "
    "measured there: the GAN term uses the fixed weight objective.adv_weight"
)
"""The run log's line when the adaptive GAN weight falls back to the fixed one."""


class AutoencoderTask:
    """Trains the VAE (engine "model") and, from `disc_start` on, the discriminator ("disc")."""

    components = {"model": "vae", "disc": "discriminator"}

    def __init__(self, objective: AutoencoderObjective, model: ModelConfig, *, latent: bool, seed: int, device: torch.device):
        self.objective = objective
        self.device = device
        self.frozen: dict[str, nn.Module] = {}
        vae = trained_model(model)
        self.trained: dict[str, nn.Module] = {"model": vae, "disc": build_discriminator(model)}
        self.terms = VAELossTerms(objective, self.trained["disc"], device)
        self.warned_fixed_weight = False

    def tokenizer(self) -> None:
        return None

    def losses(self, engines: Engines, batch: Batch, generator: torch.Generator, step: int) -> StepOutput:
        objective = self.objective
        video = batch.pixels().to(self.device)
        last_layer = self.trained["model"].decoder_last_layer()
        with captured_input(last_layer) as last_inputs:
            recon, posterior = engines["model"](video, True, generator)
        rec, metrics = self.terms.reconstruction(recon, video)
        kl = posterior.kl().mean()
        loss = rec + objective.kl_weight * kl
        metrics["kl"] = kl.item()
        return self.terms.step_output(
            engines, video, recon, loss, metrics, step, lambda g_adv: self.gan_weight(last_layer, last_inputs[0], video)
        )

    def gan_weight(self, last_layer: nn.Module, last_input: Tensor, video: Tensor) -> Tensor | float:
        """The adaptive weight at the decoder's last layer, or 1 when ZeRO-3 partitions that layer
        (after the forward it is an empty placeholder: no gradient can be taken with respect to it).

        The gradients are taken on the last layer applied again to its detached input: the same
        values as in the VAE's forward, on a graph that reaches the weight without crossing the
        engine's output (DeepSpeed allows a backward through that only inside engine.backward)."""
        weight = last_layer.conv.weight
        if hasattr(weight, "ds_tensor"):  # a ZeRO-3 partitioned parameter
            if not self.warned_fixed_weight:
                say(FIXED_GAN_WEIGHT)
                self.warned_fixed_weight = True
            return 1.0
        recon = last_layer(last_input.detach())  # (B, 3, T, H, W), equal to the VAE's output
        rec, _ = self.terms.reconstruction(recon, video)
        return adaptive_gan_weight(rec, self.terms.generator_adversarial(recon), weight)

    def preview(self, engines: Engines, batch: Batch, generator: torch.Generator) -> Tensor | None:
        """The first clip and its reconstruction side by side (1, 3, T, H, 2W)."""
        with torch.no_grad():
            video = batch.pixels()[:1].to(self.device)
            recon, _ = engines["model"](video, False, None)
        return torch.cat([video, recon.clamp(-1, 1)], dim=-1)


def build_discriminator(model: ModelConfig) -> nn.Module:
    """The 3D patch discriminator `model.discriminator` names ('family/flavor', random init)."""
    family, _, flavor = model.discriminator.partition("/")
    return model_zoo.build_model(family, flavor or "tiny")


class VAELossTerms:
    """The VAE's loss terms shared by the `autoencoder` and `temporal_decoder` tasks: L_rec (the
    pixel distance + the weighted perceptual distance when configured) and the generator's GAN
    term through the discriminator `disc` held fixed."""

    def __init__(self, objective: AutoencoderObjective | TemporalDecoderObjective, disc: nn.Module, device: torch.device):
        self.objective = objective
        self.disc = disc
        # Not a frozen helper: it only shapes the loss and is neither saved with the run nor exported.
        self.perceptual: PerceptualDistance | None = None
        if objective.perceptual is None:
            say(NO_PERCEPTUAL)
        else:
            self.perceptual = load_perceptual(objective.perceptual).to(device)

    def reconstruction(self, recon: Tensor, video: Tensor) -> tuple[Tensor, dict[str, float]]:
        """L_rec: the pixel distance, plus the weighted perceptual distance when it is configured."""
        rec = reconstruction_loss(recon, video, self.objective.loss_type)
        metrics = {"rec": rec.item()}
        if self.perceptual is not None:
            perceptual = perceptual_loss(self.perceptual, recon, video)
            rec = rec + self.objective.perceptual_weight * perceptual
            metrics["perceptual"] = perceptual.item()
        return rec, metrics

    def step_output(
        self,
        engines: Engines,
        video: Tensor,
        recon: Tensor,
        loss: Tensor,
        metrics: dict[str, float],
        step: int,
        gan_weight: Callable[[Tensor], Tensor | float],
    ) -> StepOutput:
        """The VAE's `loss`, plus from `disc_start` on the generator's GAN term at the adaptive
        weight `gan_weight(L_gan)` and the discriminator's hinge loss on `video` against `recon`."""
        objective = self.objective
        adversarial = step >= objective.disc_start
        if adversarial:
            g_adv = self.generator_adversarial(recon)
            weight = objective.adv_weight * gan_weight(g_adv)
            loss = loss + weight * g_adv
            metrics |= {"g_adv": g_adv.item(), "adv_weight": float(weight)}
        out = [("model", loss)]
        if adversarial:
            d_loss = hinge_d_loss(engines["disc"](video), engines["disc"](recon.detach()))
            out.append(("disc", d_loss))
            metrics["d_loss"] = d_loss.item()
        return StepOutput(out, metrics)

    def generator_adversarial(self, recon: Tensor) -> Tensor:
        """L_gan = -mean D(x̂), through the plain discriminator with its parameters frozen: this
        backward belongs to the VAE's engine."""
        with frozen(self.disc):
            return -self.disc(recon).mean()


def say(text: str) -> None:
    """A warning line in the run log, from the first rank only (every rank builds the task)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        log.warning(text)


@contextmanager
def captured_input(module: nn.Module) -> Iterator[list[Tensor]]:
    """The inputs `module` is called on inside the block, appended to the yielded list."""
    inputs: list[Tensor] = []
    handle = module.register_forward_hook(lambda _module, args, _output: inputs.append(args[0]))
    try:
        yield inputs
    finally:
        handle.remove()


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
