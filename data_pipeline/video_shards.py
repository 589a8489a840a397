"""One video in, its clips out: decode, optional scene split, cut, resize, re-encode.

See docs/methods.md, 'Data: clips from videos'.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import av

from data_pipeline.clips import ClipGrid, SegmentTracker, detect_cut_seconds
from data_pipeline.inputs import InputItem, file_issue, sample_key
from data_pipeline.scores import clip_scores, cuts_inside
from data_pipeline.shard_writer import UnitResult
from data_pipeline.video_io import encode_mp4, iter_frames, probe, short_side_size, to_rgb


@dataclass(frozen=True, kw_only=True)
class CutOptions:
    clip_frames: int
    """Frames per clip."""
    frame_stride: int
    """Source frames between consecutive clip frames."""
    size: int
    """Short side of the output clips in pixels."""
    scene_split: bool
    """Run PySceneDetect's AdaptiveDetector first; no clip spans a detected cut."""
    scores: bool = True
    """Store the curation scores (scores.py) under 'scores' in each clip's json."""
    aesthetic_model: str | None = None
    """Folder of the aesthetic model (aesthetic.py) adding an 'aesthetic' score; None: no such score."""


def _sample(
    item: InputItem, clip: int, frames: list, meta: dict[str, object]
) -> tuple[str, dict[str, bytes]]:
    info = dict(meta, source=item.source, clip=clip)
    if item.extra:
        info["extra"] = item.extra
    files = {
        "mp4": encode_mp4(frames, meta["_rate"]),
        "txt": item.caption.encode("utf-8"),
        "json": json.dumps({k: v for k, v in info.items() if not k.startswith("_")}, sort_keys=True).encode(),
    }
    return sample_key(item.source, clip), files


def _cut(item: InputItem, options: CutOptions, cut_seconds: list[float]) -> tuple[list, int]:
    """(samples, decoded frame count) of one video; `cut_seconds` split it when scene_split is set
    and are counted into each clip's scores when scores is set."""
    grid = ClipGrid(clip_frames=options.clip_frames, frame_stride=options.frame_stride)
    with av.open(item.path) as container:
        info = probe(container)
        width, height = short_side_size(info.width, info.height, options.size)
        tracker = SegmentTracker(cut_seconds if options.scene_split else [], float(info.fps))
        base = {
            "_rate": info.fps / options.frame_stride,
            "fps": float(info.fps / options.frame_stride),
            "source_fps": float(info.fps),
            "frame_stride": options.frame_stride,
            "num_frames": options.clip_frames,
            "width": width,
            "height": height,
            "source_width": info.width,
            "source_height": info.height,
        }
        samples, frames, decoded, first_seconds = [], [], 0, 0.0
        for index, seconds, frame in iter_frames(container):
            decoded = index + 1
            if tracker.advance(index, seconds):
                frames = []  # a cut drops the unfinished clip: no clip spans it
            slot = grid.slot(index - tracker.start)
            if slot is None:
                continue
            if slot[1] == 0:
                frames, first_seconds = [], seconds
            frames.append(to_rgb(frame, (width, height)))
            if len(frames) == options.clip_frames:
                start = index - grid.span + 1
                meta = dict(base, start_frame=start, scene=tracker.number)
                if options.scores:
                    cuts = cuts_inside(cut_seconds, first_seconds, seconds, float(info.fps))
                    meta["scores"] = clip_scores(frames, cuts, options.aesthetic_model)
                samples.append(_sample(item, len(samples), frames, meta))
                frames = []
    return samples, decoded


def process_video(item: InputItem, options: CutOptions) -> UnitResult:
    """Clips of one input, or the reason it gives none. Never raises for bad media."""
    if item.skip_reason is not None:
        return UnitResult(skipped=item.skip_reason)
    path = Path(item.path)
    issue = file_issue(path)
    if issue is not None:
        return UnitResult(skipped=issue)
    try:
        cuts = detect_cut_seconds(item.path) if options.scene_split or options.scores else []
        samples, decoded = _cut(item, options, cuts)
    except Exception as error:  # any decoder or scenedetect failure means this one input is bad
        return UnitResult(skipped=f"not a decodable video: {type(error).__name__}: {error}")
    if not samples:
        span = ClipGrid(clip_frames=options.clip_frames, frame_stride=options.frame_stride).span
        reason = f"too short: {decoded} decoded frames, a clip needs {span}"
        if options.scene_split:
            reason += " inside one scene"
        return UnitResult(skipped=reason)
    warnings = [item.caption_issue] if item.caption_issue else []
    return UnitResult(samples=samples, warnings=warnings, frames=len(samples) * options.clip_frames)
