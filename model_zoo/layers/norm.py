"""Adaptive normalisation: GroupNorm / LayerNorm modulated by an embedding."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class AdaGroupNorm(nn.Module):
    """GroupNorm without affine, then `x * (1 + scale) + shift` with (scale, shift) = Linear(SiLU(emb)).

    Works on any (N, C, ...) input; `emb` is (N, emb_dim) (one row per frame in the U-Net's
    frame layout).
    """

    def __init__(self, channels: int, emb_dim: int, *, groups: int = 32, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=eps, affine=False)
        self.proj = nn.Linear(emb_dim, 2 * channels)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        scale, shift = self.proj(nn.functional.silu(emb)).chunk(2, dim=-1)  # 2 x (N, C)
        expand = (...,) + (None,) * (x.dim() - 2)
        return torch.addcmul(shift[expand], self.norm(x), 1 + scale[expand])


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation of tokens: x (B, N, D), shift/scale (B, D)."""
    return torch.addcmul(shift[:, None], x, 1 + scale[:, None])
