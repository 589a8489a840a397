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

Ring attention (`RingAttention`, `apply_ring`) shards keys instead of heads, and combines with
Ulysses into the hybrid (USP): P = U x R ranks, an all-to-all over heads inside groups of U, a ring
among R (see its docstring and `usp_groups` for the rank layout).

No torch.distributed here (model code stays single-device): the caller passes the collectives.
See docs/methods.md, 'Sequence parallelism (Ulysses)' and 'Ring attention and the hybrid'.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model_zoo.layers.attention import apply_rotary, attention_heads


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
    ring_shift: Callable[[Tensor, int], Tensor] | None = None
    """(x, offset) -> the x of rank (rank - offset) mod P, while this rank's x goes to rank
    (rank + offset) mod P (point-to-point; ring attention only)."""


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


def heads_from_sequence(x: Tensor, comm: Collectives) -> Tensor:
    """The Ulysses exchange over `comm` (P ranks): this rank's sequence part of every head
    (B, h, L, d) -> P consecutive sequence parts (rank order) of its h/P heads (B, h/P, P*L, d)."""
    p = comm.size
    b, h, local, d = x.shape
    chunks = x.view(b, p, h // p, local, d).transpose(0, 1)  # (P, B, h/P, L, d): heads for rank j
    received = _AllToAll.apply(chunks, comm)  # (P, B, h/P, L, d): sequence part j
    return received.permute(1, 2, 0, 3, 4).reshape(b, h // p, p * local, d)


def sequence_from_heads(x: Tensor, comm: Collectives) -> Tensor:
    """The reverse exchange: (B, h/P, P*L, d) -> this rank's sequence part of every head (B, h, L, d)."""
    p = comm.size
    b, heads, length, d = x.shape
    chunks = x.view(b, heads, p, length // p, d).permute(2, 0, 1, 3, 4)  # (P, B, h/P, L, d): part j
    received = _AllToAll.apply(chunks, comm)  # (P, B, h/P, L, d): head group j
    return received.transpose(0, 1).reshape(b, heads * p, -1, d)


class _Sharding:
    """The part every scheme shares: a model's `sequence_shard` over the SP group `comm` cuts the
    tokens into equal parts after the embedding and gathers the prediction. `length` is the true
    sequence length of the forward in flight (set by `shard`)."""

    comm: Collectives
    length: int

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


class Ulysses(_Sharding):
    """A model's `sequence_shard` and its self-attentions' `core` for one SP group (see the module
    docstring). `length` is the true sequence length of the forward in flight (set by `shard`)."""

    def __init__(self, comm: Collectives) -> None:
        self.comm = comm
        self.length = 0

    def _to_heads(self, x: Tensor) -> Tensor:
        """(B, h, N/P, d) sequence-sharded -> (B, h/P, N, d) head-sharded, padding removed."""
        return heads_from_sequence(x, self.comm)[:, :, : self.length]

    def _to_sequence(self, x: Tensor) -> Tensor:
        """(B, h/P, N, d) -> (B, h, N/P, d), zero rows for the padding."""
        length = x.shape[2]
        return sequence_from_heads(F.pad(x, (0, 0, 0, self.padded(length) - length)), self.comm)

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


def _hook_points(model: nn.Module) -> list[nn.Module]:
    """The self-attentions of `model` whose `core` a scheme replaces; ValueError (naming the reason)
    for a model without the hook points or with joint (MM-DiT) text attention."""
    name = type(model).__name__
    if not hasattr(model, "sequence_shard"):
        raise ValueError(f"sequence parallelism: {name} is not a DiT (families dit and video_dit support it)")
    if getattr(getattr(model, "config", None), "text_attention", "cross") == "joint":
        raise ValueError("sequence parallelism: video_dit with text_attention=joint is not supported (use cross)")
    return self_attentions(model)


def _install(model: nn.Module, attentions: list[nn.Module], scheme: Ulysses | RingAttention) -> None:
    model.sequence_shard = scheme
    for attention in attentions:
        attention.core = scheme.core


def apply_ulysses(model: nn.Module, comm: Collectives) -> Ulysses:
    """Run `model` (a `dit` or `video_dit`) sequence-parallel over `comm`'s group, in place.

    Raises ValueError (naming the reason) for a model without the hook points, a head count not
    divisible by the group size, or joint (MM-DiT) text attention.
    """
    name = type(model).__name__
    attentions = _hook_points(model)
    for attention in attentions:
        if attention.heads % comm.size:
            raise ValueError(
                f"sequence parallelism: {name} has {attention.heads} attention heads, not divisible by the "
                f"SP degree {comm.size} (Ulysses shards heads; ring attention shards keys instead: "
                f"train.sp_ring={comm.size}, or lvd sample --sp-ring {comm.size})"
            )
    ulysses = Ulysses(comm)
    _install(model, attentions, ulysses)
    return ulysses


class _RingShift(torch.autograd.Function):
    """Send to the next rank of the ring, receive from the previous; the gradient goes back the
    other way, so every block's dK/dV returns to the rank that made it."""

    @staticmethod
    def forward(ctx, x: Tensor, comm: Collectives) -> Tensor:  # type: ignore[override]
        ctx.comm = comm
        return comm.ring_shift(x.contiguous(), 1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return ctx.comm.ring_shift(grad.contiguous(), -1), None


def usp_groups(size: int, ring: int) -> tuple[list[list[int]], list[list[int]]]:
    """The Ulysses groups and the ring groups (lists of SP ranks) of SP degree `size` = U x R.

    SP rank s = r * U + u: the U ranks of Ulysses group r are consecutive, so their sequence parts
    are one contiguous chunk (chunk r of R) after their all-to-all; ring group u joins the ranks
    that hold head group u of every chunk, in chunk order."""
    if ring < 1 or size % ring:
        raise ValueError(f"ring degree {ring} does not divide the SP degree {size}")
    heads = size // ring
    return (
        [[r * heads + u for u in range(heads)] for r in range(ring)],
        [[r * heads + u for r in range(ring)] for u in range(heads)],
    )


FUSED_DEVICES = ("cpu", "meta")
"""Devices whose ring blocks run PyTorch's fused CPU flash-attention kernels (see `_BlockAttention`)."""


def _stat_dtype(x: Tensor) -> torch.dtype:
    """The dtype of the online-softmax statistics: float32, float64 for float64 inputs."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class _BlockAttention(torch.autograd.Function):
    """One key/value block's unnormalised attention: with scores s = q kᵀ / √d (keys not `valid`:
    -inf) and a per-row shift m, returns m (B, h, L, 1) (`_stat_dtype`), l = Σ_j exp(s_ij - m) and
    acc = Σ_j exp(s_ij - m) v_j; m is -inf for a block with no valid key (l = acc = 0).

    m is not differentiable: the fold treats every block's m as a constant, which softmax's shift
    invariance allows, so the gradients are exactly attention's. Nothing of size L x S is kept
    for the backward, only q, k, v and m (the scores are recomputed, FlashAttention's way).

    On CPU (and `meta`) both directions are PyTorch's fused CPU flash-attention kernels: forward
    with m = its log-sum-exp, so l = 1 and acc = its output; its backward computes
    dS = P ∘ (dO Vᵀ - rowsum(dO ∘ O)) from the `out` it is given, so calling it with V extended by a
    column of ones, dO by the column dl, and O = 0 yields P ∘ (dacc Vᵀ + dl), the gradient of
    (acc, l) (q and k get a zero column, which leaves the scores as they are). Elsewhere the same
    quantities are computed with plain matmuls (shift: the row max)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        b, h, length, d = q.shape
        stats, dtype = (b, h, length, 1), _stat_dtype(q)
        ctx.fused = q.device.type in FUSED_DEVICES
        ctx.empty = q.device.type != "meta" and not bool(valid.any())
        if ctx.empty:  # nothing to attend in this block
            ctx.mark_non_differentiable(m := q.new_full(stats, float("-inf"), dtype=dtype))
            return m, q.new_zeros(stats, dtype=dtype), q.new_zeros(q.shape)
        bias = None  # on `meta` (shapes only) the mask is left out
        if q.device.type != "meta" and not bool(valid.all()):
            bias = torch.zeros(valid.shape, dtype=q.dtype, device=q.device).masked_fill(~valid, float("-inf"))
            bias = bias.expand(1, 1, length, -1)
        if ctx.fused:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=bias, scale=d**-0.5)[:2]
            m, total, acc = lse[..., None].to(dtype), q.new_ones(stats, dtype=dtype), out
        else:
            weights, m = _BlockAttention._weights(q, k, bias, None)
            total, acc = weights.sum(-1, keepdim=True).to(dtype), weights @ v
        ctx.save_for_backward(q, k, v, bias, m)
        ctx.mark_non_differentiable(m)
        return m, total, acc

    @staticmethod
    def _weights(q: Tensor, k: Tensor, bias: Tensor | None, m: Tensor | None) -> tuple[Tensor, Tensor]:
        scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, h, L, S)
        if bias is not None:
            scores = scores + bias
        if m is None:
            m = scores.amax(-1, keepdim=True).to(_stat_dtype(q))
        return torch.exp(scores - m.to(scores.dtype)), m

    @staticmethod
    def backward(ctx, _grad_m: Tensor, grad_sum: Tensor, grad_acc: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if ctx.empty:
            return None, None, None, None
        q, k, v, bias, m = ctx.saved_tensors
        scale = q.shape[-1] ** -0.5
        if ctx.fused:

            def widen(x: Tensor, fill: float) -> Tensor:
                return torch.cat([x, torch.full_like(x[..., :1], fill)], dim=-1)

            grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                torch.cat([grad_acc, grad_sum.to(grad_acc.dtype)], dim=-1), widen(q, 0.0), widen(k, 0.0), widen(v, 1.0),
                q.new_zeros((*q.shape[:-1], q.shape[-1] + 1)), m[..., 0],
                0.0, False, attn_mask=bias, scale=scale,
            )
            return *(g[..., :-1] for g in grads), None
        weights, _ = _BlockAttention._weights(q, k, bias, m)  # (B, h, L, S)
        grad_scores = weights * (grad_acc @ v.transpose(-1, -2) + grad_sum.to(weights.dtype)) * scale
        return grad_scores @ k, grad_scores.transpose(-1, -2) @ q, weights.transpose(-1, -2) @ grad_acc, None


def ring_block(q: Tensor, k: Tensor, v: Tensor, valid: Tensor, state: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Fold one key/value block into the online-softmax state (Milakov & Gimelshein 2018; the
    FlashAttention recurrence): q (B, h, L, d), k/v (B, h, S, d), `valid` (S,) bool marks the real
    keys; state = (running max m (B, h, L, 1), running sum l (B, h, L, 1), unnormalised output
    acc (B, h, L, d)), starting from (-inf, 0, 0). The output is acc / l after the last block.

    Both the state and the block are rescaled to the new running max; a fully masked block (or
    row) has max -inf and adds exp(-inf) = 0, never a NaN (the shift is 0 while the max is -inf)."""
    m, total, acc = state
    block_m, block_sum, block_acc = _BlockAttention.apply(q, k, v, valid)
    new_m = torch.maximum(m, block_m)
    shift = torch.where(torch.isinf(new_m), torch.zeros_like(new_m), new_m)
    old_scale, block_scale = torch.exp(m - shift), torch.exp(block_m - shift)
    return new_m, total * old_scale + block_sum * block_scale, acc * old_scale + block_acc * block_scale


class RingAttention(_Sharding):
    """A model's `sequence_shard` and its self-attentions' `core` for ring or hybrid (USP)
    sequence parallelism over P = U x R ranks.

    `comm` is the whole SP group (the shard / gather, as `Ulysses`), `heads` the rank's Ulysses
    group of U ranks (all-to-all; U = 1: none), `ring` its ring group of R ranks (ring_shift). With
    the layout of `usp_groups`, after the head all-to-all a rank holds h/U heads of chunk r (U
    consecutive sequence parts). Each rank keeps its queries; keys and values, rotated with their
    own global positions, travel R - 1 times around the ring and each visit is folded in with
    `ring_block`. Keys at a global index >= the true length (padding) are masked; padded query rows
    are computed and dropped by the gather.

    Memory: each block's attention recomputes its scores in the backward (`_BlockAttention`: the
    fused CPU flash kernels on CPU, plain matmuls elsewhere), so the backward keeps, per layer,
    the rank's queries and the R visiting K/V blocks (all of the sequence's K/V for its heads) plus
    O(L) statistics, never an L x S score matrix. A GPU deployment would use a fused GPU kernel
    that returns the log-sum-exp, and would send K/V around the ring again in the backward
    instead of keeping the R blocks.
    """

    def __init__(self, comm: Collectives, heads: Collectives, ring: Collectives) -> None:
        if heads.size * ring.size != comm.size:
            raise ValueError(f"Ulysses degree {heads.size} x ring degree {ring.size} is not the SP degree {comm.size}")
        if ring.ring_shift is None and ring.size > 1:
            raise ValueError("ring attention needs the group's ring_shift")
        self.comm, self.heads, self.ring = comm, heads, ring
        self.length = 0

    def _to_heads(self, x: Tensor) -> Tensor:
        """(B, h, L, d) sequence part -> (B, h/U, U*L, d): the Ulysses group's chunk, padding kept."""
        return x if self.heads.size == 1 else heads_from_sequence(x, self.heads)

    def _to_sequence(self, x: Tensor) -> Tensor:
        """(B, h/U, U*L, d) -> (B, h, L, d)."""
        return x if self.heads.size == 1 else sequence_from_heads(x, self.heads)

    def core(
        self, q: Tensor, k: Tensor, v: Tensor, rotary: tuple[Tensor, Tensor] | None = None, mask: Tensor | None = None
    ) -> Tensor:
        """Self-attention of sequence-sharded heads (B, h, N/P, d) over the whole sequence."""
        if mask is not None:
            raise ValueError("sequence parallelism: an attention mask or bias over the sharded sequence is not supported")
        q, k, v = (self._to_heads(x) for x in (q, k, v))  # (B, h/U, C, d), C = U*N/P: chunk r
        chunk = q.shape[2]
        r, size = self.ring.rank, self.ring.size
        if rotary is not None:  # global positions of chunk r; the padding's angles are 0
            cos, sin = (F.pad(t, (0, 0, 0, self.padded(self.length) - t.shape[0]), value=fill)
                        for t, fill in zip(rotary, (1.0, 0.0), strict=True))
            cos, sin = cos[r * chunk : (r + 1) * chunk], sin[r * chunk : (r + 1) * chunk]
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        positions = torch.arange(chunk, device=q.device)
        b, h, _, d = q.shape
        dtype = _stat_dtype(q)
        state = (  # float32 (float64) statistics and accumulator whatever q's dtype
            q.new_full((b, h, chunk, 1), float("-inf"), dtype=dtype),
            q.new_zeros((b, h, chunk, 1), dtype=dtype),
            q.new_zeros((b, h, chunk, d), dtype=dtype),
        )
        kv = torch.stack([k, v])  # (2, B, h/U, C, d): one message a step
        for step in range(size):
            origin = (r - step) % size  # the chunk whose keys are here now
            state = ring_block(q, kv[0], kv[1], origin * chunk + positions < self.length, state)
            if step < size - 1:
                kv = _RingShift.apply(kv, self.ring)
        _, total, acc = state
        return self._to_sequence((acc / total).to(q.dtype))


def apply_ring(model: nn.Module, comm: Collectives, heads: Collectives, ring: Collectives) -> RingAttention:
    """Run `model` (a `dit` or `video_dit`) with ring or hybrid sequence parallelism, in place:
    `comm` is the whole SP group, `heads` and `ring` this rank's groups of `usp_groups`.

    Raises ValueError as `apply_ulysses`, with a head count not divisible by the Ulysses degree."""
    name = type(model).__name__
    attentions = _hook_points(model)
    for attention in attentions:
        if attention.heads % heads.size:
            raise ValueError(
                f"sequence parallelism: {name} has {attention.heads} attention heads, not divisible by the "
                f"Ulysses degree {heads.size} = SP degree {comm.size} / sp_ring {ring.size}; raise train.sp_ring "
                f"(lvd sample --sp-ring) to a divisor of {comm.size} that leaves a divisor of {attention.heads}"
            )
    attention_ring = RingAttention(comm, heads, ring)
    _install(model, attentions, attention_ring)
    return attention_ring
