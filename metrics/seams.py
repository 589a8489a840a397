"""Long-video figures at the places where generated chunks meet, for comparing a long-video
mechanism with its ablation on one video each:

- Seam MAWE: MAWE (`metrics.mawe`) of the consecutive frame pairs that straddle a chunk seam,
  against MAWE of the pairs inside the chunks. A video whose chunks join smoothly has a ratio
  near 1; a jump at every seam raises the seam figure above the interior one.
- Inter-frame correlation: the Pearson correlation of the pixels of consecutive frames (each
  frame flattened over height, width and colour), the figure by which VideoFusion judges how
  much content frames share.
- Anchor similarity: the cosine similarity of per-frame features (e.g. the Inception features of
  `metrics.inception`) between an anchor frame and later frames, how StreamingT2V's APM is meant
  to keep the anchor's appearance.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from metrics.mawe import MaweConfig, consecutive_pairs, summary


def seam_mawe(
    frames: Iterable[np.ndarray], seams: Sequence[int], config: MaweConfig = MaweConfig()
) -> dict[str, Any]:
    """MAWE of the pairs (s - 1, s) across every seam s (the first frame of a new chunk) and of the
    other consecutive pairs, and their ratio (None when either is not computed)."""
    pairs = consecutive_pairs(frames, config)
    starts = sorted({s for s in seams if 0 < s <= len(pairs)})
    if not starts or len(starts) == len(pairs):
        raise ValueError(
            f"need seams inside the video and pairs between them: seams {list(seams)}, {len(pairs) + 1} frames"
        )
    across = set(starts)
    seam = summary([pair for index, pair in enumerate(pairs) if index + 1 in across], config)
    interior = summary([pair for index, pair in enumerate(pairs) if index + 1 not in across], config)
    computed = seam["computed"] and interior["computed"] and interior["mawe"] > 0
    return {
        "seam": seam,
        "interior": interior,
        "ratio": seam["mawe"] / interior["mawe"] if computed else None,
        "seams": starts,
    }


def consecutive_correlations(frames: Iterable[np.ndarray]) -> np.ndarray:
    """(N - 1,) Pearson correlation of frame t and frame t + 1 over all their pixels; a constant
    frame has correlation 0 with anything."""
    vectors = []
    for frame in frames:
        values = np.asarray(frame, dtype=np.float64).ravel()
        centred = values - values.mean()
        norm = np.linalg.norm(centred)
        vectors.append(centred / norm if norm > 0 else centred)
    if len(vectors) < 2:
        raise ValueError(f"inter-frame correlation needs >= 2 frames, got {len(vectors)}")
    stacked = np.stack(vectors)  # (N, H * W * 3)
    return np.sum(stacked[:-1] * stacked[1:], axis=1)


def anchor_similarity(features: np.ndarray, anchor: int, frames: Sequence[int]) -> float:
    """Mean cosine similarity between the features (N, D) of frame `anchor` and of each of `frames`."""
    if not frames:
        raise ValueError("anchor similarity needs at least one frame to compare")
    unit = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    return float(np.mean(unit[list(frames)] @ unit[anchor]))
