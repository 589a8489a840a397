"""Multi-head attention blocks on token sequences, built on `F.scaled_dot_product_attention`.

`CrossAttention` is the single class every text (or image-token) cross-attention in the model
zoo uses, so wrappers (StreamingT2V's APM) find all of them with
`[m for m in model.modules() if isinstance(m, CrossAttention)]` and may change the `context`
each one receives.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def merge_heads(x: Tensor) -> Tensor:
    """(N, h, L, d) -> (N, L, h*d)."""
    n, h, length, d = x.shape
    return x.transpose(1, 2).reshape(n, length, h * d)


def rotary_tables(length: int, head_dim: int, device: torch.device | str) -> tuple[Tensor, Tensor]:
    """cos/sin tables (L, head_dim/2) of rotary position embedding (RoFormer) for positions 0..L-1."""
    freqs = 1.0 / 10000 ** (torch.arange(head_dim // 2, device=device, dtype=torch.float32) / (head_dim // 2))
    angles = torch.arange(length, device=device, dtype=torch.float32)[:, None] * freqs[None]  # (L, d/2)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs (i, i + d/2) of x (N, h, L, d) by position-dependent angles."""
    first, second = x.chunk(2, dim=-1)  # 2 x (N, h, L, d/2)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)  # (N, h, L, d)


def attention_heads(
    q: Tensor, k: Tensor, v: Tensor, rotary: tuple[Tensor, Tensor] | None = None, mask: Tensor | None = None
) -> Tensor:
    """Scaled dot-product attention of heads (N, h, L, d), (N, h, S, d) -> (N, h, L, d).

    `rotary` cos/sin tables (n, d/2) rotate the first n queries and keys (all of them when n = L);
    `mask` is `F.scaled_dot_product_attention`'s attn_mask (additive, or bool with True = attend).
    """
    if rotary is not None:
        n = rotary[0].shape[0]
        if n == q.shape[2] == k.shape[2]:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        else:
            q = torch.cat([apply_rotary(q[:, :, :n], *rotary), q[:, :, n:]], dim=2)
            k = torch.cat([apply_rotary(k[:, :, :n], *rotary), k[:, :, n:]], dim=2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


AttentionCore = Callable[..., Tensor]
"""The signature of `attention_heads`: (q, k, v, rotary, mask) -> heads (N, h, L, d).

A self-attention module whose `core` attribute is set runs that instead (the trainer and the
sampler put a sequence-parallel core there; the model itself stays single-device)."""


class SequenceShard(Protocol):
    """What a transformer does with its token sequence around its blocks, when set from outside
    (its `sequence_shard` attribute): `shard` keeps this device's part of the tokens (B, N, D) ->
    (B, N_local, D) after the embedding, `gather` puts the full sequence back together before
    unpatchify."""

    def shard(self, tokens: Tensor) -> Tensor: ...

    def gather(self, tokens: Tensor) -> Tensor: ...


class RelativePositionBias(nn.Module):
    """Learned per-head additive attention bias indexed by the clipped distance j - i."""

    def __init__(self, heads: int, max_distance: int) -> None:
        super().__init__()
        self.max_distance = max_distance
        self.table = nn.Parameter(torch.zeros(heads, 2 * max_distance + 1))

    def forward(self, length: int) -> Tensor:
        pos = torch.arange(length, device=self.table.device)
        distance = (pos[None, :] - pos[:, None]).clamp(-self.max_distance, self.max_distance)  # (L, L)
        return self.table[:, distance + self.max_distance][None]  # (1, h, L, L)


class SelfAttention(nn.Module):
    """Self-attention over (N, L, C) tokens with a fused qkv projection.

    `bias` is an additive (…, h, L, L) attention bias; `rotary` are cos/sin tables from
    `rotary_tables` applied to queries and keys. `core` (None: `attention_heads`) computes the
    attention of the projected heads.
    """

    def __init__(self, dim: int, heads: int, *, qkv_bias: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.out = nn.Linear(dim, dim)
        self.core: AttentionCore | None = None

    def forward(
        self, x: Tensor, *, bias: Tensor | None = None, rotary: tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        n, length, dim = x.shape
        qkv = self.qkv(x).view(n, length, 3, self.heads, dim // self.heads)  # (N, L, 3, h, d)
        # Unbinding the qkv axis in place makes the backward one stack straight into the
        # projection's (N, L, 3, h, d) layout, with no extra reshape copy.
        q, k, v = (part.transpose(1, 2) for part in qkv.unbind(2))  # 3 x (N, h, L, d)
        mask = bias.to(q.dtype) if bias is not None else None
        out = (self.core or attention_heads)(q, k, v, rotary, mask)  # (N, h, L, d)
        return self.out(merge_heads(out))  # (N, L, C)


class CrossAttention(nn.Module):
    """Queries from tokens x (N, L, C); keys and values from `context` (N, S, context_dim).

    `context_mask` (N, S) bool marks the real context tokens (a padded T5 prompt's padding is
    False and is not attended); None attends to every token.

    The output projection is zero-initialised when `zero_init` (a new conditioning path
    then starts as the identity of its residual branch).
    """

    def __init__(
        self, dim: int, context_dim: int, heads: int, *, qkv_bias: bool = False, zero_init: bool = False
    ) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(context_dim, 2 * dim, bias=qkv_bias)
        self.out = nn.Linear(dim, dim)
        if zero_init:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, context: Tensor, context_mask: Tensor | None = None) -> Tensor:
        n, length, dim = x.shape
        head_dim = dim // self.heads
        q = self.q(x).view(n, length, self.heads, head_dim).transpose(1, 2)  # (N, h, L, d)
        kv = self.kv(context).view(n, context.shape[1], 2, self.heads, head_dim)  # (N, S, 2, h, d)
        k, v = (part.transpose(1, 2) for part in kv.unbind(2))  # 2 x (N, h, S, d)
        keep = None if context_mask is None else context_mask.bool()[:, None, None, :]  # (N, 1, 1, S)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)  # (N, h, L, d)
        return self.out(merge_heads(out))  # (N, L, C)


class FeedForward(nn.Module):
    """Token MLP: GELU(tanh) MLP (DiT) or GEGLU (LDM) when `gated`.

    GEGLU's value and gate projections are two Linear modules rather than one of width 2·hidden
    split in two: the backward then adds two (N, L, C) input gradients instead of concatenating two
    (N, L, hidden) ones, and each weight is used through its own module's forward (ZeRO-3 gathers
    a partitioned parameter only in its module's hooks).
    """

    def __init__(self, dim: int, *, mult: float = 4.0, gated: bool = False) -> None:
        super().__init__()
        hidden = int(dim * mult)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc_gate = nn.Linear(dim, hidden) if gated else None
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        if self.fc_gate is not None:
            h = self.fc1(x) * F.gelu(self.fc_gate(x))  # (N, L, hidden)
        else:
            h = F.gelu(self.fc1(x), approximate="tanh")  # (N, L, hidden)
        return self.fc2(h)  # (N, L, C)
