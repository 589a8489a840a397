"""VidRD pseudo-videos: an image becomes a clip along a smooth monotone zoom/pan path.

A crop window of relative scale s (fraction of the largest window of the output aspect that fits)
and pan position p (where the window sits in the room it leaves free: 0 = left/top edge, 1 =
right/bottom edge) moves from a random start state to a random end state. Scale and pan move
monotonically along a smoothstep easing e(t) = 3t² − 2t³, t = frame / (frames − 1), so the
window always stays inside the image. The path is drawn from a generator seeded with seed + a
stable hash of the source.

See docs/methods.md, 'VidRD: pseudo-videos from images'. `process_still` writes the plain
image instead (`lvd shard images --plain`), for the image batches of `data.image_shards`.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

from data_pipeline.inputs import InputItem, file_issue, sample_key, stable_hash
from data_pipeline.shard_writer import UnitResult
from data_pipeline.video_io import encode_mp4, short_side_size


@dataclass(frozen=True, kw_only=True)
class CameraPath:
    scale: tuple[float, float]
    """Window side as a fraction of the image side, at the first and at the last frame."""
    pan_x: tuple[float, float]
    """Horizontal position of the window in the free room (0 left, 1 right), first and last frame."""
    pan_y: tuple[float, float]
    """Vertical position of the window in the free room (0 top, 1 bottom), first and last frame."""
    seed: int
    """Seed the path was drawn with (seed + stable hash of the source)."""

    def window(self, t: float) -> tuple[float, float, float]:
        """(scale, pan x, pan y) at time t in [0, 1], eased by smoothstep."""
        eased = t * t * (3.0 - 2.0 * t)

        def mix(pair: tuple[float, float]) -> float:
            return pair[0] + (pair[1] - pair[0]) * eased

        return mix(self.scale), mix(self.pan_x), mix(self.pan_y)

    def as_json(self) -> dict[str, object]:
        return dict(asdict(self), easing="smoothstep")


def draw_path(source: str, seed: int, *, min_scale: float) -> CameraPath:
    """A random zoom (in or out) and pan, reproducible from (seed, source)."""
    path_seed = seed + stable_hash(source)
    rng = random.Random(path_seed)
    scale = (rng.uniform(min_scale, 1.0), rng.uniform(min_scale, 1.0))
    pan_x = (rng.random(), rng.random())
    pan_y = (rng.random(), rng.random())
    return CameraPath(scale=scale, pan_x=pan_x, pan_y=pan_y, seed=path_seed)


def load_rgb(path: str) -> Image.Image:
    """RGB image; transparency is composited on white (tuxpaint stamps are RGBA)."""
    with Image.open(path) as image:
        image.load()
        if image.mode in ("RGBA", "LA", "P"):
            rgba = image.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(canvas, rgba).convert("RGB")
        return image.convert("RGB")


def render(image: Image.Image, camera: CameraPath, *, frames: int, size: tuple[int, int]) -> list[np.ndarray]:
    """`frames` RGB frames (H, W, 3) of `size` = (width, height) along the camera path.

    The window keeps the output aspect ratio; its side is `scale` times the largest window of
    that aspect that fits in the image.
    """
    width, height = image.size
    aspect = size[0] / size[1]
    full_w = min(width, height * aspect)
    full_h = full_w / aspect
    out = []
    for index in range(frames):
        scale, pan_x, pan_y = camera.window(index / max(1, frames - 1))
        box_w, box_h = full_w * scale, full_h * scale
        left, top = (width - box_w) * pan_x, (height - box_h) * pan_y
        box = (left, top, left + box_w, top + box_h)
        out.append(np.asarray(image.resize(size, Image.Resampling.BICUBIC, box=box)))
    return out


@dataclass(frozen=True, kw_only=True)
class PseudoOptions:
    frames: int
    """Frames per pseudo-video."""
    size: int
    """Short side of the clip in pixels (the image's aspect ratio is kept)."""
    fps: float
    """Frame rate written into the mp4 and the json."""
    seed: int
    """Base seed; each image adds a stable hash of its source."""
    min_scale: float
    """Smallest crop window (fraction of the full window): the strongest zoom."""


def _open_input(item: InputItem) -> Image.Image | UnitResult:
    """The input image, or the skipped result naming why it cannot be used. Never raises for bad input."""
    if item.skip_reason is not None:
        return UnitResult(skipped=item.skip_reason)
    issue = file_issue(Path(item.path))
    if issue is not None:
        return UnitResult(skipped=issue)
    try:
        return load_rgb(item.path)
    except Exception as error:  # PIL raises many types for bad files; all mean "not an image"
        return UnitResult(skipped=f"not a readable image: {type(error).__name__}: {error}")


def process_image(item: InputItem, options: PseudoOptions) -> UnitResult:
    """One image -> one pseudo-video sample, or the reason it was skipped. Never raises for bad input."""
    image = _open_input(item)
    if isinstance(image, UnitResult):
        return image
    size = short_side_size(*image.size, options.size)
    camera = draw_path(item.source, options.seed, min_scale=options.min_scale)
    frames = render(image, camera, frames=options.frames, size=size)
    meta = {
        "source": item.source,
        "start_frame": 0,
        "num_frames": options.frames,
        "fps": options.fps,
        "width": size[0],
        "height": size[1],
        "source_width": image.size[0],
        "source_height": image.size[1],
        "pseudo_video": True,
        "camera": camera.as_json(),
    }
    if item.extra:
        meta["extra"] = item.extra
    files = {
        "mp4": encode_mp4(frames, Fraction(options.fps).limit_denominator(1001)),
        "txt": item.caption.encode("utf-8"),
        "json": json.dumps(meta, sort_keys=True).encode(),
    }
    warnings = [item.caption_issue] if item.caption_issue else []
    return UnitResult(samples=[(sample_key(item.source, 0), files)], warnings=warnings, frames=options.frames)


STILL_JPEG_QUALITY = 95
"""JPEG quality of the images `process_still` writes."""


def process_still(item: InputItem, options: PseudoOptions) -> UnitResult:
    """One image -> one plain image sample (jpg resized to the short side `options.size`, caption,
    json), or the reason it was skipped. Never raises for bad input."""
    image = _open_input(item)
    if isinstance(image, UnitResult):
        return image
    size = short_side_size(*image.size, options.size)
    encoded = io.BytesIO()
    image.resize(size, Image.Resampling.BICUBIC).save(encoded, format="JPEG", quality=STILL_JPEG_QUALITY)
    meta = {
        "source": item.source,
        "width": size[0],
        "height": size[1],
        "source_width": image.size[0],
        "source_height": image.size[1],
        "image": True,
    }
    if item.extra:
        meta["extra"] = item.extra
    files = {
        "jpg": encoded.getvalue(),
        "txt": item.caption.encode("utf-8"),
        "json": json.dumps(meta, sort_keys=True).encode(),
    }
    warnings = [item.caption_issue] if item.caption_issue else []
    return UnitResult(samples=[(sample_key(item.source, 0), files)], warnings=warnings, frames=1)
