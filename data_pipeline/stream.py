"""The sample stream of one reader slot (a rank's DataLoader worker), with an exact position.

Schedule. A shard set of n shards is read as the infinite sequence of its epoch permutations
(permutation e drawn from (seed, set, e)), dealt round-robin to the R x W reader slots: slot
``r * W + w`` reads global draws ``g = k * R * W + slot`` (k = 0, 1, ...), shard
``perm[g // n][g % n]``. With n >= R x W every shard is read once per epoch; with fewer shards
(or uneven ones) slots share shards, i.e. resample, and every slot still streams forever, so
every rank yields the same number of batches and never starves a collective.

Mixing. Each pull picks a set with probability proportional to its weight, from a random number
keyed by (seed, rank, worker, pull): no hidden RNG state.

Shuffle buffer. Pulled samples enter a buffer of fixed capacity; the emitted one is picked by a
keyed random number. The buffer holds references (shard, byte offset) in the state, so a resumed
stream re-reads exactly the samples that were buffered.
"""

from __future__ import annotations

import glob
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import braceexpand

from data_pipeline.remote import ONCE, Retry, is_remote
from data_pipeline.tario import TarSample, iter_samples, read_sample


@dataclass(frozen=True, kw_only=True)
class ShardSet:
    urls: tuple[str, ...]
    """Shard paths (local or shared filesystem), 'pipe:' commands or http(s) URLs."""
    weight: float
    """Mixing weight."""
    samples: int | None
    """Total samples when a manifest lists them, else None."""


def keyed_random(*key: object) -> random.Random:
    """A generator seeded from a tuple of values, identical in every process."""
    return random.Random(":".join(str(part) for part in key))


def _expand_one(pattern: str) -> tuple[list[str], int | None]:
    if is_remote(pattern):
        return list(braceexpand.braceexpand(pattern)), None
    path = Path(pattern)
    if path.is_dir():
        path = path / "manifest.json"
    if path.name == "manifest.json":
        manifest = json.loads(path.read_text())
        urls = [str(path.parent / entry["path"]) for entry in manifest["shards"]]
        return urls, manifest["samples"]
    urls = [url for part in braceexpand.braceexpand(pattern) for url in sorted(_glob(part))]
    return urls, None


def _glob(part: str) -> list[str]:
    return [path for path in glob.glob(part) if Path(path).is_file()]


def expand_shard_sets(shards: str, weights: tuple[float, ...]) -> list[ShardSet]:
    """Shard sets from 'a/{000..009}.tar::b/manifest.json' and their weights (equal when empty)."""
    patterns = [pattern.strip() for pattern in shards.split("::") if pattern.strip()]
    if not patterns:
        raise ValueError("data.shards is empty: give a brace glob, a shard folder or a manifest.json")
    if weights and len(weights) != len(patterns):
        raise ValueError(f"data.weights has {len(weights)} values for {len(patterns)} shard sets")
    sets = []
    for number, pattern in enumerate(patterns):
        urls, samples = _expand_one(pattern)
        if not urls:
            raise FileNotFoundError(f"shard set {number} ({pattern!r}) matches no file")
        sets.append(ShardSet(urls=tuple(urls), weight=weights[number] if weights else 1.0, samples=samples))
    if not any(shard_set.weight > 0 for shard_set in sets):
        raise ValueError("data.weights: at least one shard set needs a positive weight")
    return sets


def _permutation(size: int, *key: object) -> list[int]:
    order = list(range(size))
    keyed_random("perm", *key).shuffle(order)
    return order


@dataclass(frozen=True, kw_only=True)
class Slot:
    seed: int
    """Base seed of the run."""
    rank: int
    """Rank of this process."""
    worker: int
    """Logical DataLoader worker of this rank."""
    world_size: int
    """Ranks in the job."""
    workers: int
    """Logical workers per rank (1 when decoding in the main process)."""

    @property
    def index(self) -> int:
        return self.rank * self.workers + self.worker

    @property
    def count(self) -> int:
        return self.world_size * self.workers


def shard_of_draw(shard_set: ShardSet, set_number: int, slot: Slot, draw: int) -> tuple[str, int]:
    """(shard url, epoch) of the slot's `draw`-th shard of a set."""
    epoch, position = divmod(draw * slot.count + slot.index, len(shard_set.urls))
    order = _permutation(len(shard_set.urls), slot.seed, set_number, epoch)
    return shard_set.urls[order[position]], epoch


