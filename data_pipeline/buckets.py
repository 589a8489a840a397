"""Aspect-ratio buckets: the clip shapes a loader batches, and which one a clip goes to.

A batch holds clips of one shape. With several buckets configured (`data.buckets`), each clip
goes to the bucket closest to its aspect ratio among those it is long enough for; without, there
is one bucket of the configured clip shape. Which bucket the n-th batch of a rank comes from is
`scheduled_bucket(seed, n, count)`: the same on every rank, so the ranks of a data-parallel step
all run one shape. A bucket written without a batch size gets the one that keeps its tokens per
batch (frames x height x width x batch) closest to those of the configured clip shape.

See docs/methods.md, 'Data: aspect and length buckets in training'.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from data_pipeline.config import DataConfig
from data_pipeline.stages import ClipShape
from data_pipeline.stream import keyed_random


@dataclass(frozen=True, kw_only=True)
class Bucket:
    shape: ClipShape
    """Clip shape of the bucket's batches."""
    batch_size: int
    """Samples per batch of this bucket."""


def choose_bucket(buckets: list[Bucket], meta: dict[str, Any]) -> int:
    """Closest aspect ratio (log scale) among the buckets the clip is long enough for."""
    frames = int(meta.get("num_frames", 0) or 0)
    fits = [number for number, bucket in enumerate(buckets) if frames == 0 or frames >= bucket.shape.span]
    if len(buckets) == 1 or not fits or not meta.get("width"):
        return fits[0] if fits else 0
    aspect = math.log(float(meta["width"]) / float(meta["height"]))
    return min(
        fits,
        key=lambda number: abs(math.log(buckets[number].shape.width / buckets[number].shape.height) - aspect),
    )


def build_buckets(cfg: DataConfig, batch_size: int) -> list[Bucket]:
    """The buckets of `data.buckets`, or one bucket of the configured clip shape and `batch_size`
    (at the highest frame stride, so a clip chosen for a bucket is long enough at any stride)."""
    stride = cfg.stride_bounds()[1]
    shapes = cfg.bucket_shapes() or [(cfg.frames, cfg.height, cfg.width, batch_size)]
    tokens = cfg.frames * cfg.height * cfg.width * batch_size
    return [
        Bucket(
            shape=ClipShape(frames=frames, frame_stride=stride, height=height, width=width),
            batch_size=batch or max(1, round(tokens / (frames * height * width))),
        )
        for frames, height, width, batch in shapes
    ]


def scheduled_bucket(seed: int, batch: int, count: int) -> int:
    """The bucket of a rank's `batch`-th batch: every `count` consecutive batches visit each
    bucket once, in an order shuffled per round from `seed` (identical on every rank)."""
    if count == 1:
        return 0
    order = list(range(count))
    keyed_random("bucket", seed, batch // count).shuffle(order)
    return order[batch % count]
