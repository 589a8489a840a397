"""MAWE, the motion-aware warp error of StreamingT2V (Henschel et al. 2024).

    MAWE(V) = W(V) / (c · OFS(V)),  c = 9.5

OFS(V): mean optical-flow magnitude (pixels) over all pixels of all consecutive frame pairs.
W(V): mean over pairs of the mean squared RGB warp error (0..255 pixel units, as the official
`mawe.py`) over non-occluded pixels: frame t+1 is warped back onto frame t with the forward flow
F_{t->t+1} (bilinear), and a pixel counts when its target lies inside the frame and passes the
forward-backward consistency check of Sundaram et al. 2010 (as used by Ruder et al. 2016):
|F + B̂|² <= 0.01 (|F|² + |B̂|²) + 0.5, with B̂ the backward flow sampled at x + F(x).

The paper used RAFT on frames resized to 720x720; here an OpenCV DIS flow on frames resized
(bilinear, aspect ratio not kept, like the official script) to `size` x `size` is the offline
stand-in, and the output names it. Figures are therefore not comparable with the paper's.
The official script averages per-pair ratios W_i / (c · OFS_i); that figure is reported beside
the paper's formula as `mawe_per_pair_mean`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

DIS_PRESETS = {
    "ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
    "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
    "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
}


@dataclass(frozen=True, kw_only=True)
class MaweConfig:
    """Constants and the flow estimator of MAWE."""

    c: float = 9.5
    """Scale between warp error and flow magnitude (StreamingT2V's regression on validation videos)."""
    size: int = 720
    """Frames are resized to size x size before flow and warping (720 in the paper)."""
    preset: str = "medium"
    """OpenCV DIS optical-flow preset: ultrafast, fast or medium."""

    def __post_init__(self) -> None:
        if self.preset not in DIS_PRESETS:
            raise ValueError(f"unknown DIS preset {self.preset!r}; valid: {', '.join(DIS_PRESETS)}")
        if self.size < 16 or self.c <= 0:
            raise ValueError(f"MAWE needs size >= 16 and c > 0, got size={self.size}, c={self.c}")

    @property
    def flow_name(self) -> str:
        return f"opencv-dis {self.preset} ({cv2.__version__}; offline stand-in for RAFT)"


@dataclass(frozen=True)
class PairStats:
    warp_error: float
    """Mean squared RGB error over non-occluded pixels (nan when every pixel is occluded)."""
    flow_magnitude: float
    """Mean |F| over all pixels, in pixels of the resized frame."""
    valid_fraction: float
    """Fraction of pixels that passed the occlusion check."""


def _sample(image: np.ndarray, map_x: np.ndarray, map_y: np.ndarray) -> np.ndarray:
    return cv2.remap(image, map_x, map_y, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def pair_stats(frame: np.ndarray, next_frame: np.ndarray, flow: cv2.DISOpticalFlow) -> PairStats:
    """Warp error and flow magnitude of one consecutive pair of equal-size RGB uint8 frames."""
    gray, next_gray = (cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) for image in (frame, next_frame))
    forward = flow.calc(gray, next_gray, None)  # (H, W, 2): x, y displacement t -> t+1
    backward = flow.calc(next_gray, gray, None)
    height, width = gray.shape
    grid_x, grid_y = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    map_x, map_y = grid_x + forward[..., 0], grid_y + forward[..., 1]
    warped = _sample(next_frame.astype(np.float32), map_x, map_y)
    backward_at_target = _sample(backward, map_x, map_y)
    inside = (map_x >= 0) & (map_x <= width - 1) & (map_y >= 0) & (map_y <= height - 1)
    mismatch = np.sum((forward + backward_at_target) ** 2, axis=-1)
    tolerance = 0.01 * (np.sum(forward**2, axis=-1) + np.sum(backward_at_target**2, axis=-1)) + 0.5
    valid = inside & (mismatch <= tolerance)
    squared = np.sum((frame.astype(np.float32) - warped) ** 2, axis=-1) / 3.0
    warp_error = float(squared[valid].mean()) if valid.any() else float("nan")
    magnitude = float(np.linalg.norm(forward, axis=-1).mean())
    return PairStats(warp_error=warp_error, flow_magnitude=magnitude, valid_fraction=float(valid.mean()))


def summary(pairs: list[PairStats], config: MaweConfig) -> dict[str, Any]:
    """MAWE of a set of frame pairs (all of a video's, or a subset such as the pairs across chunk
    seams), with W, OFS and pair counts."""
    usable = [pair for pair in pairs if np.isfinite(pair.warp_error)]
    if not usable:
        return {"computed": False, "reason": f"every pixel of all {len(pairs)} frame pairs was occluded"}
    warp_error = float(np.mean([pair.warp_error for pair in usable]))
    ofs = float(np.mean([pair.flow_magnitude for pair in pairs]))
    if ofs <= 0.0:
        return {"computed": False, "reason": "no motion: optical-flow score OFS is 0"}
    moving = [pair for pair in usable if pair.flow_magnitude > 0.0]
    per_pair = float(np.mean([pair.warp_error / (config.c * pair.flow_magnitude) for pair in moving]))
    return {
        "computed": True,
        "mawe": warp_error / (config.c * ofs),
        "warp_error": warp_error,
        "ofs": ofs,
        "mawe_per_pair_mean": per_pair,
        "pairs": len(pairs),
        "pairs_all_occluded": len(pairs) - len(usable),
        "mean_valid_fraction": float(np.mean([pair.valid_fraction for pair in pairs])),
    }


def consecutive_pairs(frames: Iterable[np.ndarray], config: MaweConfig = MaweConfig()) -> list[PairStats]:
    """Warp error and flow magnitude of every consecutive pair (t, t+1) of a stream of RGB uint8
    frames, in order, on frames resized to `config.size`."""
    flow = cv2.DISOpticalFlow_create(DIS_PRESETS[config.preset])
    pairs: list[PairStats] = []
    previous = None
    for frame in frames:
        resized = cv2.resize(frame, (config.size, config.size), interpolation=cv2.INTER_LINEAR)
        if previous is not None:
            pairs.append(pair_stats(previous, resized, flow))
        previous = resized
    return pairs


def mawe(frames: Iterable[np.ndarray], config: MaweConfig = MaweConfig()) -> dict[str, Any]:
    """MAWE of a stream of RGB uint8 frames, with W, OFS and pair counts; needs >= 2 frames."""
    pairs = consecutive_pairs(frames, config)
    if not pairs:
        return {"computed": False, "reason": "needs at least 2 frames"}
    return summary(pairs, config)
