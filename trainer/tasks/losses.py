"""The non-diffusion loss terms of the autoencoder tasks."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def reconstruction_loss(recon: Tensor, target: Tensor, loss_type: str) -> Tensor:
    """Mean L1 or L2 distance of a reconstruction."""
    return F.l1_loss(recon, target) if loss_type == "l1" else F.mse_loss(recon, target)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """The discriminator's hinge loss (Lim & Ye 2017, "Geometric GAN"; as in VQGAN)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())
