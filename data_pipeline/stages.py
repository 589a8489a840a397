"""Per-sample stages of the loader, plain functions of their inputs (tested on plain values).

decode (PyAV) -> frame-stride sampling of L frames -> resize + crop to H x W -> [-1, 1];
caption dropout for classifier-free guidance; collation into (B, C, T, H, W).
"""

from __future__ import annotations

import io
import json
import math
import random
from dataclasses import dataclass

import av
import numpy as np
import torch
from PIL import Image

from data_pipeline.video_io import decode_frames, to_rgb_window


@dataclass(frozen=True, kw_only=True)
class ClipShape:
    frames: int
    """Frames L per sample."""
    frame_stride: int
    """Stride s between sampled frames."""
    height: int
    """Output height H."""
    width: int
    """Output width W."""

    @property
    def span(self) -> int:
        return (self.frames - 1) * self.frame_stride + 1


def resize_and_crop_box(
    width: int, height: int, shape: ClipShape, rng: random.Random | None
) -> tuple[int, int, int, int]:
    """(resized width, resized height, left, top): cover H x W keeping aspect, centre or random crop."""
    scale = max(shape.width / width, shape.height / height)
    resized_w = max(shape.width, math.ceil(width * scale - 1e-6))
    resized_h = max(shape.height, math.ceil(height * scale - 1e-6))
    free_w, free_h = resized_w - shape.width, resized_h - shape.height
    if rng is None:
        return resized_w, resized_h, free_w // 2, free_h // 2
    return resized_w, resized_h, rng.randint(0, free_w), rng.randint(0, free_h)


def decode_clip(
    payload: bytes, shape: ClipShape, rng: random.Random | None, out: np.ndarray | None = None
) -> np.ndarray | None:
    """(L, H, W, 3) frames of an mp4, or None when the clip has fewer than `span` frames.

    With `rng`, the start frame and the crop are random; without, start 0 and centre crop. The
    frames are written into `out` when given (a row of a batch: no stacking copies).
    """
    frames = np.empty((shape.frames, shape.height, shape.width, 3), np.uint8) if out is None else out
    written = 0
    with av.open(io.BytesIO(payload)) as container:
        stream = container.streams.video[0]
        available = stream.frames
        if 0 < available < shape.span:
            return None
        start = rng.randint(0, available - shape.span) if rng is not None and available > 0 else 0
        wanted = range(start, start + shape.span, shape.frame_stride)
        resized_w, resized_h, left, top = resize_and_crop_box(
            stream.codec_context.width, stream.codec_context.height, shape, rng
        )
        window = (left, top, shape.width, shape.height)
        for index, frame in enumerate(decode_frames(container)):
            if index in wanted:
                frames[written] = to_rgb_window(frame, (resized_w, resized_h), window)
                written += 1
            if written == shape.frames:
                break
    return frames if written == shape.frames else None


IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
"""Sample members that hold a still image (plain image shards, `lvd shard images --plain`)."""


def image_member(files: dict[str, bytes]) -> str | None:
    """The member of a sample holding a still image, or None."""
    return next((name for name in IMAGE_EXTENSIONS if name in files), None)


def decode_image(payload: bytes, shape: ClipShape, rng: random.Random | None) -> np.ndarray | None:
    """(1, H, W, 3) frames of a still image resized to cover H x W and cropped (random with `rng`,
    else centre), or None when it is not a readable image."""
    try:
        with Image.open(io.BytesIO(payload)) as image:
            rgb = image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    resized_w, resized_h, left, top = resize_and_crop_box(rgb.width, rgb.height, shape, rng)
    resized = rgb.resize((resized_w, resized_h), Image.Resampling.BICUBIC)
    window = resized.crop((left, top, left + shape.width, top + shape.height))
    return np.asarray(window)[None]


def to_unit_range(clips: np.ndarray) -> torch.Tensor:
    """(B, T, H, W, 3) uint8 -> (B, C, T, H, W) float32 in [-1, 1], stored channels_last_3d.

    Converting in the stored (T, H, W, C) order and permuting the view avoids a strided copy that
    cost more than the conversion itself; conv3d accepts this layout, `.contiguous()` gives NCTHW.
    numpy casts inside the multiply: two passes over the float array instead of torch's three.
    """
    video = np.multiply(clips, np.float32(2.0 / 255.0), dtype=np.float32)
    np.subtract(video, np.float32(1.0), out=video)
    return torch.from_numpy(video).permute(0, 4, 1, 2, 3)  # (B, T, H, W, C) -> (B, C, T, H, W)


def drop_caption(caption: str, p_uncond: float, rng: random.Random) -> str:
    """'' with probability p_uncond (classifier-free guidance training), else the caption."""
    return "" if rng.random() < p_uncond else caption


def strided_latents(latents: np.ndarray, stride: int, highest_stride: int) -> np.ndarray:
    """Every `stride`-th latent frame of a cached (c, t, h, w) clip, from frame 0, as many frames
    as fit at `highest_stride` (so clips of any stride in a range batch together)."""
    count = (latents.shape[1] - 1) // highest_stride + 1
    return latents[:, : (count - 1) * stride + 1 : stride]


def load_npy(payload: bytes) -> np.ndarray:
    return np.load(io.BytesIO(payload), allow_pickle=False)


def sample_meta(files: dict[str, bytes]) -> dict[str, object]:
    return json.loads(files["json"]) if "json" in files else {}


def sample_caption(files: dict[str, bytes]) -> str:
    return files.get("txt", b"").decode("utf-8", "replace")
