"""Decoded frames of a video file for the metrics: RGB uint8, streamed, optionally thinned."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from data_pipeline.video_io import iter_frames, to_rgb


@dataclass(frozen=True, kw_only=True)
class FrameSelection:
    """Which decoded frames the frame-based metrics (MAWE, FID/KID, proxies, drift) read.
    SCuts always reads the whole file through PySceneDetect."""

    stride: int = 1
    """Keep every `stride`-th frame in decode order (1 = all frames)."""
    max_frames: int | None = None
    """Stop after this many kept frames (None = until the end of the video)."""

    def __post_init__(self) -> None:
        if self.stride < 1:
            raise ValueError(f"frame stride must be >= 1, got {self.stride}")
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {self.max_frames}")


def read_frames(path: str | Path, selection: FrameSelection = FrameSelection()) -> Iterator[np.ndarray]:
    """(H, W, 3) uint8 RGB frames of the first video stream at native size, one at a time."""
    kept = 0
    with av.open(str(path)) as container:
        for index, _, frame in iter_frames(container):
            if index % selection.stride:
                continue
            yield to_rgb(frame)
            kept += 1
            if selection.max_frames is not None and kept >= selection.max_frames:
                return
