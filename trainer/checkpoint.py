"""Checkpoints that survive preemption at any second.

Layout of `<run.dir>/checkpoints/`::

    step_00000050/            one checkpoint (a DeepSpeed tag per engine + our per-rank state)
        <engine>/...          DeepSpeed files: model, optimizer, LR schedule (all ranks write)
        rank_00000.pt         RNG states, loader state, EMA shard, counters of rank 0
        meta.json             step, world size, resolved config
        COMPLETE              written last, by rank 0, after every rank has finished
    latest                    the tag of the newest COMPLETE checkpoint, replaced atomically

A crash anywhere inside a save leaves `latest` on the previous checkpoint, and a checkpoint
without COMPLETE is never loaded. The last `keep_last` complete checkpoints are kept.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.files import atomic_write, replacing
from trainer import faults

COMPLETE = "COMPLETE"
LATEST = "latest"


@dataclass
class Counters:
    """The step counters of a run, as every rank keeps them."""

    step: int = 0
    """Optimizer steps completed."""
    bad_streak: int = 0
    """Consecutive skipped (non-finite) steps."""
    skipped_total: int = 0
    """Skipped steps since the run began."""
    flops_per_step: float = 0.0
    """FLOPs of one optimizer step on this rank: counted in the first step of a run and kept in
    its checkpoints. `FlopCounterMode` runs some ops through their decompositions, so a counted
    step's gradients differ from an uncounted step's in the last bits: a resumed run that counted
    again would drift an ulp from the uninterrupted run (tests/test_trainer_multirank.py compares
    the final weights bitwise). With several data buckets: the FLOPs of the last step's shape."""
    flops_by_shape: dict[str, float] = dataclasses.field(default_factory=dict)
    """FLOPs of one optimizer step per micro-batch shape ('2x3x8x32x48,...'), each counted the
    first time the run met the shape and kept in the checkpoints for the same reason."""


@dataclass
class RankState:
    """What one rank needs, besides the engines, to go on exactly where it stopped."""

    counters: Counters
    """Steps done, skipped and the FLOPs of a step."""
    generator: dict[str, torch.Tensor]
    """States of the generators of timesteps, noise, masks and levels this rank draws from, by
    stream key ('l': data rank l's own; 'l.i': the i-th process sharing data rank l, see
    `trainer.data_ranks`)."""
    torch_rng: torch.Tensor
    """State of torch's global CPU generator."""
    cuda_rng: list[torch.Tensor] | None
    """States of torch's CUDA generators (None without CUDA)."""
    loader: dict[str, dict[str, Any]]
    """The positions of the loaders of the data ranks this rank carries, by data rank ('0', ...)."""
    ema: dict[str, Any] | None
    """This rank's EMA shard (None: the run keeps no EMA)."""
    world_size: int
    """Ranks of the run that wrote it."""
    data_ranks: int
    """Data ranks of the run (its world size when it started; `trainer.data_ranks`)."""

    def to_dict(self) -> dict[str, Any]:
        state = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        return state | {"counters": dataclasses.asdict(self.counters)}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> RankState:
        names = [field.name for field in dataclasses.fields(cls)]
        missing = [name for name in names if name not in state]
        if missing:
            raise ValueError(f"rank state without {missing}: written by another version of lvd")
        return cls(**{name: state[name] for name in names} | {"counters": Counters(**state["counters"])})


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> int:
    return int(tag.removeprefix("step_"))


def is_complete(directory: Path, tag: str) -> bool:
    return (directory / tag / COMPLETE).is_file()


def latest_tag(directory: Path) -> str | None:
    """The newest complete checkpoint: `latest` if it is complete, else the newest COMPLETE tag."""
    pointer = directory / LATEST
    if pointer.is_file():
        tag = pointer.read_text().strip()
        if is_complete(directory, tag):
            return tag
    complete = sorted((p.name for p in directory.glob("step_*") if is_complete(directory, p.name)), key=step_of)
    return complete[-1] if complete else None


def rank_state_path(directory: Path, tag: str, rank: int) -> Path:
    return directory / tag / f"rank_{rank:05d}.pt"


def write_rank_state(directory: Path, tag: str, rank: int, state: RankState) -> None:
    path = rank_state_path(directory, tag, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        torch.save(state.to_dict(), tmp)


def read_rank_state(directory: Path, tag: str, rank: int) -> RankState:
    path = rank_state_path(directory, tag, rank)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; was the checkpoint written with another world size?")
    state = torch.load(path, map_location="cpu", weights_only=False)
    return RankState.from_dict(upgrade_rank_state(state, step_of(tag), rank))


def read_rank_states(directory: Path, tag: str, world_size: int) -> list[RankState]:
    """The rank states of every rank of a checkpoint written by `world_size` ranks."""
    return [read_rank_state(directory, tag, rank) for rank in range(world_size)]


def upgrade_rank_state(state: dict[str, Any], step: int, rank: int) -> dict[str, Any]:
    """A rank state as an older `lvd train` wrote it (one generator and loader per rank; before
    that, the counters loose at the top level and the step only in the tag) in today's shape;
    today's comes back unchanged."""
    if "data_ranks" not in state and "generator" in state:
        state = state | {
            "generator": {str(rank): state["generator"]},
            "loader": {str(rank): state["loader"]},
            "data_ranks": state.get("world_size", 1),
        }
    if "counters" in state or "bad_streak" not in state:
        return state
    loose = ("bad_streak", "skipped_total", "flops_per_step")
    counters = {"step": step, **{name: state[name] for name in loose if name in state}}
    return {key: value for key, value in state.items() if key not in loose} | {"counters": counters}


def commit(directory: Path, tag: str, meta: dict[str, Any], *, keep_last: int) -> None:
    """Rank 0, after a barrier: mark `tag` complete, point `latest` at it, prune old checkpoints."""
    tag_dir = directory / tag
    (tag_dir / "meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    atomic_write(tag_dir / COMPLETE, "ok\n")
    atomic_write(directory / LATEST, tag + "\n")
    prune(directory, keep_last=keep_last, current=tag)


def prune(directory: Path, *, keep_last: int, current: str) -> None:
    """Delete complete checkpoints beyond the last `keep_last` and incomplete ones older than `current`."""
    tags = sorted((p.name for p in directory.glob("step_*") if p.is_dir()), key=step_of)
    complete = [t for t in tags if is_complete(directory, t)]
    doomed = set(complete[:-keep_last]) | {t for t in tags if not is_complete(directory, t) and step_of(t) < step_of(current)}
    for tag in doomed:
        shutil.rmtree(directory / tag, ignore_errors=True)


def save(
    directory: Path,
    step: int,
    *,
    rank: int,
    save_engines: Callable[[Path, str], None],
    rank_state: RankState,
    meta: dict[str, Any],
    barrier: Callable[[], None],
    keep_last: int,
) -> str:
    """Write one checkpoint from every rank; only a finished one becomes `latest`."""
    tag = tag_for(step)
    if rank == 0 and (directory / tag).exists():
        shutil.rmtree(directory / tag)  # a leftover of a save that crashed at this same step
    barrier()
    save_engines(directory, tag)
    write_rank_state(directory, tag, rank, rank_state)
    faults.kill_in_save(step)
    barrier()
    if rank == 0:
        commit(directory, tag, meta, keep_last=keep_last)
    barrier()
    return tag
