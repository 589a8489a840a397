"""The training loader: infinite, equal work per rank, exactly resumable.

Each (rank, DataLoader worker) is a reader slot with its own `SampleStream` (see stream.py for
the shard schedule, mixing and shuffle buffer). A worker decodes, buckets and batches, and tags
every batch with its position after that batch. The main process keeps the tag of the last batch
it consumed from each worker: that is the loader state. DataLoader hands out batches round-robin
over workers, so after n batches the next one comes from worker n mod W; a resumed loader rotates
the worker roles by that amount. Per-sample randomness (temporal offset, crop, caption dropout)
is keyed by (seed, rank, worker, sample number), never drawn from a shared generator; so is the
frame stride of each clip when `data.frame_stride_range` is set.

Clips are batched per aspect-ratio bucket (buckets.py, batching.py). The n-th batch of every rank
comes from bucket `scheduled_bucket(seed, n, buckets)`, so the ranks of a step agree on its shape;
a worker holds the clips of the other buckets until their turn (at most `HELD_BATCHES` batches
each; older clips beyond that are dropped and counted). Every clip left out of training is counted by reason
in the slot state, and the loader logs the counts when they grow. Video batches travel as uint8
through a fixed ring of shared-memory cells (video_ring.py) and are converted to float32 in
[-1, 1] by the main process in `VideoLoader.__next__`.

World size change: positions are per slot and slots change with the world size (or the worker
count), so `load_state_dict` then starts every slot at the start of the epoch after the furthest
epoch this rank's saved slots had reached (logged as a warning): the rest of the interrupted
epoch is skipped, nothing is read twice within an epoch. Exactness holds only for the same
world size and worker count.

See docs/methods.md, 'Data: the training loader and caption dropout'.
"""

from __future__ import annotations

import functools
import logging
import math
import multiprocessing
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.batching import BatchMaker, Tokenizer
from data_pipeline.buckets import Bucket, build_buckets
from data_pipeline.config import DataConfig
from data_pipeline.latents import CachedText, cached_text
from data_pipeline.stream import (
    ShardSet,
    Slot,
    expand_shard_sets,
    fresh_state,
    latest_epoch,
)
from data_pipeline.video_ring import VideoRing

log = logging.getLogger(__name__)


