"""The ranks of a sampling run: torchrun / srun / `common.launch` environment, gloo on CPU, NCCL on CUDA.

A one-rank run needs no process group. Small objects (unit counts, timings) move with
`all_gather_object`; the per-step model outputs of branch-parallel guidance move as tensors
(`broadcast_tensor`), and the blending overlaps by point-to-point sends between neighbouring
ranks (`NeighbourExchange`).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from common.launch import collective_timeout
from model_zoo.diffusion.guidance import Guide, cfg
from model_zoo.diffusion.samplers import DenoiseFn
from model_zoo.layers.sequence_parallel import Collectives, apply_ring, apply_ulysses, usp_groups

T = TypeVar("T")
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=12)
"""Ranks wait at barriers while one rank runs a sequential stage; that can take hours
(`LVD_COLLECTIVE_TIMEOUT` seconds overrides it for the process group, see `common.launch`)."""


@dataclass(frozen=True, kw_only=True)
class World:
    """This process's rank among `size` ranks."""

    rank: int = 0
    """Rank among these ranks."""
    size: int = 1
    """Number of ranks."""
    members: tuple[int, ...] | None = None
    """The process-group ranks of ranks 0..size-1 (None: the same numbers)."""
    group: Any = None
    """Their process group (None: the default group)."""

    def global_rank(self, rank: int) -> int:
        return rank if self.members is None else self.members[rank]

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, index: int) -> bool:
        """Round-robin ownership of unit `index` (prompts, hierarchical gaps)."""
        return index % self.size == self.rank

    def block(self, num_units: int) -> range:
        """The contiguous block of units this rank owns (blending chunks: few neighbours cross ranks)."""
        return range(self.rank * num_units // self.size, (self.rank + 1) * num_units // self.size)

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier(group=self.group)

    def all_gather(self, value: T) -> list[T]:
        """Every rank's `value` (pickled), in rank order."""
        if self.size == 1:
            return [value]
        gathered: list[Any] = [None] * self.size
        dist.all_gather_object(gathered, value, group=self.group)
        return gathered

    def broadcast_tensor(self, tensor: Tensor, src: int) -> Tensor:
        """`tensor` of rank `src` on every rank (the others pass a buffer of the same shape and dtype)."""
        if self.size > 1:
            dist.broadcast(tensor, src=self.global_rank(src), group=self.group)
        return tensor

    def broadcast(self, value: T, src: int) -> T:
        if self.size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=self.global_rank(src), group=self.group)
        return box[0]


