"""The five comparisons of `benchmarks/fidelity.py`: each samples a mechanism and its ablation
(`runs.sample_pair`) and measures both videos with the project's metrics (`metrics`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.paper_fidelity.runs import TIME_FACTOR, Pair, Recipe, Runner, entry, sample_pair
from metrics import MaweConfig, drift_curve, frame_features, read_frames, scene_cuts
from metrics.seams import anchor_similarity, consecutive_correlations, seam_mawe

STREAM_CHUNK, BLEND_FRAMES, BLEND_OVERLAP = 6, 8, 3
"""Latent frames of a stage-1 chunk (the 8-frame training clips minus F_cond = 2), and of the
refinement's chunks F and overlap O (F the refiner's 8 training frames, O/F near the paper's 8/24)."""
CLIP_FRAMES = 8
"""Latent frames of a VidRD clip and of a VideoFusion window: the models' training length."""
MAWE = MaweConfig(size=64)
"""MAWE at the demo's flow size (`lvd eval --flow-size`, twice the 32-pixel frames)."""


@dataclass(frozen=True)
class Inputs:
    """What every comparison reads: the demo folder, the models trained here, the prompts."""

    runner: Runner
    demo: Path
    models: dict[str, Path]
    """The exports trained by `runs.train_models` ("streaming", "videofusion")."""
    prompts: list[str]
    recipe: Recipe


def mean(values: list[float | None]) -> float | None:
    """Mean of the values; None when any is None (a video without the figure)."""
    known = [value for value in values if value is not None]
    return float(np.mean(known)) if known and len(known) == len(values) else None


