"""One reader slot's samples turned into batches: per bucket, in the bucket schedule's order.

A `BatchMaker` reads its slot's `SampleStream`, sends each clip to its bucket (buckets.py),
decodes it there, and yields the batch of the bucket that `scheduled_bucket` names for the slot's
next batch number. Each batch carries the state that reproduces everything after it: the
stream's position, the clips held for other buckets (re-read on resume), and the counts of the
clips left out of training, by reason.

See docs/methods.md, 'Data: aspect and length buckets in training'.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from data_pipeline.buckets import Bucket, choose_bucket, scheduled_bucket
from data_pipeline.config import DataConfig
from data_pipeline.latents import CachedText
from data_pipeline.score_filters import parse_filters, rejection
from data_pipeline.stages import (
    ClipShape,
    decode_clip,
    decode_image,
    drop_caption,
    image_member,
    load_npy,
    sample_caption,
    sample_meta,
    strided_latents,
)
from data_pipeline.stream import SampleStream, ShardSet, Slot, keyed_random
from data_pipeline.tario import TarSample, read_sample
from data_pipeline.video_ring import VideoRing

Tokenizer = Callable[[list[str]], torch.Tensor]

MAX_CONSECUTIVE_BAD = 1000
HELD_BATCHES = 8
"""Batches' worth of clips a worker holds per bucket while other buckets have their turn."""
MAX_WAIT = 10_000
"""Samples read for one batch of the scheduled bucket before the loader gives up on it."""