class _SlotDataset(IterableDataset):
    """What each DataLoader worker (or the main process) iterates: its slot's batches."""

    def __init__(
        self,
        cfg: DataConfig,
        sets: list[ShardSet],
        *,
        rank: int,
        world_size: int,
        seed: int,
        buckets: list[Bucket],
        tokenizer: Tokenizer | None,
        null_text: CachedText | None = None,
    ) -> None:
        self.cfg, self.sets, self.buckets, self.tokenizer = cfg, sets, buckets, tokenizer
        self.null_text = null_text  # latent caches: the empty caption's cached embedding
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.workers = max(1, cfg.workers)
        self.rotation = 0
        self.start = 0  # the rank's batch number where the current iteration starts
        self.states: dict[int, dict[str, Any]] = {}
        self.ring: VideoRing | None = None

    def slot(self, worker: int) -> Slot:
        return Slot(
            seed=self.seed, rank=self.rank, worker=worker, world_size=self.world_size, workers=self.workers
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        if info is not None:
            torch.set_num_threads(1)
        worker = (physical + self.rotation) % self.workers
        handoff = (self.ring, physical) if self.ring is not None else None
        maker = BatchMaker(
            self.cfg,
            self.sets,
            self.slot(worker),
            self.buckets,
            self.tokenizer,
            self.states.get(worker),
            handoff,
            self.start + physical,
            null_text=self.null_text,
        )
        return iter(maker)

    def new_ring(self) -> VideoRing | None:
        """A hand-off ring sized for the largest bucket (None for latent shards)."""
        if self.cfg.latent:
            return None
        nbytes = max(
            bucket.batch_size * bucket.shape.frames * bucket.shape.height * bucket.shape.width * 3
            for bucket in self.buckets
        )
        if self.cfg.workers == 0:
            return VideoRing(rows=1, cells=1, nbytes=nbytes, shared=False)
        return VideoRing(rows=self.cfg.workers, cells=self.cfg.prefetch + 1, nbytes=nbytes, shared=True)


def _identity(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


class VideoLoader:
    """Infinite iterator of batches with `state_dict()` / `load_state_dict()` for exact resume.

    Batches: 'video' (B, C, T, H, W) in [-1, 1] (pixel shards) or 'latents' (B, c, t, h, w)
    (latent shards, plus 'text_emb' and, for T5, 'text_mask' when cached; a dropped caption's are
    the cache's empty-caption ones), 'caption' (after p_uncond dropout), 'tokens'
    (B, 77) when a tokenizer is given, 'frame_stride' (B,) long (each clip's stride in frames of
    the shard's clips), and 'meta' (one dict per sample).
    """

    def __init__(self, dataset: _SlotDataset) -> None:
        self.dataset = dataset
        self.batches = 0
        self.logged_skips = 0
        self._iterator: Iterator[dict[str, Any]] | None = None
        self.batches_per_epoch = self._epoch_length()

    def _epoch_length(self) -> int | None:
        """Batches per rank in one pass over all sets (None unless manifests give the counts); with
        buckets, at their mean batch size (the schedule gives each bucket an equal share)."""
        if any(shard_set.samples is None for shard_set in self.dataset.sets):
            return None
        total = sum(shard_set.samples or 0 for shard_set in self.dataset.sets)
        batch = sum(bucket.batch_size for bucket in self.dataset.buckets) / len(self.dataset.buckets)
        return max(1, math.ceil(total / (self.dataset.world_size * batch)))

    def _start(self) -> Iterator[dict[str, Any]]:
        self.dataset.rotation = self.batches % self.dataset.workers
        self.dataset.start = self.batches
        # A new ring per start: workers of an abandoned iterator may still be writing the old one.
        self.dataset.ring = self.dataset.new_ring()
        if self.dataset.cfg.workers == 0:
            return iter(self.dataset)
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["data_pipeline.loader"])  # workers start without re-importing torch
        loader = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=self.dataset.cfg.workers,
            prefetch_factor=self.dataset.cfg.prefetch,
            collate_fn=_identity,
            # Not fork: forking a trainer that runs threads (queue feeders, tqdm, NCCL) can deadlock
            # the child; forkserver children come from a clean single-threaded process.
            multiprocessing_context=context,
        )
        return iter(loader)

    def __iter__(self) -> VideoLoader:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._iterator is None:
            self._iterator = self._start()
        batch = next(self._iterator)
        position = batch.pop("_position")
        self.dataset.states[position["worker"]] = position["state"]
        self.batches += 1
        self._log_skipped()
        if "_video_cell" in batch:
            batch["video"] = self.dataset.ring.take(*batch.pop("_video_cell"))
        return batch

    def skipped(self) -> dict[str, int]:
        """Clips of this rank left out of training so far, counted by reason."""
        totals: dict[str, int] = {}
        for state in self.dataset.states.values():
            for reason, count in state.get("skipped", {}).items():
                totals[reason] = totals.get(reason, 0) + count
        return totals

    def _log_skipped(self) -> None:
        totals = self.skipped()
        if sum(totals.values()) > self.logged_skips:
            self.logged_skips = sum(totals.values())
            details = "; ".join(f"{count} {reason}" for reason, count in sorted(totals.items()))
            log.warning("rank %d skipped %d clips so far: %s", self.dataset.rank, self.logged_skips, details)

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "batches": self.batches,
            "rank": self.dataset.rank,
            "world_size": self.dataset.world_size,
            "workers": self.dataset.workers,
            "seed": self.dataset.seed,
            "slots": {str(worker): state for worker, state in self.dataset.states.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state` was taken (same world size and workers), see module doc."""
        self._iterator = None
        saved = {int(worker): slot_state for worker, slot_state in state["slots"].items()}
        if state["world_size"] == self.dataset.world_size and state["workers"] == self.dataset.workers:
            self.dataset.states, self.batches = saved, state["batches"]
            return
        saved_slot = functools.partial(
            Slot,
            seed=state["seed"],
            rank=state["rank"],
            world_size=state["world_size"],
            workers=state["workers"],
        )
        reached = (
            latest_epoch(self.dataset.sets, saved_slot(worker=worker), slot_state["stream"])
            for worker, slot_state in saved.items()
        )
        epoch = 1 + max(reached, default=-1)
        log.warning(
            "loader state was saved with world_size=%s workers=%s, now %s/%s: restarting every reader at epoch %d "
            "(exact resume needs the same world size and workers)",
            state["world_size"],
            state["workers"],
            self.dataset.world_size,
            self.dataset.workers,
            epoch,
        )
        self.dataset.states = {
            worker: {
                "stream": fresh_state(self.dataset.sets, self.dataset.slot(worker), start_epoch=epoch),
                "pending": [],
            }
            for worker in range(self.dataset.workers)
        }
        self.batches = 0


def build_loader(
    cfg: DataConfig,
    *,
    rank: int,
    world_size: int,
    batch_size: int,
    seed: int,
    tokenizer: Tokenizer | None,
) -> VideoLoader:
    """The training loader of one rank. Fails within seconds when a shard set matches nothing."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    sets = expand_shard_sets(cfg.shards, cfg.weights)
    slots = world_size * max(1, cfg.workers)
    for number, shard_set in enumerate(sets):
        if len(shard_set.urls) < slots and rank == 0:
            log.warning(
                "shard set %d has %d shards for %d reader slots (ranks x workers): shards are resampled, "
                "so samples repeat within an epoch; for one pass per epoch write >= %d shards "
                "(lvd shard ... --shard-size-mb smaller)",
                number,
                len(shard_set.urls),
                slots,
                slots,
            )
    dataset = _SlotDataset(
        cfg,
        sets,
        rank=rank,
        world_size=world_size,
        seed=seed,
        buckets=build_buckets(cfg, batch_size),
        tokenizer=tokenizer,
        null_text=cached_text(cfg.shards) if cfg.latent else None,
    )
    return VideoLoader(dataset)