def first_draw_of_epoch(shard_set: ShardSet, slot: Slot, epoch: int) -> int:
    """The slot's first draw at or after the start of `epoch` (used when the world size changes)."""
    start = epoch * len(shard_set.urls)
    return max(0, -(-(start - slot.index) // slot.count))


class SampleStream:
    """Infinite mixed, shuffled stream of raw samples for one slot; `state()` pins its position."""

    def __init__(
        self,
        sets: list[ShardSet],
        slot: Slot,
        *,
        buffer_size: int,
        state: dict[str, Any] | None,
        retry: Retry = ONCE,
    ) -> None:
        self.sets, self.slot, self.buffer_size, self.retry = sets, slot, max(1, buffer_size), retry
        state = state or fresh_state(sets, slot, start_epoch=0)
        self.cursors: list[dict[str, int]] = [dict(cursor) for cursor in state["cursors"]]
        self.pulls: int = state["pulls"]
        self.emitted: int = state["emitted"]
        self.buffer: list[tuple[list[Any], TarSample]] = [
            (ref, read_sample(ref[1], ref[2], retry)) for ref in state["buffer"]
        ]
        self._open: dict[int, tuple[int, Iterator[TarSample]]] = {}
        self._cumulative = self._weights()

    def _weights(self) -> list[float]:
        total, cumulative = sum(shard_set.weight for shard_set in self.sets), []
        running = 0.0
        for shard_set in self.sets:
            running += shard_set.weight / total
            cumulative.append(running)
        return cumulative

    def state(self) -> dict[str, Any]:
        return {
            "cursors": [dict(cursor) for cursor in self.cursors],
            "pulls": self.pulls,
            "emitted": self.emitted,
            "buffer": [list(ref) for ref, _ in self.buffer],
        }

    def _pick_set(self) -> int:
        draw = keyed_random("mix", self.slot.seed, self.slot.rank, self.slot.worker, self.pulls).random()
        self.pulls += 1
        return next(
            (number for number, edge in enumerate(self._cumulative) if draw < edge), len(self.sets) - 1
        )

    def _pull(self) -> tuple[list[Any], TarSample]:
        number = self._pick_set()
        cursor, shard_set = self.cursors[number], self.sets[number]
        for _ in range(len(shard_set.urls) + 1):
            url, epoch = shard_of_draw(shard_set, number, self.slot, cursor["draw"])
            opened = self._open.get(number)
            if opened is None or opened[0] != cursor["draw"]:
                opened = (cursor["draw"], iter_samples(url, cursor["offset"], self.retry))
                self._open[number] = opened
            sample = next(opened[1], None)
            if sample is not None:
                cursor["offset"] = sample.end
                return [number, url, sample.offset, epoch], sample
            cursor["draw"], cursor["offset"] = cursor["draw"] + 1, 0
        raise RuntimeError(f"shard set {number}: {len(shard_set.urls) + 1} shards in a row held no sample")

    def __iter__(self) -> Iterator[tuple[list[Any], TarSample]]:
        while True:
            while len(self.buffer) < self.buffer_size:
                self.buffer.append(self._pull())
            pick = keyed_random("shuffle", self.slot.seed, self.slot.rank, self.slot.worker, self.emitted)
            index = pick.randrange(len(self.buffer))
            self.buffer[index], self.buffer[-1] = self.buffer[-1], self.buffer[index]
            self.emitted += 1
            yield self.buffer.pop()


def fresh_state(sets: list[ShardSet], slot: Slot, *, start_epoch: int) -> dict[str, Any]:
    """The stream position at the start of `start_epoch` of every set, empty buffer."""
    cursors = [{"draw": first_draw_of_epoch(shard_set, slot, start_epoch), "offset": 0} for shard_set in sets]
    return {"cursors": cursors, "pulls": 0, "emitted": 0, "buffer": []}


def latest_epoch(sets: list[ShardSet], slot: Slot, state: dict[str, Any]) -> int:
    """Highest epoch any set of this slot has reached in `state`."""
    return max(
        shard_of_draw(shard_set, number, slot, cursor["draw"])[1]
        for number, (shard_set, cursor) in enumerate(zip(sets, state["cursors"]))
    )
