"""Task `temporal_decoder`: VidRD's temporal-aware decoder fine-tune (docs/methods.md, 'VidRD:
temporal-aware decoder'). Only the decoder's new temporal layers train; the image VAE stays frozen.

The loss is the paper's L = α_rec·L_rec + α_reg·L_reg + α_disc·L_disc, built from the `autoencoder`
task's terms (`VAELossTerms`): L_rec the pixel distance (+ the perceptual distance when weights are
given), L_reg the KL of the (frozen) encoder's posterior, and from `disc_start` on the hinge GAN
against the 3D patch discriminator (engine "disc"), with the adaptive weight measured at the last
temporal layer: the last weight that trains.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.config import ModelConfig, TemporalDecoderObjective
from trainer.tasks.autoencoder import VAELossTerms, build_discriminator, say
from trainer.tasks.interface import Batch, Engines, StepOutput
from trainer.tasks.losses import adaptive_gan_weight
from trainer.tasks.networks import train_only, trained_model

FIXED_GAN_WEIGHT = (
    "temporal_decoder: ZeRO-3 partitions the last temporal layer, so the adaptive GAN weight cannot be "
    "measured there: the GAN term uses the fixed weight objective.adv_weight"
)
"""The run log's line when the adaptive GAN weight falls back to the fixed one."""


class TemporalDecoderTask:
    """Trains the decoder's temporal branches (engine "model") and, from `disc_start` on, the
    discriminator ("disc"); the rest of the VAE stays frozen."""

    components = {"model": "vae", "disc": "discriminator"}

    def __init__(
        self,
        objective: TemporalDecoderObjective,
        model: ModelConfig,
        *,
        latent: bool,
        seed: int,
        device: torch.device,
    ):
        self.objective = objective
        self.device = device
        self.frozen: dict[str, nn.Module] = {}
        vae = trained_model(model)
        parameters = dict(vae.named_parameters())
        train_only(vae, [parameters[name] for name in vae.trainable_parameter_names()])
        self.trained: dict[str, nn.Module] = {"model": vae, "disc": build_discriminator(model)}
        self.terms = VAELossTerms(objective, self.trained["disc"], device)
        self.warned_fixed_weight = False

    def tokenizer(self) -> None:
        return None

    def losses(self, engines: Engines, batch: Batch, generator: torch.Generator, step: int) -> StepOutput:
        objective = self.objective
        video = batch.pixels().to(self.device)
        # Its encode/decode, not the engine's forward; the engine still owns backward.
        vae = self.trained["model"]
        with torch.no_grad():
            posterior = vae.encode(video)  # the encoder is frozen
        recon = vae.decode(posterior.sample(generator))  # (B, 3, T, H, W)
        rec, metrics = self.terms.reconstruction(recon, video)
        kl = posterior.kl().mean()
        loss = rec + objective.kl_weight * kl
        frame_diff = F.l1_loss(recon.diff(dim=2), video.diff(dim=2))
        metrics |= {"kl": kl.item(), "frame_diff_err": frame_diff.item()}
        return self.terms.step_output(engines, video, recon, loss, metrics, step, lambda g_adv: self.gan_weight(rec, g_adv))

    def gan_weight(self, rec: Tensor, g_adv: Tensor) -> Tensor | float:
        """The adaptive weight at the last temporal layer's convolution (the decoder's own last
        layers are frozen), or 1 when ZeRO-3 partitions it. The graph is the plain module's (the
        decode above does not go through the engine's forward)."""
        weight = self.trained["model"].up_temporal[-1][-1].conv.weight
        if hasattr(weight, "ds_tensor"):  # a ZeRO-3 partitioned parameter
            if not self.warned_fixed_weight:
                say(FIXED_GAN_WEIGHT)
                self.warned_fixed_weight = True
            return 1.0
        return adaptive_gan_weight(rec, g_adv, weight)

    def preview(self, engines: Engines, batch: Batch, generator: torch.Generator) -> Tensor | None:
        """The first clip and its reconstruction side by side (1, 3, T, H, 2W)."""
        with torch.no_grad():
            video = batch.pixels()[:1].to(self.device)
            recon = self.trained["model"].decode(self.trained["model"].encode(video).mode())
        return torch.cat([video, recon.clamp(-1, 1)], dim=-1)
