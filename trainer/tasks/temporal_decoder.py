"""Task `temporal_decoder`: VidRD's temporal-aware decoder fine-tune (docs/methods.md, 'VidRD:
temporal-aware decoder'). Only the decoder's new temporal layers train; the image VAE stays frozen.

The loss is the paper's L = α_rec·L_rec + α_reg·L_reg + α_disc·L_disc, built from the `autoencoder`
task's terms: L_rec the pixel distance (+ the perceptual distance when weights are given), L_reg
the KL of the (frozen) encoder's posterior, and from `disc_start` on the hinge GAN against the 3D
patch discriminator (engine "disc"), with the adaptive weight measured at the last temporal layer:
the last weight that trains.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.config import ModelConfig, TemporalDecoderObjective
from trainer.tasks.autoencoder import AutoencoderTask, say
from trainer.tasks.interface import Batch, Engines, StepOutput
from trainer.tasks.losses import adaptive_gan_weight, hinge_d_loss
from trainer.tasks.networks import train_only

FIXED_GAN_WEIGHT = (
    "temporal_decoder: ZeRO-3 partitions the last temporal layer, so the adaptive GAN weight cannot be "
    "measured there: the GAN term uses the fixed weight objective.adv_weight"
)
"""The run log's line when the adaptive GAN weight falls back to the fixed one."""


class TemporalDecoderTask(AutoencoderTask):
    """The `autoencoder` task's losses and discriminator, on the temporal layers of the decoder only."""

    def __init__(
        self,
        objective: TemporalDecoderObjective,
        model: ModelConfig,
        *,
        latent: bool,
        seed: int,
        device: torch.device,
    ):
        super().__init__(objective, model, latent=latent, seed=seed, device=device)  # type: ignore[arg-type]
        vae = self.trained["model"]
        parameters = dict(vae.named_parameters())
        train_only(vae, [parameters[name] for name in vae.trainable_parameter_names()])

    def losses(self, engines: Engines, batch: Batch, generator: torch.Generator, step: int) -> StepOutput:
        objective = self.objective
        video = batch.pixels().to(self.device)
        # Its encode/decode, not the engine's forward; the engine still owns backward.
        vae = self.trained["model"]
        with torch.no_grad():
            posterior = vae.encode(video)  # the encoder is frozen
        recon = vae.decode(posterior.sample(generator))  # (B, 3, T, H, W)
        rec, metrics = self.reconstruction(recon, video)
        kl = posterior.kl().mean()
        loss = rec + objective.kl_weight * kl
        metrics |= {"kl": kl.item(), "frame_diff_err": F.l1_loss(recon.diff(dim=2), video.diff(dim=2)).item()}
        adversarial = step >= objective.disc_start
        if adversarial:
            g_adv = self.generator_adversarial(recon)
            weight = objective.adv_weight * self.temporal_gan_weight(rec, g_adv)
            loss = loss + weight * g_adv
            metrics |= {"g_adv": g_adv.item(), "adv_weight": float(weight)}
        out = [("model", loss)]
        if adversarial:
            d_loss = hinge_d_loss(engines["disc"](video), engines["disc"](recon.detach()))
            out.append(("disc", d_loss))
            metrics["d_loss"] = d_loss.item()
        return StepOutput(out, metrics)

    def temporal_gan_weight(self, rec: Tensor, g_adv: Tensor) -> Tensor | float:
        """The adaptive weight at the last temporal layer's convolution (the decoder's last layers
        are frozen), or 1 when ZeRO-3 partitions it."""
        weight = self.trained["model"].up_temporal[-1][-1].conv.weight
        if hasattr(weight, "ds_tensor"):  # a ZeRO-3 partitioned parameter
            if not self.warned_fixed_weight:
                say(FIXED_GAN_WEIGHT)
                self.warned_fixed_weight = True
            return 1.0
        return adaptive_gan_weight(rec, g_adv, weight)
