"""SCuts (StreamingT2V): the number of scene cuts PySceneDetect finds in a video.

A video with S detected scenes has S - 1 cuts; a video with no cut has 0 cuts (PySceneDetect
then returns an empty scene list, not one scene, so "scenes - 1" is computed as the number of
scene starts after the first). Lower is better for one continuous generated video.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data_pipeline.clips import detect_cut_seconds

DETECTOR = "PySceneDetect 0.7.2 AdaptiveDetector (default parameters), whole file at native size"


def scene_cuts(path: str | Path) -> dict[str, Any]:
    """{"cuts": number of cuts, "cut_seconds": start time of each scene after the first}."""
    cut_seconds = detect_cut_seconds(str(path))
    return {"cuts": len(cut_seconds), "cut_seconds": [round(seconds, 4) for seconds in cut_seconds]}
