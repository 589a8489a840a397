"""Noise schedules of discrete-time diffusion (DDPM, Ho et al. 2020; DDIM, Song et al. 2021).

Notation: `betas[t]` is β_t of DDPM eq. 2 for t = 0..T-1 (0-based, as diffusers and LDM index
them); `alphas_cumprod[t]` is ᾱ_t = ∏_{s<=t} (1 - β_s) of DDPM eq. 4. Schedules are returned
in float64 so that samplers can run their arithmetic in double precision when asked.

Names, precisely (LDM's own names are misleading, so we do not reuse them):

| our kind        | β_t                                       | diffusers           | LDM / LVDM code |
|-----------------|-------------------------------------------|---------------------|-----------------|
| `linear`        | linspace(β_0, β_1)                        | `linear`            | `sqrt_linear`   |
| `sqrt_linear`   | linspace(√β_0, √β_1)²  (√β linear in t)    | `scaled_linear`     | `linear`        |
| `scaled_linear` | the same as `sqrt_linear`                 | `scaled_linear`     | `linear`        |
| `cosine`        | Nichol & Dhariwal 2021 eq. 17, β ≤ 0.999  | `squaredcos_cap_v2` | `cosine`        |

LVDM's "linear 0.0015 → 0.0155" is therefore `sqrt_linear`; Stable Diffusion's
"scaled_linear 0.00085 → 0.012" is the same formula with other endpoints. See docs/methods.md,
'Noise schedules'.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

BetaScheduleKind = Literal["linear", "sqrt_linear", "scaled_linear", "cosine"]

_COSINE_OFFSET = 0.008
"""s of Nichol & Dhariwal 2021 eq. 17."""
_COSINE_MAX_BETA = 0.999
"""Clip of β_t in the cosine schedule (Nichol & Dhariwal 2021, below eq. 17)."""


def _cosine_betas(num_steps: int) -> Tensor:
    def alpha_bar(u: float) -> float:
        return math.cos((u + _COSINE_OFFSET) / (1 + _COSINE_OFFSET) * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), _COSINE_MAX_BETA)
        for i in range(num_steps)
    ]
    return torch.tensor(betas, dtype=torch.float64)


def make_betas(
    kind: BetaScheduleKind,
    num_steps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
) -> Tensor:
    """β_0..β_{T-1} as a float64 tensor of shape (num_steps,); see the module table for `kind`.

    `beta_start` / `beta_end` are ignored by `cosine`. Defaults are Stable Diffusion's endpoints.
    """
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    if kind in ("sqrt_linear", "scaled_linear"):
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2
    if kind == "cosine":
        return _cosine_betas(num_steps)
    raise ValueError(f"unknown beta schedule {kind!r}; valid: linear, sqrt_linear, scaled_linear, cosine")


def alphas_cumprod(betas: Tensor) -> Tensor:
    """ᾱ_t = ∏_{s<=t} (1 - β_s) (DDPM eq. 4), same shape and dtype as `betas`."""
    return torch.cumprod(1.0 - betas, dim=0)


def ddim_timesteps(num_train_steps: int, num_inference_steps: int, *, steps_offset: int = 1) -> Tensor:
    """Descending sampling timesteps with diffusers' "leading" spacing (DDIM, Song et al. 2021 §4.2).

    t_k = k · (T // S) + steps_offset for k = S-1..0, as int64 of shape (S,). `steps_offset=1`
    is Stable Diffusion's scheduler config and LDM/LVDM's `make_ddim_timesteps` ("uniform", +1);
    `steps_offset=0` is diffusers' default. With S = T and offset 0 this is T-1..0 (full DDPM).
    """
    if not 0 < num_inference_steps <= num_train_steps:
        raise ValueError(f"num_inference_steps must be in 1..{num_train_steps}, got {num_inference_steps}")
    step_ratio = num_train_steps // num_inference_steps
    timesteps = torch.arange(num_inference_steps, dtype=torch.int64) * step_ratio + steps_offset
    if timesteps[-1] >= num_train_steps:
        raise ValueError(
            f"steps_offset={steps_offset} puts timestep {int(timesteps[-1])} past T={num_train_steps}"
        )
    return timesteps.flip(0)
