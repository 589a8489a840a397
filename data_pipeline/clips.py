"""Cutting a video into clips: the frame arithmetic and the scene cuts.

A clip takes `clip_frames` frames at `frame_stride`, so it spans
``span = (clip_frames - 1) * frame_stride + 1`` source frames. Clips in one segment (a scene, or
the whole video) start at ``seg_start, seg_start + hop, ...`` with ``hop = clip_frames *
frame_stride`` (the stride grid continues, no frame is used twice), and a clip must end inside
its segment: a segment of n frames gives ``(n - span) // hop + 1`` clips when n >= span, else 0.

See docs/methods.md, 'Data: clips from videos'.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class ClipGrid:
    clip_frames: int
    """Frames per clip."""
    frame_stride: int
    """Step between the frames of a clip, in source frames."""

    @property
    def span(self) -> int:
        return (self.clip_frames - 1) * self.frame_stride + 1

    @property
    def hop(self) -> int:
        return self.clip_frames * self.frame_stride

    def count(self, segment_frames: int) -> int:
        """Clips that fit in a segment of `segment_frames` frames."""
        return 0 if segment_frames < self.span else (segment_frames - self.span) // self.hop + 1

    def slot(self, offset: int) -> tuple[int, int] | None:
        """(clip number, frame number inside the clip) of segment-relative frame `offset`, or None."""
        clip, inside = divmod(offset, self.hop)
        position, remainder = divmod(inside, self.frame_stride)
        return (clip, position) if remainder == 0 and position < self.clip_frames else None


class SegmentTracker:
    """Assigns decoded frames to scenes online from cut times in seconds.

    PySceneDetect 0.7 numbers frames by timestamps (NOTES.md), so cuts travel as seconds and are
    matched against each decoded frame's own timestamp with half a frame of tolerance: a frame
    at or after a cut starts a new segment. Frame indices stay in decode order.
    """

    def __init__(self, cut_seconds: list[float], fps: float) -> None:
        self._cuts = sorted(cut_seconds)
        self._half_frame = 0.5 / fps
        self.number, self.start = 0, 0

    def advance(self, index: int, seconds: float) -> bool:
        """Account for frame (`index`, `seconds`); True if it starts a new segment."""
        crossed = False
        while self._cuts and seconds >= self._cuts[0] - self._half_frame:
            self._cuts.pop(0)
            crossed = index > 0
        if crossed:
            self.number, self.start = self.number + 1, index
        return crossed


def detect_cut_seconds(path: str) -> list[float]:
    """Start times (s) of every scene after the first, by PySceneDetect's AdaptiveDetector."""
    from scenedetect import AdaptiveDetector, SceneManager, open_video

    # One decoder thread and FFmpeg's log left silent (scenedetect's default turns it on).
    video = open_video(path, backend="pyav", threading_mode="NONE", suppress_output=True)
    manager = SceneManager()
    manager.add_detector(AdaptiveDetector())
    manager.detect_scenes(video=video)
    scenes = manager.get_scene_list()
    return [start.seconds for start, _ in scenes[1:]]
