"""PyAV decode and encode helpers shared by the shard writer and the loader.

Clips are encoded with fixed libx264 options on one thread, so the same frames always give the
same mp4 bytes (the kill-and-resume guarantee of `lvd shard` compares bytes).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

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
_WINDOW_TO_RGB = VideoReformatter()  # the loader's, one thread: its processes already fill the cores

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


def decode_frames(container: av.container.InputContainer) -> Iterator[av.VideoFrame]:
    """Frames of the first video stream in decode order, decoded on one thread."""
    stream = container.streams.video[0]
    stream.codec_context.thread_count = 1
    return container.decode(stream)


def iter_frames(container: av.container.InputContainer) -> Iterator[tuple[int, float, av.VideoFrame]]:
    """(index in decode order, presentation seconds, frame) of the first video stream, one thread."""
    fallback_rate = float(container.streams.video[0].average_rate or 25)
    for index, frame in enumerate(decode_frames(container)):
        yield index, (frame.time if frame.time is not None else index / fallback_rate), frame


def to_rgb(frame: av.VideoFrame, size: tuple[int, int] | None = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB, resized to `size` = (width, height) with area averaging when given."""
    width, height = size if size else (None, None)
    rgb = _TO_RGB.reformat(frame, width=width, height=height, format="rgb24", interpolation=EXACT_AREA)
    return rgb.to_ndarray()


def to_rgb_window(
    frame: av.VideoFrame, size: tuple[int, int], window: tuple[int, int, int, int]
) -> np.ndarray:
    """(h, w, 3) uint8 RGB view of `window` = (left, top, w, h) of the frame resized to `size`.

    Equal, pixel for pixel, to `to_rgb(frame, size)[top : top + h, left : left + w]`. Without a
    resize only the window plus a margin goes through swscale, so a 16:9 frame cropped square
    converts about half the pixels. The view shares memory with a frame: copy it before the next call.
    """
    key = (frame.width, frame.height, frame.format.name, size, window)
    plan = _WINDOW_PLANS.get(key) or _plan_window(*key)
    if plan.crop is not None:
        frame = _crop(frame, plan.crop)
    rgb = _WINDOW_TO_RGB.reformat(
        frame, width=plan.size[0], height=plan.size[1], format="rgb24", interpolation=EXACT_AREA, threads=1
    )
    plane = rgb.planes[0]
    rows = np.frombuffer(plane, np.uint8).reshape(rgb.height, plane.line_size)  # (H, line_size)
    left, top, width, height = plan.window
    return rows[top : top + height, 3 * left : 3 * (left + width)].reshape(height, width, 3)


@dataclass(frozen=True, kw_only=True)
class _WindowPlan:
    crop: tuple[int, int, int, int] | None
    """(left, top, width, height) cropped from the frame before swscale, or None."""
    size: tuple[int, int]
    """(width, height) that swscale produces."""
    window: tuple[int, int, int, int]
    """(left, top, width, height) of the window in swscale's output."""


# The pixel formats of h264 clips written by `lvd shard` (others take the whole-frame path). Crop
# offsets stay even so the 2x2-subsampled chroma planes stay aligned; swscale's chroma filter reads
# 1 chroma sample (2 pixels) past the window, hence the margin.
_CROPPABLE = frozenset({"yuv420p", "yuvj420p"})
_CROP_MARGIN = 2
_WINDOW_PLANS: dict[tuple[object, ...], _WindowPlan] = {}
_MAX_WINDOW_PLANS = 16  # random crops make a new window per clip
# (frame width, height, pixel format, crop width, height) -> [source, crop, sink, graph, (x, y) now]
_CROP_FILTERS: dict[tuple[object, ...], list[Any]] = {}


def _plan_window(
    frame_width: int,
    frame_height: int,
    pix_fmt: str,
    size: tuple[int, int],
    window: tuple[int, int, int, int],
) -> _WindowPlan:
    if size != (frame_width, frame_height) or pix_fmt not in _CROPPABLE:
        plan = _WindowPlan(crop=None, size=size, window=window)
    else:
        left, top, width, height = window
        x0, y0 = max(0, left - _CROP_MARGIN) & ~1, max(0, top - _CROP_MARGIN) & ~1
        x1 = min(frame_width, (left + width + _CROP_MARGIN + 1) & ~1)
        y1 = min(frame_height, (top + height + _CROP_MARGIN + 1) & ~1)
        crop = (x0, y0, x1 - x0, y1 - y0)
        plan = _WindowPlan(crop=crop, size=(x1 - x0, y1 - y0), window=(left - x0, top - y0, width, height))
    if len(_WINDOW_PLANS) >= _MAX_WINDOW_PLANS:
        _WINDOW_PLANS.clear()
    _WINDOW_PLANS[(frame_width, frame_height, pix_fmt, size, window)] = plan
    return plan


def _crop(frame: av.VideoFrame, box: tuple[int, int, int, int]) -> av.VideoFrame:
    """The frame cropped to `box` by FFmpeg's crop filter: no pixel copy, and the frame keeps its
    colour tags and chroma siting (a frame rebuilt from cropped arrays loses the siting, and swscale
    then converts it differently). One filter per crop size; a new offset is a filter command."""
    key = (frame.width, frame.height, frame.format.name, box[2], box[3])
    entry = _CROP_FILTERS.get(key)
    if entry is None:
        if len(_CROP_FILTERS) >= _MAX_WINDOW_PLANS:  # many source sizes: keep the cache small
            _CROP_FILTERS.clear()
        entry = _CROP_FILTERS[key] = _crop_filter(*key)
    if entry[4] != box[:2]:
        entry[1].process_command("x", str(box[0]))
        entry[1].process_command("y", str(box[1]))
        entry[4] = box[:2]
    entry[0].push(frame)
    return entry[2].pull()


def _crop_filter(frame_width: int, frame_height: int, pix_fmt: str, width: int, height: int) -> list[Any]:
    graph = av.filter.Graph()
    graph.threads = 1
    source = graph.add_buffer(
        width=frame_width, height=frame_height, format=pix_fmt, time_base=Fraction(1, 1)
    )
    crop = graph.add("crop", f"w={width}:h={height}:x=0:y=0")
    sink = graph.add("buffersink")
    source.link_to(crop)
    crop.link_to(sink)
    graph.configure()
    return [source, crop, sink, graph, (0, 0)]


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
