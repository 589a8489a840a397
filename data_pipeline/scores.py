"""Curation scores of one clip, computed by `lvd shard videos` and stored in its json.

- motion: mean optical-flow magnitude (OpenCV DIS, ultrafast preset) between consecutive scored
  frames, in pixels per clip frame at a short side of `FLOW_SIZE` pixels;
- sharpness: mean over the scored frames of the variance of the grayscale Laplacian, at the
  clip's stored size;
- cuts: scene cuts (PySceneDetect's AdaptiveDetector over the source video) inside the clip;
- aesthetic (only with an `--aesthetic-model` folder): see aesthetic.py.

Every `SCORE_EVERY`-th clip frame is scored. See docs/methods.md, 'Data: curation scores and
filters'.
"""

from __future__ import annotations

import cv2
import numpy as np

from data_pipeline.aesthetic import aesthetic

SCORE_EVERY = 2
"""Clip frames between scored frames."""
FLOW_SIZE = 64
"""Short side (pixels) of the frames the optical flow is computed on."""


def _gray(frame: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)


def motion(frames: list[np.ndarray], every: int = SCORE_EVERY) -> float:
    """Mean flow magnitude in pixels per clip frame at a `FLOW_SIZE`-pixel short side."""
    height, width = frames[0].shape[:2]
    scale = FLOW_SIZE / min(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = [cv2.resize(_gray(frame), size, interpolation=cv2.INTER_AREA) for frame in frames[::every]]
    if len(small) < 2:
        return 0.0
    flow = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST)
    magnitudes = [
        float(np.linalg.norm(flow.calc(first, second, None), axis=-1).mean())
        for first, second in zip(small, small[1:], strict=False)
    ]
    return float(np.mean(magnitudes)) / every


def sharpness(frames: list[np.ndarray], every: int = SCORE_EVERY) -> float:
    """Mean variance of the Laplacian of the grayscale frames (blur lowers it)."""
    return float(np.mean([cv2.Laplacian(_gray(frame), cv2.CV_64F).var() for frame in frames[::every]]))


def cuts_inside(cut_seconds: list[float], first: float, last: float, fps: float) -> int:
    """Cuts between the frames at `first` and `last` seconds: a frame at or after a cut (with half a
    frame of tolerance) belongs to the next scene."""
    half = 0.5 / fps
    return sum(1 for cut in cut_seconds if first < cut - half <= last)


def clip_scores(frames: list[np.ndarray], cuts: int, aesthetic_model: str | None) -> dict[str, float]:
    """The scores stored under 'scores' in a clip's json."""
    scores = {"motion": round(motion(frames), 4), "sharpness": round(sharpness(frames), 2), "cuts": cuts}
    if aesthetic_model is not None:
        scores["aesthetic"] = round(aesthetic(aesthetic_model, frames), 4)
    return scores