class BatchMaker:
    """One slot's stream turned into batches, plus the state that reproduces what follows."""

    def __init__(
        self,
        cfg: DataConfig,
        sets: list[ShardSet],
        slot: Slot,
        buckets: list[Bucket],
        tokenizer: Tokenizer | None,
        state: dict[str, Any] | None,
        handoff: tuple[VideoRing, int] | None,
        first_batch: int,
        *,
        null_text: CachedText | None = None,
    ) -> None:
        self.cfg, self.slot, self.buckets, self.tokenizer = cfg, slot, buckets, tokenizer
        self.null_text = null_text  # a latent cache's empty-caption embedding, for dropped captions
        self.handoff = handoff  # (ring, ring row of this process), None for latent shards
        self.handed = 0
        self.batch_number = first_batch  # the rank's number of this worker's next batch
        self.skipped: dict[str, int] = dict(state.get("skipped", {})) if state else {}
        self.filters = parse_filters(cfg.filters)
        self.stream = SampleStream(
            sets, slot, buffer_size=cfg.shuffle_buffer, state=state and state["stream"], retry=cfg.retry()
        )
        self.pending: list[list[tuple[list[Any], int, dict[str, Any]]]] = [[] for _ in buckets]
        self.videos: list[np.ndarray | None] = [None for _ in buckets]
        for bucket, ref, counter in state["pending"] if state else []:
            item, _ = self._prepare(read_sample(ref[1], ref[2], cfg.retry()), ref, counter, bucket)
            self.pending[bucket].append((ref, counter, item))

    def _key(self, kind: str, counter: int) -> tuple[object, ...]:
        return (kind, self.slot.seed, self.slot.rank, self.slot.worker, counter)

    def _prepare(
        self, sample: TarSample, ref: list[Any], counter: int, bucket: int
    ) -> tuple[dict[str, Any] | None, str]:
        """(the clip ready for its bucket, '') or (None, why it is left out)."""
        files = sample.files
        meta = dict(sample_meta(files), __key__=sample.key, __url__=ref[1], set=ref[0], epoch=ref[3])
        caption = drop_caption(
            sample_caption(files), self.cfg.p_uncond, keyed_random(*self._key("uncond", counter))
        )
        stride = self._frame_stride(counter)
        item: dict[str, Any] = {"caption": caption, "meta": meta, "frame_stride": stride}
        if self.cfg.latent:
            item["latents"] = strided_latents(
                load_npy(files["latents.npy"]), stride, self.cfg.stride_bounds()[1]
            )
            if "text_emb.npy" in files:
                item |= self._cached_text(files, caption, sample.key)
            return item, ""
        rng = keyed_random(*self._key("aug", counter)) if self.cfg.random_crop else None
        shape = dataclasses.replace(self.buckets[bucket].shape, frame_stride=stride)
        if "mp4" not in files:
            return self._still(files, shape, rng, item)
        item["video"] = decode_clip(files["mp4"], shape, rng)  # (L, H, W, 3)
        if item["video"] is None:
            return None, f"fewer frames than the {shape.span}-frame span of its bucket {self._name(bucket)}"
        return item, ""

    def _still(
        self, files: dict[str, bytes], shape: ClipShape, rng: random.Random | None, item: dict[str, Any]
    ) -> tuple[dict[str, Any] | None, str]:
        """A sample holding a still image: a one-frame clip (image batches), else left out."""
        member = image_member(files)
        if member is None:
            return None, "no mp4 or image in the sample"
        if shape.frames != 1:
            return None, "a still image among video clips (image shards go in data.image_shards)"
        item["video"] = decode_image(files[member], shape, rng)  # (1, H, W, 3)
        return (item, "") if item["video"] is not None else (None, f"not a readable {member} image")

    def _cached_text(self, files: dict[str, bytes], caption: str, key: str) -> dict[str, np.ndarray]:
        """The sample's cached 'text_emb' (and 'text_mask'); the cache's empty-caption ones when its
        caption is '' (dropped for classifier-free guidance), so that dropout trains the context
        the sampler's unconditional branch uses."""
        if caption == "":
            if self.null_text is None:
                raise RuntimeError(
                    f"latent sample {key}: its caption is dropped (data.p_uncond) but its cache records no "
                    "empty-caption embedding (no manifest.json with 'text_encoder' beside the shards): "
                    "re-run `lvd shard latents`, or set data.p_uncond=0"
                )
            cached = {"text_emb": self.null_text.null_emb}
            return cached | ({} if self.null_text.null_mask is None else {"text_mask": self.null_text.null_mask})
        cached = {"text_emb": load_npy(files["text_emb.npy"])}
        return cached | ({"text_mask": load_npy(files["text_mask.npy"])} if "text_mask.npy" in files else {})

    def _latent_bucket(self, meta: dict[str, Any]) -> int | None:
        """The bucket a cached clip was encoded for (its json's 'clip_shape'); None when it is not
        one of `data.buckets`. With one bucket, every cached clip goes to it."""
        if len(self.buckets) == 1:
            return 0
        shape = meta.get("clip_shape") or []
        for number, bucket in enumerate(self.buckets):
            if list(shape) == [bucket.shape.frames, bucket.shape.height, bucket.shape.width]:
                return number
        return None

    def _name(self, bucket: int) -> str:
        shape = self.buckets[bucket].shape
        return f"{shape.frames}x{shape.height}x{shape.width}"

    def _skip(self, reason: str, count: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + count

    def _frame_stride(self, counter: int) -> int:
        """The clip's frame stride: `data.frame_stride`, or drawn from `data.frame_stride_range`."""
        low, high = self.cfg.stride_bounds()
        return low if low == high else keyed_random(*self._key("stride", counter)).randint(low, high)

    def _video_batch(self, bucket: int) -> np.ndarray:
        """(B, L, H, W, 3) uint8 batch the bucket's clips are stacked into, reused from batch to
        batch: its contents are copied into the hand-off ring when complete."""
        if self.videos[bucket] is None:
            shape, size = self.buckets[bucket].shape, self.buckets[bucket].batch_size
            self.videos[bucket] = np.empty((size, shape.frames, shape.height, shape.width, 3), np.uint8)
        return self.videos[bucket]

    def _state(self) -> dict[str, Any]:
        pending = [
            [bucket, ref, counter] for bucket, items in enumerate(self.pending) for ref, counter, _ in items
        ]
        return {"stream": self.stream.state(), "pending": pending, "skipped": dict(self.skipped)}

    def _target(self) -> int:
        return scheduled_bucket(self.slot.seed, self.batch_number, len(self.buckets))

    def _hold(self, bucket: int, target: int) -> None:
        """Drop the oldest clips of a non-scheduled bucket beyond `HELD_BATCHES` batches (counted)."""
        excess = len(self.pending[bucket]) - HELD_BATCHES * self.buckets[bucket].batch_size
        if bucket != target and excess > 0:
            del self.pending[bucket][:excess]
            self._skip(f"bucket {self._name(bucket)} held more clips than {HELD_BATCHES} batches", excess)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        bad, waited, target = 0, 0, self._target()
        for ref, sample in self.stream:
            counter = self.stream.emitted - 1
            waited += 1
            if waited > MAX_WAIT:
                raise RuntimeError(
                    f"data.buckets: {MAX_WAIT} samples read without a batch of bucket {self._name(target)}: "
                    "the shards hold (almost) no clip for it (that data.filters passes); remove it from data.buckets"
                )
            meta = sample_meta(sample.files)
            filtered = rejection(self.filters, meta)
            if filtered:
                self._skip(filtered)
                continue
            bucket = self._latent_bucket(meta) if self.cfg.latent else choose_bucket(self.buckets, meta)
            if bucket is None:
                shape = "x".join(str(size) for size in meta.get("clip_shape") or ["?"])
                self._skip(f"cached for bucket {shape}, which is not in data.buckets")
                continue
            item, reason = self._prepare(sample, ref, counter, bucket)
            if item is None:
                self._skip(reason)
                bad += 1
                if bad >= MAX_CONSECUTIVE_BAD:
                    raise RuntimeError(
                        f"{bad} samples in a row could not be decoded (last: {sample.key} in {ref[1]})"
                    )
                continue
            bad = 0
            self.pending[bucket].append((ref, counter, item))
            self._hold(bucket, target)
            while len(self.pending[target]) >= self.buckets[target].batch_size:
                size = self.buckets[target].batch_size
                items = [entry[2] for entry in self.pending[target][:size]]
                del self.pending[target][:size]
                batch = self._collate(items, target)
                self.batch_number += self.slot.workers
                target, waited = self._target(), 0
                yield batch | {"_position": {"worker": self.slot.worker, "state": self._state()}}

    def _collate(self, items: list[dict[str, Any]], bucket: int) -> dict[str, Any]:
        captions = [item["caption"] for item in items]
        batch: dict[str, Any] = {"caption": captions, "meta": [item["meta"] for item in items]}
        batch["frame_stride"] = torch.tensor([item["frame_stride"] for item in items], dtype=torch.long)
        if self.cfg.latent:
            batch["latents"] = torch.from_numpy(np.stack([item["latents"] for item in items])).float()
            for name in ("text_emb", "text_mask"):
                if all(name in item for item in items):
                    batch[name] = torch.from_numpy(np.stack([item[name] for item in items])).float()
        else:
            ring, row = self.handoff  # set for pixel shards: VideoLoader makes the ring
            videos = np.stack([item["video"] for item in items], out=self._video_batch(bucket))
            batch["_video_cell"] = ring.put(row, self.handed, videos)
            self.handed += 1
        if self.tokenizer is not None:
            batch["tokens"] = self.tokenizer(captions).long()
        return batch