def environment_world() -> tuple[int, int]:
    """(rank, size) from torchrun / common.launch (RANK, WORLD_SIZE) or srun (SLURM_PROCID, SLURM_NTASKS)."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"]), int(os.environ.get("WORLD_SIZE", "1"))
    if "SLURM_PROCID" in os.environ and "MASTER_ADDR" in os.environ:
        return int(os.environ["SLURM_PROCID"]), int(os.environ.get("SLURM_NTASKS", "1"))
    return 0, 1


def init_world(device: str) -> World:
    """Join the process group when the environment names more than one rank."""
    rank, size = environment_world()
    if size > 1 and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
        dist.init_process_group(backend, rank=rank, world_size=size, timeout=collective_timeout(COLLECTIVE_TIMEOUT))
    return World(rank=rank, size=size)


def close_world(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


@dataclass(frozen=True)
class NeighbourExchange:
    """`blending.OverlapExchange` between ranks that own contiguous blocks of chunks
    (`chunk_owners`): each boundary chunk's tail goes to the owner of the next chunk and its head
    to the owner of the previous one, by non-blocking point-to-point sends (gloo on CPU, NCCL on
    GPU); the receives are posted at once, so they complete while the interior chunks step."""

    world: World
    """The ranks."""
    owners: tuple[int, ...]
    """The rank that owns each chunk."""

    def __call__(self, tails: Mapping[int, Tensor], heads: Mapping[int, Tensor]) -> Callable[[], Any]:
        owners, rank = self.owners, self.world.rank
        requests: list[Any] = []
        far_tails: dict[int, Tensor] = {}
        far_heads: dict[int, Tensor] = {}
        for index, tail in tails.items():
            if index + 1 < len(owners) and owners[index + 1] != rank:
                peer = self.world.global_rank(owners[index + 1])
                requests.append(dist.isend(tail.contiguous(), dst=peer))
                far_heads[index + 1] = torch.empty_like(tail)
                requests.append(dist.irecv(far_heads[index + 1], src=peer))
        for index, head in heads.items():
            if index > 0 and owners[index - 1] != rank:
                peer = self.world.global_rank(owners[index - 1])
                requests.append(dist.isend(head.contiguous(), dst=peer))
                far_tails[index - 1] = torch.empty_like(head)
                requests.append(dist.irecv(far_tails[index - 1], src=peer))

        def finish() -> tuple[dict[int, Tensor], dict[int, Tensor]]:
            for request in requests:
                request.wait()
            return far_tails, far_heads

        return finish


def chunk_owners(world: World, num_chunks: int) -> tuple[int, ...]:
    """The rank of each chunk when every rank owns its `World.block` of them."""
    owners = [0] * num_chunks
    for rank in range(world.size):
        for index in World(rank=rank, size=world.size).block(num_chunks):
            owners[index] = rank
    return tuple(owners)


def branch_parallel_guide(world: World) -> Guide:
    """Classifier-free guidance with its two branches on two ranks (CFG parallelism).

    Every rank runs the same sequential loop in lockstep; at each model call rank 0 evaluates the
    conditional branch and rank 1 the unconditional one, both are broadcast, and every rank
    combines them with `cfg`'s arithmetic, so the result is bitwise that of one rank running both.
    Ranks from 2 on only receive. Both branches must return the dtype and shape of `x_t`.
    """
    if world.size == 1:
        return cfg

    def guide(denoise_fn_cond: DenoiseFn, denoise_fn_uncond: DenoiseFn, scale: float) -> DenoiseFn:
        def guided(x_t: Tensor, t: Tensor) -> Tensor:
            outputs = [torch.empty_like(x_t), torch.empty_like(x_t)]  # [cond, uncond]
            if world.rank < 2:
                mine = (denoise_fn_cond, denoise_fn_uncond)[world.rank](x_t, t)
                if mine.shape != x_t.shape or mine.dtype != x_t.dtype:
                    raise ValueError(
                        f"branch-parallel guidance needs branch outputs shaped like x_t {tuple(x_t.shape)} "
                        f"{x_t.dtype}, got {tuple(mine.shape)} {mine.dtype}"
                    )
                outputs[world.rank] = mine
            cond = world.broadcast_tensor(outputs[0], src=0)
            uncond = world.broadcast_tensor(outputs[1], src=1)
            return uncond + scale * (cond - uncond)

        return guided

    return guide


def group_collectives(group: Any, rank: int, size: int) -> Collectives:
    """The all-to-all, all-gather and ring shift of `model_zoo`'s sequence parallelism over a
    process group (`rank`: this process' index in it)."""

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


@dataclass(frozen=True)
class SequenceParallel:
    """This rank's place when each group of `size` consecutive ranks shares every denoiser forward.

    Rank 0 of a group (the leader) runs the strategy, over `outer`, the world of the leaders; each
    forward of the denoiser sends its inputs to the group's other ranks (the followers), which run
    the same forward on their part of the sequence in `serve` until the leader says `finish`.
    """

    outer: World
    """The leaders' world (the strategies' ranks); meaningless on a follower."""
    rank: int
    """Rank in the SP group (0: the leader)."""
    size: int
    """SP degree."""
    leader: int
    """Process-group rank of this group's leader."""
    group: Any
    """The SP group."""
    ring: int = 1
    """Ring degree (1: Ulysses alone)."""
    heads_group: Any = None
    """This rank's Ulysses group when `ring` > 1 (`usp_groups`' layout)."""
    ring_group: Any = None
    """This rank's ring group when `ring` > 1."""

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def attach(self, denoiser: nn.Module) -> None:
        """Make `denoiser` (dit / video_dit) sequence-parallel; on the leader, every forward first
        sends its inputs to the followers."""
        comm = group_collectives(self.group, self.rank, self.size)
        if self.ring == 1:
            apply_ulysses(denoiser, comm)
        else:
            heads = self.size // self.ring
            ring_rank, heads_rank = divmod(self.rank, heads)
            apply_ring(
                denoiser,
                comm,
                group_collectives(self.heads_group, heads_rank, heads),
                group_collectives(self.ring_group, ring_rank, self.ring),
            )
        if not self.is_leader:
            return
        forward = denoiser.forward

        def leading(*args: Any, **kwargs: Any) -> Any:
            self._send((args, kwargs))
            return forward(*args, **kwargs)

        denoiser.forward = leading  # type: ignore[method-assign]

    def serve(self, denoiser: nn.Module) -> None:
        """Follower: run the leader's forwards until `finish`."""
        while (call := self._send(None)) is not None:
            args, kwargs = call
            with torch.no_grad():
                denoiser(*args, **kwargs)

    def finish(self) -> None:
        """Leader: release the followers."""
        self._send(None)

    def _send(self, value: Any) -> Any:
        box = [value]
        dist.broadcast_object_list(box, src=self.leader, group=self.group)
        return box[0]


def sequence_parallel(world: World, size: int, ring: int = 1) -> SequenceParallel:
    """The SP groups (consecutive ranks; with `ring` > 1 also their Ulysses and ring groups) and
    the leaders' world; every rank must call this."""
    if world.size % size:
        raise ValueError(f"--sp {size} does not divide the number of ranks {world.size}")
    if ring < 1 or size % ring:
        raise ValueError(f"--sp-ring {ring} does not divide --sp {size}")
    leaders = tuple(range(0, world.size, size))
    # A new group does not inherit the default group's timeout (torch gives it 30 minutes): the
    # followers wait in it while their leader decodes or runs a sequential stage.
    timeout = collective_timeout(COLLECTIVE_TIMEOUT)
    found: dict[str, Any] = {}
    for first in leaders:  # every rank must take part in every new_group
        layouts = {"sp": [list(range(size))]}
        if ring > 1:
            layouts["heads"], layouts["ring"] = usp_groups(size, ring)
        for kind, groups in layouts.items():
            for members in groups:
                group = dist.new_group([first + m for m in members], timeout=timeout)
                if world.rank - first in members:
                    found[kind] = group
    leader_group = dist.new_group(list(leaders), timeout=timeout) if len(leaders) > 1 else None
    first = world.rank - world.rank % size
    outer = World(rank=first // size, size=len(leaders), members=leaders, group=leader_group)
    return SequenceParallel(
        outer=outer, rank=world.rank % size, size=size, leader=first, group=found["sp"], ring=ring,
        heads_group=found.get("heads"), ring_group=found.get("ring"),
    )
