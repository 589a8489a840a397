"""Data parallel x sequence parallel process groups of a training run, and their Ulysses wrapper.

World size W = DP * SP. Ranks r = dp * SP + sp: the SP ranks of one group are consecutive (inside
a node with the usual rank order, where the all-to-all is cheapest) and see the same samples; the
DP index `dp` takes the place of the rank for the loader and the noise generator.

Gradients: each SP rank holds its own tokens' part of the gradient (the group's sum is the
sample's gradient, see `model_zoo.layers.sequence_parallel`), while DeepSpeed averages over all
W ranks. The trainer multiplies the SP-wrapped network's loss by the SP degree before the
backward (`loss_scale`), so the average over W is the mean over the DP replicas of full
gradients. DeepSpeed itself sees plain data parallelism over W ranks: ZeRO 1-3 partition over all
of them and checkpoints look like a data-parallel run's. (DeepSpeed's own sequence-parallel
`mpu` route was tried: its ZeRO-3 reduce-scatter path does not apply the SP factor and gave
half the gradient.) See docs/methods.md, 'Sequence parallelism (Ulysses)'.

Ring and hybrid (`train.sp_ring` = R > 1): inside an SP group, SP rank s = r * U + u with
U = sp_size / R (`model_zoo.layers.sequence_parallel.usp_groups`): the U consecutive ranks of a
Ulysses group exchange heads, the R ranks with the same u pass keys and values around a ring.
See docs/methods.md, 'Ring attention and the hybrid'.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from model_zoo.layers.sequence_parallel import (
    Collectives,
    RingAttention,
    Ulysses,
    apply_ring,
    apply_ulysses,
    usp_groups,
)


def group_collectives(group: Any, rank: int, size: int) -> Collectives:
    """The all-to-all, all-gather and ring shift of `model_zoo`'s sequence parallelism over a
    torch.distributed group (`rank`: this process' index in it)."""

    def all_to_all(x: Tensor) -> Tensor:
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    def all_gather(x: Tensor) -> Tensor:
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x, group=group)
        return torch.stack(parts)

    def ring_shift(x: Tensor, offset: int) -> Tensor:
        out = torch.empty_like(x)
        peers = (dist.get_global_rank(group, (rank + offset) % size), dist.get_global_rank(group, (rank - offset) % size))
        ops = [dist.P2POp(dist.isend, x, peers[0], group), dist.P2POp(dist.irecv, out, peers[1], group)]
        for request in dist.batch_isend_irecv(ops):
            request.wait()
        return out

    return Collectives(rank=rank, size=size, all_to_all=all_to_all, all_gather=all_gather, ring_shift=ring_shift)


@dataclass
class SequenceParallelGroups:
    """This rank's place in the DP x SP layout and its process groups (every rank builds all)."""

    rank: int
    world_size: int
    sp_size: int
    sp_group: Any
    sp_ring: int = 1
    """Ring degree R (1: Ulysses alone)."""
    heads_group: Any = None
    """This rank's Ulysses group (U = sp_size / sp_ring ranks; None when R is 1: the SP group)."""
    ring_group: Any = None
    """This rank's ring group (R ranks; None when R is 1)."""

    @classmethod
    def build(
        cls, rank: int, world_size: int, sp_size: int, sp_ring: int = 1, *, timeout: datetime.timedelta
    ) -> SequenceParallelGroups:
        """`timeout`: of the SP groups' collectives (a new group does not inherit the default group's)."""
        if sp_size < 1 or world_size % sp_size:
            raise ValueError(f"train.sp_size: {sp_size} does not divide the world size {world_size}")
        if sp_ring < 1 or sp_size % sp_ring:
            raise ValueError(f"train.sp_ring: {sp_ring} does not divide train.sp_size {sp_size}")
        found: dict[str, Any] = {}
        for first in range(0, world_size, sp_size):  # every rank must take part in every new_group
            layouts = {"sp": [list(range(sp_size))]}
            if sp_ring > 1:
                layouts["heads"], layouts["ring"] = usp_groups(sp_size, sp_ring)
            for kind, groups in layouts.items():
                for members in groups:
                    group = dist.new_group([first + m for m in members], timeout=timeout)
                    if rank - first in members:
                        found[kind] = group
        return cls(rank=rank, world_size=world_size, sp_size=sp_size, sp_group=found["sp"], sp_ring=sp_ring,
                   heads_group=found.get("heads"), ring_group=found.get("ring"))

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp_size

    @property
    def dp_size(self) -> int:
        return self.world_size // self.sp_size

    @property
    def loss_scale(self) -> float:
        """Factor of the SP network's loss before the backward (see the module docstring)."""
        return float(self.sp_size)

    def apply(self, model: nn.Module) -> Ulysses | RingAttention:
        """Make `model` (dit / video_dit) run its blocks on this rank's part of the sequence."""
        comm = group_collectives(self.sp_group, self.sp_rank, self.sp_size)
        if self.sp_ring == 1:
            return apply_ulysses(model, comm)
        heads = self.sp_size // self.sp_ring
        ring_rank, heads_rank = divmod(self.sp_rank, heads)
        return apply_ring(
            model,
            comm,
            group_collectives(self.heads_group, heads_rank, heads),
            group_collectives(self.ring_group, ring_rank, self.sp_ring),
        )
