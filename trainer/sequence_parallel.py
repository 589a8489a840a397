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
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from model_zoo.layers.sequence_parallel import Collectives, Ulysses, apply_ulysses


def group_collectives(group: Any, rank: int, size: int) -> Collectives:
    """The all-to-all and all-gather of `model_zoo`'s Ulysses over a torch.distributed group."""

    def all_to_all(x: Tensor) -> Tensor:
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    def all_gather(x: Tensor) -> Tensor:
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x, group=group)
        return torch.stack(parts)

    return Collectives(rank=rank, size=size, all_to_all=all_to_all, all_gather=all_gather)


@dataclass
class SequenceParallelGroups:
    """This rank's place in the DP x SP layout and its process groups (every rank builds all)."""

    rank: int
    world_size: int
    sp_size: int
    sp_group: Any

    @classmethod
    def build(cls, rank: int, world_size: int, sp_size: int, *, timeout: datetime.timedelta) -> SequenceParallelGroups:
        """`timeout`: of the SP groups' collectives (a new group does not inherit the default group's)."""
        if sp_size < 1 or world_size % sp_size:
            raise ValueError(f"train.sp_size: {sp_size} does not divide the world size {world_size}")
        sp_group = None
        for first in range(0, world_size, sp_size):  # every rank must take part in every new_group
            group = dist.new_group(list(range(first, first + sp_size)), timeout=timeout)
            if first <= rank < first + sp_size:
                sp_group = group
        return cls(rank=rank, world_size=world_size, sp_size=sp_size, sp_group=sp_group)

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

    def apply(self, model: nn.Module) -> Ulysses:
        """Make `model` (dit / video_dit) run its blocks on this rank's part of the sequence."""
        return apply_ulysses(model, group_collectives(self.sp_group, self.sp_rank, self.sp_size))
