"""The non-diffusion loss terms of the autoencoder tasks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ADAPTIVE_WEIGHT_EPS = 1e-4
"""δ in the adaptive GAN weight's denominator (taming-transformers' and LVDM's value)."""
ADAPTIVE_WEIGHT_MAX = 1e4
"""Upper clamp of the adaptive GAN weight."""


def reconstruction_loss(recon: Tensor, target: Tensor, loss_type: str) -> Tensor:
    """Mean L1 or L2 distance of a reconstruction."""
    return F.l1_loss(recon, target) if loss_type == "l1" else F.mse_loss(recon, target)


def perceptual_loss(distance: nn.Module, recon: Tensor, target: Tensor) -> Tensor:
    """The perceptual distance of videos (B, 3, T, H, W), frame by frame, averaged over the frames."""
    recon_frames = recon.transpose(1, 2).flatten(0, 1)  # (B*T, 3, H, W)
    target_frames = target.transpose(1, 2).flatten(0, 1)
    return distance(recon_frames, target_frames).mean()


def adaptive_gan_weight(rec_loss: Tensor, gan_loss: Tensor, last_weight: Tensor) -> Tensor:
    """λ = ‖∇_w L_rec‖ / (‖∇_w L_gan‖ + δ), clamped to [0, 1e4] and without gradient, with w the
    decoder's last weight (Esser et al. 2021, "Taming Transformers", eq. 7): the GAN term pulls on
    the output as hard as the reconstruction term does. Both graphs are kept for the backward."""
    (rec_grad,) = torch.autograd.grad(rec_loss, last_weight, retain_graph=True)
    (gan_grad,) = torch.autograd.grad(gan_loss, last_weight, retain_graph=True)
    ratio = rec_grad.norm() / (gan_grad.norm() + ADAPTIVE_WEIGHT_EPS)
    return ratio.clamp(0.0, ADAPTIVE_WEIGHT_MAX).detach()


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """The discriminator's hinge loss (Lim & Ye 2017, "Geometric GAN"; as in VQGAN)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())
