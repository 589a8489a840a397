"""Dataset inspection: what a set of shards holds (clip counts, durations, sizes per bucket or
shape, caption lengths, score histograms), read from the samples' json and txt members.

See docs/methods.md, 'Data: inspecting a dataset'.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterator
from typing import Any

from data_pipeline.buckets import Bucket, choose_bucket
from data_pipeline.stages import sample_caption, sample_meta
from data_pipeline.stream import expand_shard_sets
from data_pipeline.tario import TarSample, iter_samples

HISTOGRAM_BINS = 10
"""Bins of each score histogram."""


def iter_dataset(shards: str) -> Iterator[tuple[str, TarSample]]:
    """(shard url, sample) of every sample of every shard set in `shards` (data.shards syntax)."""
    for shard_set in expand_shard_sets(shards, ()):
        for url in shard_set.urls:
            for sample in iter_samples(url):
                yield url, sample


def summary(values: list[float]) -> dict[str, float]:
    """count, min, mean, median and max of `values` (count 0 alone when empty)."""
    if not values:
        return {"count": 0}
    return {
        "count": len(values),
        "min": min(values),
        "mean": statistics.fmean(values),
        "median": statistics.median(values),
        "max": max(values),
    }


def histogram(values: list[float], bins: int = HISTOGRAM_BINS) -> dict[str, list[float]]:
    """Equal-width histogram: `edges` (bins + 1 values) and `counts` (bins values)."""
    low, high = min(values), max(values)
    width = (high - low) / bins or 1.0
    counts = [0] * bins
    for value in values:
        counts[min(bins - 1, int((value - low) / width))] += 1
    return {"edges": [low + width * number for number in range(bins + 1)], "counts": counts}


def _group(meta: dict[str, Any], buckets: list[Bucket]) -> str:
    if buckets:
        shape = buckets[choose_bucket(buckets, meta)].shape
        if int(meta.get("num_frames", 0) or 0) < shape.span:
            return "too short for every bucket"
        return f"{shape.frames}x{shape.height}x{shape.width}"
    return f"{meta.get('num_frames', '?')}x{meta.get('height', '?')}x{meta.get('width', '?')}"


def _scores(meta: dict[str, Any]) -> dict[str, float]:
    scores = meta.get("scores")
    if not isinstance(scores, dict):
        return {}
    return {
        name: float(value)
        for name, value in scores.items()
        if isinstance(value, (int, float)) and math.isfinite(value)
    }


def dataset_stats(shards: str, buckets: list[Bucket]) -> dict[str, Any]:
    """Statistics of every clip in `shards`, grouped per bucket (or per frames x height x width
    shape when `buckets` is empty)."""
    groups: dict[str, dict[str, float]] = {}
    durations, words, chars = [], [], []
    scores: dict[str, list[float]] = {}
    clips, shard_urls = 0, set()
    for url, sample in iter_dataset(shards):
        meta = sample_meta(sample.files)
        caption = sample_caption(sample.files)
        clips += 1
        shard_urls.add(url)
        group = groups.setdefault(_group(meta, buckets), {"clips": 0, "bytes": 0, "seconds": 0.0})
        seconds = float(meta["num_frames"]) / float(meta["fps"]) if meta.get("fps") and "num_frames" in meta else 0.0
        group["clips"] += 1
        group["bytes"] += sum(len(payload) for payload in sample.files.values())
        group["seconds"] += seconds
        if seconds:
            durations.append(seconds)
        words.append(len(caption.split()))
        chars.append(len(caption))
        for name, value in _scores(meta).items():
            scores.setdefault(name, []).append(value)
    return {
        "shards": len(shard_urls),
        "clips": clips,
        "grouped_by": "bucket" if buckets else "shape",
        "groups": dict(sorted(groups.items())),
        "duration_seconds": summary(durations),
        "caption_words": summary(words),
        "caption_chars": summary(chars),
        "empty_captions": chars.count(0),
        "scores": {name: {**summary(values), **histogram(values)} for name, values in sorted(scores.items())},
    }


def format_stats(stats: dict[str, Any]) -> str:
    """The statistics as lines of text for a terminal."""
    lines = [f"{stats['clips']} clips in {stats['shards']} shards"]
    lines.append(f"per {stats['grouped_by']}:")
    for name, group in stats["groups"].items():
        lines.append(
            f"  {name:<28} {group['clips']:>7} clips  {group['seconds']:>9.1f} s  {group['bytes'] / 1e6:>9.2f} MB"
        )
    for title, key in (("duration (s)", "duration_seconds"), ("caption words", "caption_words")):
        lines.append(f"{title}: " + _line(stats[key]))
    lines.append(f"caption chars: {_line(stats['caption_chars'])}  (empty: {stats['empty_captions']})")
    if not stats["scores"]:
        lines.append("scores: none in the samples")
    for name, score in stats["scores"].items():
        lines.append(f"score {name}: {_line(score)}")
        peak = max(score["counts"]) or 1
        for number, count in enumerate(score["counts"]):
            low, high = score["edges"][number], score["edges"][number + 1]
            lines.append(f"  [{low:>10.4g}, {high:>10.4g})  {count:>7}  " + "#" * round(40 * count / peak))
    return "\n".join(lines)


def _line(summary_: dict[str, float]) -> str:
    if not summary_["count"]:
        return "none"
    return "  ".join(f"{key} {summary_[key]:.4g}" for key in ("min", "mean", "median", "max"))
