"""Timestep / class embeddings and fixed sin-cos position tables."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Transformer sinusoidal features of scalar timesteps: (B,) -> (B, dim), [cos | sin]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*half)
    return nn.functional.pad(emb, (0, dim - 2 * half))  # (B, dim)


class TimestepEmbedding(nn.Module):
    """Sinusoidal features of t followed by a 2-layer SiLU MLP (DDPM / LDM / DiT)."""

    def __init__(self, dim: int, *, frequency_dim: int = 256) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(sinusoidal_embedding(t, self.frequency_dim))  # (B,) -> (B, dim)


def _axis_table(positions: Tensor, dim: int) -> Tensor:
    """1-D sin-cos table: (L,) positions -> (L, dim) with dim even."""
    freqs = 1.0 / 10000 ** (torch.arange(dim // 2, device=positions.device, dtype=torch.float32) / (dim // 2))
    args = positions.float()[:, None] * freqs[None]  # (L, dim/2)
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)  # (L, dim)


def sincos_position_3d(grid: tuple[int, int, int], dim: int, device: torch.device | str) -> Tensor:
    """Fixed 3-D sin-cos position table for a (t, h, w) token grid -> (t*h*w, dim), t slowest.

    Each axis gets an equal even share of `dim`; leftover channels (dim not divisible by 6)
    are zero.
    """
    axis_dim = dim // 6 * 2
    tables = [_axis_table(torch.arange(n, device=device), axis_dim) for n in grid]  # 3 x (n_i, axis_dim)
    t, h, w = grid
    table = torch.cat(
        [
            tables[0][:, None, None].expand(t, h, w, axis_dim),
            tables[1][None, :, None].expand(t, h, w, axis_dim),
            tables[2][None, None, :].expand(t, h, w, axis_dim),
        ],
        dim=-1,
    ).reshape(t * h * w, 3 * axis_dim)  # (t*h*w, 3*axis_dim)
    return nn.functional.pad(table, (0, dim - 3 * axis_dim))  # (t*h*w, dim)
