"""`lvd eval`: video metrics as one JSON object on stdout.

    lvd eval --video A.mp4 [B.mp4 ...] [--reference R.mp4 ...] --metrics scuts,mawe,fid,kid,fvd-proxy,drift
             [--chunk-frames 16] [--frame-stride 1] [--max-frames N] [--flow-size 720] [--i3d PATH]

One key per requested metric. A metric that cannot be computed is
{"computed": false, "reason": ...}; no number is ever made up. Set-level figures (FID, KID,
fvd-proxy, FVD) pool the frames (or windows, clips) of all --video files against those of all
--reference files. Per-video figures (SCuts, MAWE, drift) list each video under "per_video" and
give their mean over videos as "value".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from common.config import field_default
from metrics import (
    FrameSelection,
    MaweConfig,
    drift_curve,
    frame_features,
    frechet_distance,
    inception,
    kernel_inception_distance,
    mawe,
    read_frames,
    scene_cuts,
    scuts,
    window_descriptors,
)
from metrics.i3d import i3d_clip_features, load_i3d
from metrics.mawe import DIS_PRESETS

PROXY_NAME = (
    "fvd-proxy: NOT FVD. Frechet distance of window descriptors concat(mean_t f_t, mean_t |f_t+1 - f_t|) "
    "over windows of --chunk-frames frames (stride half a window), f = per-frame TF-FID InceptionV3 features"
)


def not_computed(reason: str) -> dict[str, Any]:
    return {"computed": False, "reason": reason}


class Evaluation:
    """The parsed command line plus per-video feature caches shared by the metrics."""

    def __init__(self, args: argparse.Namespace):
        self.videos: list[str] = args.video
        self.references: list[str] = args.reference or []
        self.selection = FrameSelection(stride=args.frame_stride, max_frames=args.max_frames)
        self.chunk_frames: int = args.chunk_frames
        self.mawe_config = MaweConfig(size=args.flow_size, preset=args.flow_preset)
        self.i3d_path: str | None = args.i3d
        self.clip_path: str | None = args.clip
        self.clip_model: str = args.clip_model
        self.prompt: str | None = args.prompt
        self._features: dict[str, np.ndarray] = {}

    def features(self, path: str) -> np.ndarray:
        if path not in self._features:
            start = time.perf_counter()
            self._features[path] = frame_features(read_frames(path, self.selection))
            print(
                f"lvd eval: {len(self._features[path])} Inception frame features of {path} "
                f"in {time.perf_counter() - start:.1f} s",
                file=sys.stderr,
            )
        return self._features[path]

    def pooled(self, paths: list[str]) -> np.ndarray:
        return np.concatenate([self.features(path) for path in paths])

    def frame_counts(self) -> dict[str, int]:
        return {"video": len(self.pooled(self.videos)), "reference": len(self.pooled(self.references))}


def _per_video(results: dict[str, dict[str, Any]], key: str) -> dict[str, Any]:
    values = [result[key] for result in results.values() if result.get("computed", True)]
    summary: dict[str, Any] = {"computed": bool(values)}
    if values:
        summary["value"] = float(np.mean(values))
    else:
        summary["reason"] = "not computable for any video (see per_video)"
    return summary | {"per_video": results}


def _scuts(run: Evaluation) -> dict[str, Any]:
    return _per_video({path: scene_cuts(path) for path in run.videos}, "cuts") | {"detector": scuts.DETECTOR}


def _mawe(run: Evaluation) -> dict[str, Any]:
    per_video = {path: mawe(read_frames(path, run.selection), run.mawe_config) for path in run.videos}
    config = run.mawe_config
    details = {
        "flow": config.flow_name,
        "frame_size": [config.size, config.size],
        "c": config.c,
        "pixel_range": "0..255",
        "formula": "mean W / (c * mean OFS)",
    }
    return _per_video(per_video, "mawe") | details


def _fid(run: Evaluation) -> dict[str, Any]:
    if not run.references:
        return not_computed("needs --reference videos (for one long video, see the drift metric)")
    video, reference = run.pooled(run.videos), run.pooled(run.references)
    if min(len(video), len(reference)) < 2:
        return not_computed(f"a covariance needs >= 2 frames per set, got {len(video)} and {len(reference)}")
    result = {"computed": True, "value": frechet_distance(video, reference), "network": inception.NETWORK}
    if min(len(video), len(reference)) <= inception.FEATURE_DIM:
        result["note"] = "fewer frames than feature dimensions: rank-deficient covariance, small-sample bias"
    return result | {"frames": run.frame_counts()}


def _kid(run: Evaluation) -> dict[str, Any]:
    if not run.references:
        return not_computed("needs --reference videos")
    video, reference = run.pooled(run.videos), run.pooled(run.references)
    if min(len(video), len(reference)) < 2:
        return not_computed(f"needs >= 2 frames per set, got {len(video)} and {len(reference)}")
    return {
        "computed": True,
        **kernel_inception_distance(video, reference),
        "network": inception.NETWORK,
        "frames": run.frame_counts(),
    }


def _fvd_proxy(run: Evaluation) -> dict[str, Any]:
    if not run.references:
        return not_computed("needs --reference videos")
    windows = {
        side: np.concatenate([window_descriptors(run.features(path), run.chunk_frames) for path in paths])
        for side, paths in (("video", run.videos), ("reference", run.references))
    }
    counts = {side: len(descriptors) for side, descriptors in windows.items()}
    if min(counts.values()) < 2:
        return not_computed(f"needs >= 2 windows of {run.chunk_frames} frames per set, got {counts}")
    return {
        "computed": True,
        "value": frechet_distance(windows["video"], windows["reference"]),
        "name": PROXY_NAME,
        "network": inception.NETWORK,
        "windows": counts,
        "window_frames": run.chunk_frames,
    }


def _drift(run: Evaluation) -> dict[str, Any]:
    per_video: dict[str, Any] = {}
    for path in run.videos:
        features = run.features(path)
        if len(features) < 2:
            per_video[path] = not_computed(f"needs >= 2 frames, got {len(features)}")
        else:
            curve = drift_curve(features, run.chunk_frames)
            per_video[path] = {"computed": True, "last_chunk_frechet": curve["frechet"][-1], **curve}
    definition = (
        "per chunk of --chunk-frames frames: Frechet distance and squared mean-feature distance of its "
        "frame features to the first chunk's; value = mean over videos of the last chunk's Frechet distance"
    )
    details = {"network": inception.NETWORK, "chunk_frames": run.chunk_frames, "definition": definition}
    return _per_video(per_video, "last_chunk_frechet") | details


def _fvd(run: Evaluation) -> dict[str, Any]:
    if run.i3d_path is None:
        return not_computed("needs local I3D weights (--i3d)")
    if not run.references:
        return not_computed("needs --reference videos")
    module = load_i3d(run.i3d_path)
    sides = {"video": run.videos, "reference": run.references}
    parts = {
        side: [i3d_clip_features(module, read_frames(path, run.selection)) for path in paths]
        for side, paths in sides.items()
    }
    counts = {side: sum(len(part) for part in side_parts) for side, side_parts in parts.items()}
    if min(counts.values()) < 2:
        return not_computed(f"needs >= 2 complete 16-frame clips per set, got {counts}")
    video, reference = (np.concatenate([part for part in parts[side] if len(part)]) for side in sides)
    return {
        "computed": True,
        "value": frechet_distance(video, reference),
        "network": f"I3D TorchScript from {run.i3d_path}",
        "clips": counts,
    }


def prompt_for(video: str, prompt: str | None) -> str | None:
    """--prompt, else the first non-empty line of the caption file beside the video (<stem>.txt)."""
    if prompt is not None:
        return prompt
    caption = Path(video).with_suffix(".txt")
    lines = caption.read_text(encoding="utf-8").splitlines() if caption.is_file() else []
    return next((line.strip() for line in lines if line.strip()), None)


def _clipsim(run: Evaluation) -> dict[str, Any]:
    if run.clip_path is None:
        return not_computed("needs local CLIP weights (--clip)")
    from metrics.clipsim import clipsim, load_clip  # open_clip is slow to import; only here

    scorer = load_clip(run.clip_path, run.clip_model)
    per_video = {}
    for path in run.videos:
        prompt = prompt_for(path, run.prompt)
        per_video[path] = (
            clipsim(scorer, read_frames(path, run.selection), prompt)
            if prompt
            else not_computed(f"no --prompt and no caption file {Path(path).with_suffix('.txt')}")
        )
    return _per_video(per_video, "clipsim") | {
        "network": scorer.name,
        "definition": "mean frame-prompt cosine",
    }


METRICS: dict[str, Callable[[Evaluation], dict[str, Any]]] = {
    "scuts": _scuts,
    "mawe": _mawe,
    "fid": _fid,
    "kid": _kid,
    "fvd-proxy": _fvd_proxy,
    "drift": _drift,
    "fvd": _fvd,
    "clipsim": _clipsim,
}


def _metric_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in METRICS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown metric(s) {unknown}; valid: {','.join(METRICS)}")
    return list(dict.fromkeys(names))


def _positive(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _existing_file(text: str) -> str:
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return text


def _existing_path(text: str) -> str:
    if not Path(text).exists():
        raise argparse.ArgumentTypeError(f"no such file or folder: {text}")
    return text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lvd eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--video", nargs="+", required=True, type=_existing_file, help="videos to evaluate")
    parser.add_argument(
        "--reference", nargs="+", type=_existing_file, help="reference videos for FID/KID/fvd-proxy/FVD"
    )
    parser.add_argument(
        "--metrics",
        type=_metric_list,
        default=_metric_list("scuts,mawe,fid,kid,fvd-proxy,drift"),
        help=f"comma-separated subset of {','.join(METRICS)}",
    )
    parser.add_argument(
        "--chunk-frames", type=_positive(2), default=16, help="frames per drift chunk and proxy window"
    )
    parser.add_argument(
        "--frame-stride",
        type=_positive(1),
        default=field_default(FrameSelection, "stride"),
        help="keep every n-th decoded frame (not SCuts)",
    )
    parser.add_argument(
        "--max-frames",
        type=_positive(1),
        default=field_default(FrameSelection, "max_frames"),
        help="at most this many kept frames per video",
    )
    parser.add_argument(
        "--flow-size",
        type=_positive(16),
        default=field_default(MaweConfig, "size"),
        help="MAWE frame size (square), 720 as the paper",
    )
    parser.add_argument(
        "--flow-preset",
        choices=list(DIS_PRESETS),
        default=field_default(MaweConfig, "preset"),
        help="OpenCV DIS preset",
    )
    parser.add_argument(
        "--i3d", type=_existing_file, help="TorchScript I3D (i3d_torchscript.pt format) for FVD"
    )
    parser.add_argument(
        "--clip", type=_existing_path, help="CLIP weights file, or open_clip local-dir folder"
    )
    parser.add_argument(
        "--clip-model", default="ViT-B-32", help="open_clip architecture of a --clip weights file"
    )
    parser.add_argument("--prompt", help="CLIPSIM prompt for every video (default: the <video>.txt caption)")
    return parser


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Every requested metric, in the order given on the command line."""
    run = Evaluation(args)
    return {name: METRICS[name](run) for name in args.metrics}


def main(argv: list[str]) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    try:
        results = evaluate(args)
    except (ValueError, FileNotFoundError) as err:  # unusable user-supplied weights or videos
        print(f"lvd eval: {err}", file=sys.stderr)
        return 2
    print(json.dumps(results, indent=2, allow_nan=False))
    return 0
