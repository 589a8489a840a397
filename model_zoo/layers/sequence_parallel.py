"""Ulysses sequence parallelism for the DiT families, applied to a single-device model from outside.

The token sequence (B, N, D) is cut into P equal parts after the embedding (zero-padded to a
multiple of P); each of the P ranks of a sequence-parallel group runs every block on its part.
Token-wise layers (norms, modulation, MLP, projections, cross-attention queries against the
replicated text) need nothing else. Each self-attention swaps layouts twice with an all-to-all:
its sequence-sharded heads (B, h, N/P, d) become head-sharded full sequences (B, h/P, N, d), the
padding is cut off (so padded keys are never attended, as a mask would do, and padded queries are
not computed), rotary embedding is applied with the global positions, attention runs, and a
second all-to-all returns (B, h, N/P, d). The prediction is all-gathered before unpatchify.

Gradients: the all-to-all's backward is the reverse all-to-all; the all-gather's backward keeps
the rank's own part of the incoming gradient (every rank of the group computes the same loss from
the same gathered prediction, so that part is the exact gradient of its tokens). A parameter's
gradient on one rank is then the contribution of that rank's tokens, and the sum over the group
is the full gradient: the trainer's gradient reduction must sum over the group and average over
data-parallel replicas only.

No torch.distributed here (model code stays single-device): the caller passes the collectives.
See docs/methods.md, 'Sequence parallelism (Ulysses)'.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model_zoo.layers.attention import attention_heads


@dataclass(frozen=True)
class Collectives:
    """The communication of one sequence-parallel group, bound by the caller (trainer, sampler)."""

    rank: int
    """This process' index in the group."""
    size: int
    """Ranks in the group (the SP degree P)."""
    all_to_all: Callable[[Tensor], Tensor]
    """(P, ...) -> (P, ...): chunk j goes to rank j; chunk j of the result came from rank j."""
    all_gather: Callable[[Tensor], Tensor]
    """(...) -> (P, ...): every rank's tensor, stacked in rank order."""


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, comm: Collectives) -> Tensor:  # type: ignore[override]
        ctx.comm = comm
        return comm.all_to_all(x.contiguous())

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        # Chunk j went to rank j; its gradient comes back from rank j the same way.
        return ctx.comm.all_to_all(grad.contiguous()), None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, comm: Collectives) -> Tensor:  # type: ignore[override]
        ctx.comm = comm
        parts = comm.all_gather(x.contiguous())  # (P, B, L, C)
        return torch.cat(parts.unbind(0), dim=1)  # (B, P*L, C)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad.chunk(ctx.comm.size, dim=1)[ctx.comm.rank].contiguous(), None


class Ulysses:
    """A model's `sequence_shard` and its self-attentions' `core` for one SP group (see the module
    docstring). `length` is the true sequence length of the forward in flight (set by `shard`)."""

    def __init__(self, comm: Collectives) -> None:
        self.comm = comm
        self.length = 0

    def padded(self, length: int) -> int:
        return -(-length // self.comm.size) * self.comm.size

    def shard(self, tokens: Tensor) -> Tensor:
        """(B, N, D) -> this rank's (B, ceil(N/P), D), zero-padded at the end of the sequence."""
        self.length = tokens.shape[1]
        tokens = F.pad(tokens, (0, 0, 0, self.padded(self.length) - self.length))
        return tokens.chunk(self.comm.size, dim=1)[self.comm.rank]

    def gather(self, tokens: Tensor) -> Tensor:
        """This rank's (B, ceil(N/P), C) -> every rank's (B, N, C)."""
        return _Gather.apply(tokens, self.comm)[:, : self.length]

    def _to_heads(self, x: Tensor) -> Tensor:
        """(B, h, N/P, d) sequence-sharded -> (B, h/P, N, d) head-sharded, padding removed."""
        p = self.comm.size
        b, h, local, d = x.shape
        chunks = x.view(b, p, h // p, local, d).transpose(0, 1)  # (P, B, h/P, N/P, d): heads for rank j
        received = _AllToAll.apply(chunks, self.comm)  # (P, B, h/P, N/P, d): sequence part j
        full = received.permute(1, 2, 0, 3, 4).reshape(b, h // p, p * local, d)
        return full[:, :, : self.length]

    def _to_sequence(self, x: Tensor) -> Tensor:
        """(B, h/P, N, d) -> (B, h, N/P, d), zero rows for the padding."""
        p = self.comm.size
        b, heads, length, d = x.shape
        x = F.pad(x, (0, 0, 0, self.padded(length) - length))
        chunks = x.view(b, heads, p, -1, d).permute(2, 0, 1, 3, 4)  # (P, B, h/P, N/P, d): sequence part j
        received = _AllToAll.apply(chunks, self.comm)  # (P, B, h/P, N/P, d): head group j
        return received.transpose(0, 1).reshape(b, heads * p, -1, d)

    def core(
        self, q: Tensor, k: Tensor, v: Tensor, rotary: tuple[Tensor, Tensor] | None = None, mask: Tensor | None = None
    ) -> Tensor:
        """Self-attention of sequence-sharded heads (B, h, N/P, d) over the whole sequence."""
        if mask is not None:
            raise ValueError("sequence parallelism: an attention mask or bias over the sharded sequence is not supported")
        out = attention_heads(*(self._to_heads(x) for x in (q, k, v)), rotary)  # (B, h/P, N, d)
        return self._to_sequence(out)


def self_attentions(model: nn.Module) -> list[nn.Module]:
    """The blocks' self-attention modules (those whose `core` sequence parallelism replaces)."""
    return [block.attn for block in model.checkpoint_modules()]


def apply_ulysses(model: nn.Module, comm: Collectives) -> Ulysses:
    """Run `model` (a `dit` or `video_dit`) sequence-parallel over `comm`'s group, in place.

    Raises ValueError (naming the reason) for a model without the hook points, a head count not
    divisible by the group size, or joint (MM-DiT) text attention.
    """
    name = type(model).__name__
    if not hasattr(model, "sequence_shard"):
        raise ValueError(f"sequence parallelism: {name} is not a DiT (families dit and video_dit support it)")
    if getattr(getattr(model, "config", None), "text_attention", "cross") == "joint":
        raise ValueError("sequence parallelism: video_dit with text_attention=joint is not supported (use cross)")
    attentions = self_attentions(model)
    for attention in attentions:
        if attention.heads % comm.size:
            raise ValueError(
                f"sequence parallelism: {name} has {attention.heads} attention heads, not divisible by the "
                f"SP degree {comm.size} (Ulysses shards heads; ring attention is not implemented)"
            )
    ulysses = Ulysses(comm)
    model.sequence_shard = ulysses
    for attention in attentions:
        attention.core = ulysses.core
    return ulysses