def refinement_seams(frames: int) -> list[int]:
    """Pixel frames where a refined chunk's piece begins in a video of `frames` pixel frames:
    chunk i >= 1 contributes latent frames from i·(F - O) + O on."""
    starts = range(BLEND_FRAMES, frames // TIME_FACTOR, BLEND_FRAMES - BLEND_OVERLAP)
    return [TIME_FACTOR * start for start in starts]


def chunk_seams(frames: int, chunk_latent_frames: int) -> list[int]:
    """Pixel frames where a chunk of `chunk_latent_frames` latent frames begins, after the first."""
    step = TIME_FACTOR * chunk_latent_frames
    return list(range(step, frames, step))


def streaming_blending(inputs: Inputs) -> list[dict[str, Any]]:
    """Randomised blending against --no-blend (chunks refined alone, concatenated): SCuts, and
    seam MAWE / interior MAWE at the refinement seams."""
    refiner = inputs.demo / "export" / "t2v"
    shared = ["--strategy", "streaming", "--model", str(inputs.models["streaming"]), "--model2", str(refiner)]
    shared += ["--refine-size", "32x32", "--clip-frames", str(STREAM_CHUNK)]
    shared += ["--F", str(BLEND_FRAMES), "--O", str(BLEND_OVERLAP)]
    pair = Pair("streaming-blending", shared, [], ["--no-blend"])
    sides = sample_pair(inputs.runner, pair, inputs.prompts, inputs.recipe, inputs.recipe.frames)
    seams = refinement_seams(inputs.recipe.frames)
    cuts = [[scene_cuts(video)["cuts"] for video in videos] for videos in sides]
    split = [[seam_mawe(read_frames(video), seams, MAWE) for video in videos] for videos in sides]
    ratios = [[result["ratio"] for result in side] for side in split]
    detail = {
        "videos": len(inputs.prompts),
        "frames": inputs.recipe.frames,
        "seams": seams,
        "refiner": f"{refiner} at its own 32x32 (--refine-size 32x32): no text-to-video model at twice the size "
        "exists, so both sides refine the same stage-1 video and only the blending differs",
    }
    scuts = entry(
        "streaming_blending_scuts",
        pair,
        measurement="PySceneDetect AdaptiveDetector cuts, mean per video",
        unit="cuts per video",
        better="lower",
        values=(float(np.mean(cuts[0])), float(np.mean(cuts[1]))),
        detail={**detail, "per_video": {"mechanism": cuts[0], "ablation": cuts[1]}},
    )
    ratio = entry(
        "streaming_blending_seam_mawe_ratio",
        pair,
        unit="ratio",
        better="lower",
        values=(mean(ratios[0]), mean(ratios[1])),
        measurement=f"MAWE of the frame pairs across refinement seams / MAWE of the other pairs, mean over videos ({MAWE.flow_name}, {MAWE.size} px)",
        detail={
            **detail,
            "per_video": {"mechanism": ratios[0], "ablation": ratios[1]},
            "seam_and_interior_mawe": [
                [(r["seam"].get("mawe"), r["interior"].get("mawe")) for r in side] for side in split
            ],
        },
    )
    return [scuts, ratio]


def vidrd_seams(inputs: Inputs) -> list[dict[str, Any]]:
    """FNR + PNS + DSG against naive chunking: the warp error W of the pairs across clip seams."""
    shared = [
        "--strategy",
        "vidrd",
        "--model",
        str(inputs.demo / "export" / "t2v"),
        "--clip-frames",
        str(CLIP_FRAMES),
    ]
    pair = Pair("vidrd", shared, [], ["--no-noise-reversion", "--alpha", "0", "--beta", "0"])
    sides = sample_pair(inputs.runner, pair, inputs.prompts, inputs.recipe, inputs.recipe.frames)
    seams = chunk_seams(inputs.recipe.frames, CLIP_FRAMES)
    split = [[seam_mawe(read_frames(video), seams, MAWE) for video in videos] for videos in sides]
    warp = [[result["seam"].get("warp_error") for result in side] for side in split]
    interior = [[result["interior"].get("warp_error") for result in side] for side in split]
    return [
        entry(
            "vidrd_seam_warp_error",
            pair,
            unit="squared 8-bit levels",
            better="lower",
            values=(mean(warp[0]), mean(warp[1])),
            measurement=f"MAWE's warp error W (mean squared RGB error, 0..255) of the frame pairs across clip seams, mean over videos ({MAWE.flow_name}, {MAWE.size} px)",
            detail={
                "videos": len(inputs.prompts),
                "frames": inputs.recipe.frames,
                "seams": seams,
                "per_video": {"mechanism": warp[0], "ablation": warp[1]},
                "interior_warp_error": {"mechanism": mean(interior[0]), "ablation": mean(interior[1])},
                "seam_mawe_ratio": {
                    side: mean([r["ratio"] for r in results])
                    for side, results in zip(("mechanism", "ablation"), split)
                },
            },
        )
    ]


def videofusion_correlation(inputs: Inputs) -> list[dict[str, Any]]:
    """Shared base noise (the model's λ) against independent noise (--lambda 0) at the same DDIM
    steps: the correlation of consecutive frames, within and across windows."""
    model = inputs.models["videofusion"]
    shared = ["--strategy", "videofusion", "--model", str(model), "--clip-frames", str(CLIP_FRAMES)]
    pair = Pair("videofusion", shared, [], ["--lambda", "0"])
    sides = sample_pair(inputs.runner, pair, inputs.prompts, inputs.recipe, inputs.recipe.frames)
    across = [seam - 1 for seam in chunk_seams(inputs.recipe.frames, CLIP_FRAMES)]  # pair index of each seam

    def figures(videos: list[Path]) -> dict[str, float]:
        correlations = [consecutive_correlations(list(read_frames(video))) for video in videos]
        return {
            "all_pairs": float(np.concatenate(correlations).mean()),
            "within_windows": float(np.concatenate([np.delete(c, across) for c in correlations]).mean()),
            "across_windows": float(np.concatenate([c[across] for c in correlations]).mean()),
        }

    shared_noise, independent = figures(sides[0]), figures(sides[1])
    return [
        entry(
            "videofusion_interframe_correlation",
            pair,
            unit="Pearson correlation",
            better="higher",
            values=(shared_noise["all_pairs"], independent["all_pairs"]),
            measurement="Pearson correlation of the pixels of consecutive frames, mean over all pairs of all videos",
            detail={
                "videos": len(inputs.prompts),
                "frames": inputs.recipe.frames,
                "mechanism": shared_noise,
                "ablation": independent,
                "note": "the ablation samples the same model (trained with its λ) at λ = 0; no model was trained on independent noise",
            },
        )
    ]


def lvdm_drift(inputs: Inputs) -> list[dict[str, Any]]:
    """Conditional perturbation + unconditional guidance against neither: per-chunk Inception
    feature drift from the first chunk over the autoregressive rollout of one prompt."""
    recipe = inputs.recipe
    shared = ["--strategy", "lvdm-autoregressive", "--model", str(inputs.demo / "export" / "lvdm_prediction")]
    pair = Pair("lvdm", shared, [], ["--perturb-level", "0", "--uncond-weight", "0"])
    sides = sample_pair(inputs.runner, pair, inputs.prompts[:1], recipe, recipe.lvdm_frames)
    curves = []
    for (video,) in sides:
        features = frame_features(list(read_frames(video))[:: recipe.feature_stride])
        curve = drift_curve(features, recipe.drift_chunk // recipe.feature_stride)
        starts = [start * recipe.feature_stride for start in curve["chunk_start_frames"]]  # pixel frames
        curves.append({**curve, "chunk_start_frames": starts})
    drift = [float(np.mean(curve["mean_feature_sq_distance"][1:])) for curve in curves]
    rollout = f"{recipe.lvdm_frames} frames" + (
        "" if recipe.lvdm_frames >= 512 else " (shortened from 512: --quick)"
    )
    return [
        entry(
            "lvdm_feature_drift",
            pair,
            unit="squared Inception-feature distance",
            better="lower",
            values=(drift[0], drift[1]),
            measurement=f"squared distance of each {recipe.drift_chunk}-frame chunk's mean Inception feature from the first chunk's, "
            f"mean over the later chunks (features of one frame in {recipe.feature_stride})",
            detail={
                "rollout": rollout,
                "prompt": inputs.prompts[0],
                "curves": {"mechanism": curves[0], "ablation": curves[1]},
            },
        )
    ]


def apm_similarity(inputs: Inputs) -> list[dict[str, Any]]:
    """APM against --no-apm, stage 1 alone (--no-refine): the Inception-feature cosine similarity
    of the last chunk's frames to the anchor frame (the video's first, from the base model)."""
    recipe = inputs.recipe
    shared = ["--strategy", "streaming", "--model", str(inputs.models["streaming"]), "--no-refine"]
    shared += ["--clip-frames", str(STREAM_CHUNK)]
    pair = Pair("streaming-apm", shared, [], ["--no-apm"])
    sides = sample_pair(inputs.runner, pair, inputs.prompts, recipe, recipe.frames)
    last = list(range(recipe.frames - TIME_FACTOR * STREAM_CHUNK, recipe.frames))
    similarity = []
    for videos in sides:
        per_video = []
        for video in videos:
            frames = list(read_frames(video))
            features = frame_features([frames[0], *(frames[i] for i in last)])  # anchor, then the last chunk
            per_video.append(anchor_similarity(features, 0, list(range(1, len(features)))))
        similarity.append(per_video)
    return [
        entry(
            "streaming_apm_anchor_similarity",
            pair,
            unit="cosine similarity",
            better="higher",
            values=(float(np.mean(similarity[0])), float(np.mean(similarity[1]))),
            measurement="cosine similarity of Inception features between the anchor (first) frame and each frame of the last chunk, mean over frames and videos",
            detail={
                "videos": len(inputs.prompts),
                "frames": recipe.frames,
                "last_chunk": [last[0], last[-1]],
                "per_video": {"mechanism": similarity[0], "ablation": similarity[1]},
                "note": "APM's anchor embedding comes from the export's image encoder, a randomly initialised tiny network (no CLIP weights offline)",
            },
        )
    ]


COMPARISONS = (streaming_blending, vidrd_seams, videofusion_correlation, lvdm_drift, apm_similarity)
"""In the order of the output."""
