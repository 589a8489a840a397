"""The demo's data helpers: a deterministic train / held-out split of a shard folder, the real
clips of a shard folder as the trainer sees them (centre crop), and mp4 files of such clips.

The split keeps every `every`-th clip of each source video (by the clip number the sharder
wrote into the sample's json) out of training, so the held-out clips come from the same videos
but were never trained on.
"""

from __future__ import annotations

import json
import random
from fractions import Fraction
from pathlib import Path

import numpy as np

from common.files import atomic_write
from data_pipeline.stages import ClipShape, decode_clip, sample_meta
from data_pipeline.tario import iter_samples, tar_bytes
from data_pipeline.video_io import decode_mp4, encode_mp4
from sampler.video_io import Mp4Writer

MANIFEST = "manifest.json"


def shard_paths(folder: Path) -> list[Path]:
    """The shards a shard folder's manifest lists, in order."""
    manifest = json.loads((folder / MANIFEST).read_text())
    return [folder / entry["path"] for entry in manifest["shards"]]


def is_held_out(meta: dict[str, object], every: int) -> bool:
    """Every `every`-th clip of a source (clip numbers every-1, 2*every-1, ...) is held out."""
    return int(meta.get("clip", 0)) % every == every - 1


def split_shards(source: Path, train: Path, held_out: Path, every: int, num_shards: int = 2) -> dict[str, int]:
    """Write the samples of `source` into a training and a held-out shard folder, each with
    `num_shards` shards (one per rank) and its manifest (written last, so an existing manifest
    means the split is done)."""
    parts: dict[Path, list[tuple[str, dict[str, bytes]]]] = {train: [], held_out: []}
    for path in shard_paths(source):
        for sample in iter_samples(path):
            target = held_out if is_held_out(sample_meta(sample.files), every) else train
            parts[target].append((sample.key, sample.files))
    for folder, samples in parts.items():
        if not samples:
            raise ValueError(f"the split of {source} left {folder.name} without samples (every={every})")
    return {folder.name: write_shards(folder, samples, num_shards, split_of=str(source), every=every) for folder, samples in parts.items()}


def write_shards(folder: Path, samples: list[tuple[str, dict[str, bytes]]], num_shards: int, **info: object) -> int:
    """`samples` dealt round-robin into `num_shards` shards of `folder` plus its manifest
    (written last: an existing manifest means the folder is complete)."""
    if not samples:
        raise ValueError(f"{folder}: no samples to write")
    folder.mkdir(parents=True, exist_ok=True)
    count = max(1, min(num_shards, len(samples)))
    entries = []
    for number in range(count):
        part = samples[number::count]
        name = f"shard-{number:06d}.tar"
        atomic_write(folder / name, tar_bytes(part))
        entries.append({"path": name, "samples": len(part)})
    manifest = {"samples": len(samples), "shards": entries, **info}
    atomic_write(folder / MANIFEST, json.dumps(manifest, indent=1))
    return len(samples)


def crop_clips(clip: np.ndarray, size: int, count: int, rng: random.Random) -> list[np.ndarray]:
    """`count` random `size` x `size` windows of a (T, H, W, 3) clip, at the clip's own scale."""
    height, width = clip.shape[1:3]
    if height < size or width < size:
        raise ValueError(f"a {height}x{width} clip has no {size}x{size} window")
    crops = []
    for _ in range(count):
        top, left = rng.randint(0, height - size), rng.randint(0, width - size)
        crops.append(np.ascontiguousarray(clip[:, top : top + size, left : left + size]))
    return crops


def crop_shards(source: Path, out: Path, size: int, per_clip: int, num_shards: int = 4, seed: int = 0) -> int:
    """Shards of `per_clip` random `size`-pixel windows of every clip in `source`, without any
    resizing: a fully convolutional VAE trains on them at the pixel scale of the full clips,
    with a quarter of the work per step when `size` is half the clip size."""
    rng = random.Random(seed)
    samples = []
    for path in shard_paths(source):
        for sample in iter_samples(path):
            if "mp4" not in sample.files:
                continue
            clip = decode_mp4(sample.files["mp4"])
            meta = sample_meta(sample.files)
            fps = Fraction(str(meta.get("fps", 25))).limit_denominator(1001)
            for number, crop in enumerate(crop_clips(clip, size, per_clip, rng)):
                files = {"mp4": encode_mp4(list(crop), fps), "json": json.dumps({**meta, "crop": number}, sort_keys=True).encode()}
                if "txt" in sample.files:
                    files["txt"] = sample.files["txt"]
                samples.append((f"{sample.key}_c{number:02d}", files))
    return write_shards(out, samples, num_shards, crops_of=str(source), crop_size=size, per_clip=per_clip)


def cache_mean_latents(source: Path, vae_dir: Path, out: Path, frames: int, size: int) -> dict[str, object]:
    """Like `lvd shard latents`, but each clip's latent is the VAE posterior's mean (scaled and
    shifted as the VAE's `to_latents`), not one random sample of the posterior: with a VAE
    trained for a few minutes the posterior noise is still large, and a denoiser trained on
    the means learns the clips, not that noise."""
    import torch

    import model_zoo
    from data_pipeline.latents import shard_latents

    vae = model_zoo.from_pretrained(vae_dir).eval()

    @torch.no_grad()
    def encode(video: torch.Tensor) -> torch.Tensor:
        z = vae.encode(video.contiguous()).mode()
        return (z - vae.config.shift_factor) * vae.config.scale_factor

    shape = ClipShape(frames=frames, frame_stride=1, height=size, width=size)
    urls = [str(path) for path in shard_paths(source)]
    return shard_latents(urls, out, encode, None, shape=shape, shard_size_mb=0.05, batch_size=4, params={"command": "latents (posterior mean)", "vae": str(vae_dir), "frames": frames, "size": size})


def real_clips(folder: Path, frames: int, size: int, limit: int | None = None) -> tuple[np.ndarray, list[str]]:
    """(N, frames, size, size, 3) uint8 centre crops of a shard folder's clips and their captions."""
    shape = ClipShape(frames=frames, frame_stride=1, height=size, width=size)
    clips, captions = [], []
    for path in shard_paths(folder):
        for sample in iter_samples(path):
            clip = decode_clip(sample.files["mp4"], shape, None) if "mp4" in sample.files else None
            if clip is not None:
                clips.append(clip)
                captions.append(sample.files.get("txt", b"").decode("utf-8", "replace"))
            if limit is not None and len(clips) >= limit:
                return np.stack(clips), captions
    if not clips:
        raise ValueError(f"{folder}: no clip with {frames} frames")
    return np.stack(clips), captions


def write_mp4(path: Path, frames: np.ndarray, fps: int = 8) -> Path:
    """(T, H, W, 3) uint8 frames as an h264 mp4 (the sampler's writer)."""
    writer = Mp4Writer(path, fps)
    writer.write(frames)
    return writer.close()


def read_mp4(path: Path) -> np.ndarray:
    """All frames of an mp4 as (T, H, W, 3) uint8."""
    from metrics.frames import read_frames

    return np.stack(list(read_frames(path)))
