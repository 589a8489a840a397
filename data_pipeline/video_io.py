"""PyAV decode and encode helpers shared by the shard writer and the loader.

Clips are encoded with fixed libx264 options on one thread, so the same frames always give the
same mp4 bytes (the kill-and-resume guarantee of `lvd shard` compares bytes).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
from av.video.reformatter import Interpolation, VideoReformatter

# swscale picks SIMD kernels by CPU and buffer alignment; without BITEXACT their rounding differs,
# so the same frames could give different bytes from one process to the next.
EXACT_AREA = Interpolation.AREA | Interpolation.BITEXACT | Interpolation.ACCURATE_RND
EXACT_BILINEAR = Interpolation.BILINEAR | Interpolation.BITEXACT | Interpolation.ACCURATE_RND
# One swscale context cache per process and direction (building a context costs ~1 ms per call).
_TO_RGB = VideoReformatter()
_TO_YUV = VideoReformatter()

# mbtree=0: with macroblock-tree rate control x264 read uninitialised memory here and the bytes
# of a clip changed with the heap state (seen on 4 of 4 test images).
X264_OPTIONS = {
    "crf": "20",
    "preset": "veryfast",
    "tune": "fastdecode",
    "threads": "1",
    "x264-params": "mbtree=0",
}


@dataclass(frozen=True, kw_only=True)
class VideoInfo:
    fps: Fraction
    """Average frame rate of the stream."""
    width: int
    """Coded width in pixels."""
    height: int
    """Coded height in pixels."""


def short_side_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) scaled so the short side is `short_side`, rounded to even numbers (yuv420p)."""
    scale = short_side / min(width, height)
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


def probe(container: av.container.InputContainer) -> VideoInfo:
    if not container.streams.video:
        raise ValueError("no video stream")
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate
    if not rate or stream.codec_context.width <= 0:
        raise ValueError("video stream has no frame rate or size")
    return VideoInfo(fps=Fraction(rate), width=stream.codec_context.width, height=stream.codec_context.height)


def iter_frames(container: av.container.InputContainer) -> Iterator[tuple[int, float, av.VideoFrame]]:
    """(index in decode order, presentation seconds, frame) of the first video stream, one thread."""
    stream = container.streams.video[0]
    stream.codec_context.thread_count = 1
    fallback_rate = float(stream.average_rate or 25)
    for index, frame in enumerate(container.decode(stream)):
        yield index, (frame.time if frame.time is not None else index / fallback_rate), frame


def to_rgb(frame: av.VideoFrame, size: tuple[int, int] | None = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB, resized to `size` = (width, height) with area averaging when given."""
    width, height = size if size else (None, None)
    rgb = _TO_RGB.reformat(frame, width=width, height=height, format="rgb24", interpolation=EXACT_AREA)
    return rgb.to_ndarray()


def _zero_row_padding(frame: av.VideoFrame) -> av.VideoFrame:
    """Zero the bytes between each row's end and its line size (FFmpeg leaves them uninitialised),
    so everything the encoder can see is a function of the pixels."""
    for plane in frame.planes:
        rows = np.frombuffer(bytes(plane), np.uint8).reshape(-1, plane.line_size).copy()
        rows[:, plane.width :] = 0
        plane.update(rows.tobytes())
    return frame


def encode_mp4(frames: list[np.ndarray], fps: Fraction) -> bytes:
    """h264 mp4 of RGB frames with one keyframe (GOP = clip), deterministic options."""
    height, width = frames[0].shape[:2]
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps, options=dict(X264_OPTIONS))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.gop_size = len(frames)
        stream.codec_context.thread_count = 1
        stream.codec_context.max_b_frames = 0
        for index, pixels in enumerate(frames):
            rgb = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")
            frame = _zero_row_padding(_TO_YUV.reformat(rgb, format="yuv420p", interpolation=EXACT_BILINEAR))
            frame.pts, frame.time_base = (
                index,
                Fraction(1) / fps,
            )  # explicit timestamps: x264's rate control reads them
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def decode_mp4(payload: bytes, *, size: tuple[int, int] | None = None) -> np.ndarray:
    """All frames of an mp4 payload as (T, H, W, 3) uint8 (the raw-decode reference)."""
    with av.open(io.BytesIO(payload)) as container:
        return np.stack([to_rgb(frame, size) for _, _, frame in iter_frames(container)])
