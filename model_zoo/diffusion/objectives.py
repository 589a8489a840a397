"""Training objectives of latent video diffusion (pure functions of their inputs).

- Forward process q(z_t | z_0) = N(√ᾱ_t z_0, (1-ᾱ_t) I): DDPM (Ho et al. 2020) eq. 4.
- Targets: ε (DDPM eq. 14), v = √ᾱ_t ε - √(1-ᾱ_t) z_0 (Salimans & Ho 2022, "Progressive
  distillation", §4 / appendix D), and z_0.
- LVDM (He et al. 2022, "Latent Video Diffusion Models for High-Fidelity Long Video
  Generation") §3.3: mask conditioning z̃_t = concat[z_t ⊙ (1-m) + z_cond ⊙ m, m] with the loss
  on the frames to predict, and conditional latent perturbation z_cond = q_sample(z_0_cond, s),
  s ~ U{0..s_max}, s fed to the network.

Layouts: latents are (B, C, T, H, W); a frame mask is (T,) or (B, T) with 1 on given frames.

See docs/methods.md, 'Forward process and the ε, v and x0 objectives', 'The denoising loss and
its reduction', 'LVDM: mask conditioning' and 'LVDM: conditional latent perturbation'.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Parameterization = Literal["eps", "v", "x0"]
MaskKind = Literal["none", "prediction", "interpolation"]
LossType = Literal["l2", "l1"]
DenoiseFn = Callable[..., Tensor]
"""`denoise_fn(x_t, t, **cond) -> model output`, t an int64 tensor of shape (B,)."""


def extract(values: Tensor, t: Tensor | int, like: Tensor) -> Tensor:
    """`values[t]` shaped to broadcast against `like` ((B,) -> (B, 1, ..., 1)), in its dtype."""
    picked = values.to(like.device)[t]
    if picked.ndim == 1:
        picked = picked.view(-1, *([1] * (like.ndim - 1)))
    return picked.to(like.dtype)


def q_sample(x0: Tensor, t: Tensor | int, noise: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """z_t = √ᾱ_t z_0 + √(1-ᾱ_t) ε (DDPM eq. 4, reparameterised)."""
    alpha_bar = extract(alphas_cumprod, t, x0)
    return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise


def target(
    kind: Parameterization, *, x0: Tensor, noise: Tensor, t: Tensor | int, alphas_cumprod: Tensor
) -> Tensor:
    """What a network of parameterisation `kind` regresses: ε, v = √ᾱ ε - √(1-ᾱ) z_0, or z_0."""
    if kind == "eps":
        return noise
    if kind == "x0":
        return x0
    if kind == "v":
        alpha_bar = extract(alphas_cumprod, t, x0)
        return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0
    raise ValueError(f"unknown parameterization {kind!r}; valid: eps, v, x0")


def predict_x0_eps(
    model_output: Tensor,
    x_t: Tensor,
    t: Tensor | int,
    *,
    alphas_cumprod: Tensor,
    parameterization: Parameterization,
) -> tuple[Tensor, Tensor]:
    """(ẑ_0, ε̂) from a model output of any parameterisation (DDIM eq. 9; Salimans & Ho eq. 31)."""
    alpha_bar = extract(alphas_cumprod, t, x_t)
    sqrt_a, sqrt_1ma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    if parameterization == "eps":
        return (x_t - sqrt_1ma * model_output) / sqrt_a, model_output
    if parameterization == "v":
        return sqrt_a * x_t - sqrt_1ma * model_output, sqrt_a * model_output + sqrt_1ma * x_t
    if parameterization == "x0":
        return model_output, (x_t - sqrt_a * model_output) / sqrt_1ma
    raise ValueError(f"unknown parameterization {parameterization!r}; valid: eps, v, x0")


def frame_losses(prediction: Tensor, regression_target: Tensor, loss_type: LossType) -> Tensor:
    """Per-frame loss (B, T): the element-wise L2/L1 error averaged over channels and space."""
    if loss_type == "l2":
        elementwise = F.mse_loss(prediction, regression_target, reduction="none")
    elif loss_type == "l1":
        elementwise = F.l1_loss(prediction, regression_target, reduction="none")
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: l2, l1")
    return elementwise.mean(dim=(1, 3, 4))  # (B, C, T, H, W) -> (B, T)


def diffusion_loss(
    denoise_fn: DenoiseFn,
    x0: Tensor,
    *,
    cond: Mapping[str, object] | None = None,
    t: Tensor,
    noise: Tensor,
    alphas_cumprod: Tensor,
    parameterization: Parameterization = "eps",
    loss_type: LossType = "l2",
    frame_weight: Tensor | None = None,
) -> Tensor:
    """Per-sample denoising loss (B,) ‖target - denoise_fn(z_t, t)‖ (DDPM eq. 14 "L_simple", per frame).

    z_t = q_sample(x0, t, noise); the training loss is the batch mean of the result. The error is
    computed in float32 whatever the network's precision. `frame_weight` ((T,) or (B, T), 1 on
    frames that count) restricts each sample's loss to the frames to predict, as LVDM §3.3 does
    with `1 - mask`: a sample's loss is the mean over its counted frames (0 when none count).
    """
    x_t = q_sample(x0, t, noise, alphas_cumprod)
    prediction = denoise_fn(x_t, t, **(cond or {}))
    wanted = target(parameterization, x0=x0, noise=noise, t=t, alphas_cumprod=alphas_cumprod)
    per_frame = frame_losses(prediction.float(), wanted.float(), loss_type)  # (B, T)
    weight = torch.ones_like(per_frame) if frame_weight is None else frame_weight.to(per_frame).expand_as(per_frame)
    return (per_frame * weight).sum(1) / weight.sum(1).clamp_min(1.0)  # (B, T) -> (B,)


def build_mask(kind: MaskKind, num_frames: int, num_cond_frames: int = 1) -> Tensor:
    """LVDM frame mask (T,): `none` all 0; `prediction` first k = 1; `interpolation` first and last k = 1.

    LVDM's interpolation model uses k = 1 (its two keyframes).
    """
    mask = torch.zeros(num_frames)
    if kind == "prediction":
        mask[:num_cond_frames] = 1
    elif kind == "interpolation":
        mask[:num_cond_frames] = 1
        mask[num_frames - num_cond_frames :] = 1
    elif kind != "none":
        raise ValueError(f"unknown mask kind {kind!r}; valid: none, prediction, interpolation")
    return mask


def draw_mask_kind(generator: torch.Generator, p_pred: float, p_interp: float) -> MaskKind:
    """One training mask kind: interpolation w.p. p_interp, prediction w.p. p_pred, else none."""
    if p_pred < 0 or p_interp < 0 or p_pred + p_interp > 1:
        raise ValueError(f"need p_pred, p_interp >= 0 and p_pred + p_interp <= 1, got {p_pred}, {p_interp}")
    u = float(torch.rand((), generator=generator, dtype=torch.float64))
    if u < p_interp:
        return "interpolation"
    if u < p_interp + p_pred:
        return "prediction"
    return "none"


def draw_masks(
    generator: torch.Generator,
    batch_size: int,
    num_frames: int,
    *,
    num_cond_frames: int,
    p_pred: float,
    p_interp: float,
) -> Tensor:
    """A (B, T) training mask, one kind drawn per sample with `draw_mask_kind`."""
    kinds = [draw_mask_kind(generator, p_pred, p_interp) for _ in range(batch_size)]
    return torch.stack([build_mask(kind, num_frames, num_cond_frames) for kind in kinds])


def apply_mask_conditioning(z_t: Tensor, z_cond: Tensor, mask: Tensor) -> Tensor:
    """LVDM's network input concat[z_t ⊙ (1-m) + z_cond ⊙ m, m] along channels (dim 1).

    z_t, z_cond: (B, C, T, H, W); mask: (T,) or (B, T). Returns (B, C+1, T, H, W).
    """
    batch, _, frames, height, width = z_t.shape
    m = mask.to(z_t).reshape(-1, 1, frames, 1, 1)  # (T,) | (B, T) -> (B|1, 1, T, 1, 1)
    mixed = z_t * (1 - m) + z_cond * m
    mask_channel = m.expand(batch, 1, frames, height, width)
    return torch.cat([mixed, mask_channel], dim=1)  # -> (B, C+1, T, H, W)


def draw_perturbation_levels(generator: torch.Generator, batch_size: int, s_max: int = 250) -> Tensor:
    """LVDM's conditional perturbation levels s ~ U{0..s_max}, int64 of shape (B,)."""
    return torch.randint(0, s_max + 1, (batch_size,), generator=generator)


def perturb_condition(z0_cond: Tensor, s: Tensor | int, noise: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """LVDM's conditional latent perturbation: z_cond = q_sample(z_0_cond, s) (s is a timestep).

    As in LVDM's code, s = 0 still applies timestep 0's (tiny) noise.
    """
    return q_sample(z0_cond, s, noise, alphas_cumprod)
