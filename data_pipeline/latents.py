"""Latent cache: pixel shards -> shards of frozen-VAE latents (+ text embeddings).

The encoder is passed in by the caller (the CLI layer loads the exported VAE), so this package
never imports model_zoo. A latent sample keeps its key, caption and json and adds
`latents.npy` (c, t, h, w) and, with a text encoder, `text_emb.npy`. The loader reads them with
`DataConfig(latent=True)`; only the shard path and that flag change in the training config.

See docs/methods.md, 'Data: the latent cache'.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_pipeline.shard_writer import ShardJob, UnitResult
from data_pipeline.stages import ClipShape, decode_clip, sample_caption, sample_meta, to_unit_range
from data_pipeline.tario import iter_samples

VideoEncoder = Callable[[torch.Tensor], torch.Tensor]
"""Clips (B, 3, T, H, W) in [-1, 1] -> latents (B, c, t, h, w) that depend on the clips alone."""
TextEncoder = Callable[[list[str]], torch.Tensor]


@dataclass(frozen=True)
class PosteriorEncoder:
    """A video encoder whose latents are a random draw, such as a VAE's posterior sample.

    `shard_latents` hands it one generator per clip, seeded from the job's seed and the clip's
    key (`clip_generator`), so a clip's latents do not depend on the batch it is encoded in, on
    what was encoded before it, or on whether the job was interrupted and resumed.
    """

    encode: Callable[[torch.Tensor, list[torch.Generator]], torch.Tensor]
    """(clips (B, 3, T, H, W) in [-1, 1], B generators) -> latents (B, c, t, h, w); clip i's draw
    uses the i-th generator only."""


def clip_generator(seed: int, key: str) -> torch.Generator:
    """The generator of the posterior draw of the clip `key` in a job seeded `seed`."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _npy(array: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array.detach().float().cpu().numpy(), allow_pickle=False)
    return buffer.getvalue()


class _ShardEncoder:
    def __init__(
        self,
        encode_video: VideoEncoder | PosteriorEncoder,
        encode_text: TextEncoder | None,
        shape: ClipShape,
        batch_size: int,
        seed: int | None,
    ) -> None:
        if isinstance(encode_video, PosteriorEncoder) and seed is None:
            raise ValueError("a PosteriorEncoder needs the seed of its draws")
        self.encode_video, self.encode_text, self.shape = encode_video, encode_text, shape
        self.batch_size, self.seed = batch_size, seed

    def _latents(self, keys: list[str], clips: list[np.ndarray]) -> torch.Tensor:
        video = to_unit_range(np.stack(clips))
        if isinstance(self.encode_video, PosteriorEncoder):
            return self.encode_video.encode(video, [clip_generator(self.seed, key) for key in keys])
        return self.encode_video(video)

    def _encode(
        self, batch: list[tuple[str, np.ndarray, str, dict[str, Any]]]
    ) -> list[tuple[str, dict[str, bytes]]]:
        with torch.no_grad():
            latents = self._latents([key for key, _, _, _ in batch], [clip for _, clip, _, _ in batch])
            texts = self.encode_text([caption for _, _, caption, _ in batch]) if self.encode_text else None
        out = []
        for number, (key, _, caption, meta) in enumerate(batch):
            files = {"latents.npy": _npy(latents[number]), "txt": caption.encode("utf-8")}
            if texts is not None:
                files["text_emb.npy"] = _npy(texts[number])
            meta = dict(
                meta,
                latent_shape=list(latents[number].shape),
                clip_shape=[self.shape.frames, self.shape.height, self.shape.width],
            )
            files["json"] = json.dumps(meta, sort_keys=True).encode()
            out.append((key, files))
        return out

    def __call__(self, url: str) -> UnitResult:
        samples, warnings, batch = [], [], []
        try:
            for sample in iter_samples(url):
                clip = decode_clip(sample.files["mp4"], self.shape, None) if "mp4" in sample.files else None
                if clip is None:
                    warnings.append(
                        f"{sample.key}: no mp4 or fewer than {self.shape.span} frames, not encoded"
                    )
                    continue
                batch.append((sample.key, clip, sample_caption(sample.files), sample_meta(sample.files)))
                if len(batch) == self.batch_size:
                    samples += self._encode(batch)
                    batch = []
        except OSError as error:
            return UnitResult(skipped=f"unreadable shard: {error}")
        if batch:
            samples += self._encode(batch)
        if not samples:
            return UnitResult(skipped="no encodable clip in shard", warnings=warnings)
        return UnitResult(samples=samples, warnings=warnings, frames=len(samples) * self.shape.frames)


def shard_latents(
    input_urls: list[str],
    out_dir: Path,
    encode_video: VideoEncoder | PosteriorEncoder,
    encode_text: TextEncoder | None,
    *,
    shape: ClipShape,
    shard_size_mb: float,
    batch_size: int,
    params: dict[str, Any],
    seed: int | None = None,
) -> dict[str, Any]:
    """Encode every clip of `input_urls` (centre crop, start frame 0) and return the manifest.

    Resumable like every `lvd shard` job; `params` identifies the job in the manifest. `seed`
    seeds the draws of a `PosteriorEncoder` (required with one, unused by a `VideoEncoder`).
    """
    encoder = _ShardEncoder(encode_video, encode_text, shape, batch_size, seed)
    job = ShardJob(out_dir, params=params, shard_bytes=int(shard_size_mb * 2**20), labels=list(input_urls))
    return job.run(list(input_urls), encoder, workers=1)
