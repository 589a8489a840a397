"""Data parallel x sequence parallel process groups of a training run, and their Ulysses wrapper.

World size W = DP * SP. Ranks r = dp * SP + sp: the SP ranks of one group are consecutive (inside
a node with the usual rank order, where the all-to-all is cheapest) and see the same samples; the
DP index `dp` takes the place of the rank for the loader and the noise generator.

`SequenceParallelGroups` is also the model-parallel unit (`mpu`) DeepSpeed takes: it reports the
sequence-parallel group and the sequence x data-parallel group (the world), so DeepSpeed's
gradient reduction (ZeRO 0-3) sums over all ranks and divides by the DP size only, which is right
for `model_zoo.layers.sequence_parallel`'s gradients (each SP rank holds its tokens' part of the
gradient; see docs/methods.md, 'Sequence parallelism (Ulysses)'). ZeRO partitions over the world.
Model parallelism proper stays 1 (checkpoint files are named as in a plain data-parallel run).
"""

from __future__ import annotations

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
    single_group: Any
    """A group of this rank alone (DeepSpeed's model-parallel group: no model parallelism)."""

    @classmethod
    def build(cls, rank: int, world_size: int, sp_size: int) -> SequenceParallelGroups:
        if sp_size < 1 or world_size % sp_size:
            raise ValueError(f"train.sp_size: {sp_size} does not divide the world size {world_size}")
        sp_group = single = None
        for first in range(0, world_size, sp_size):  # every rank must take part in every new_group
            group = dist.new_group(list(range(first, first + sp_size)))
            if first <= rank < first + sp_size:
                sp_group = group
        for other in range(world_size):
            group = dist.new_group([other])
            if other == rank:
                single = group
        return cls(rank=rank, world_size=world_size, sp_size=sp_size, sp_group=sp_group, single_group=single)

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp_size

    @property
    def dp_size(self) -> int:
        return self.world_size // self.sp_size

    def apply(self, model: nn.Module) -> Ulysses:
        """Make `model` (dit / video_dit) run its blocks on this rank's part of the sequence."""
        return apply_ulysses(model, group_collectives(self.sp_group, self.sp_rank, self.sp_size))

    # The model-parallel unit interface DeepSpeed reads (deepspeed.utils.groups).
    def initialize_sequence_parallel(self, sequence_parallel_size: int) -> None:
        """Present so that DeepSpeed's ZeRO treats this as a sequence-parallel unit (no model parallelism)."""

    def get_sequence_parallel_group(self) -> Any:
        return self.sp_group

    def get_sequence_parallel_world_size(self) -> int:
        return self.sp_size

    def get_sequence_parallel_rank(self) -> int:
        return self.sp_rank

    def get_sequence_data_parallel_group(self) -> Any:
        return dist.group.WORLD

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.world_size

    def get_sequence_data_parallel_rank(self) -> int:
        return self.rank

    def get_data_parallel_world_size(self) -> int:
        return self.dp_size

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_model_parallel_group(self) -> Any:
        return self.single_group

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0
