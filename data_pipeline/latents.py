"""Latent cache: pixel shards -> shards of frozen-VAE latents (+ text embeddings).

The encoder is passed in by the caller (the CLI layer loads the exported VAE), so this package
never imports model_zoo. A latent sample keeps its key, caption and json and adds
`latents.npy` (c, t, h, w) and, with a text encoder, `text_emb.npy`. The loader reads them with
`DataConfig(latent=True)`; only the shard path and that flag change in the training config.

See docs/methods.md, 'Data: the latent cache'.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_pipeline.shard_writer import ShardJob, UnitResult
from data_pipeline.stages import ClipShape, decode_clip, sample_caption, sample_meta, to_unit_range
from data_pipeline.tario import iter_samples

VideoEncoder = Callable[[torch.Tensor], torch.Tensor]
TextEncoder = Callable[[list[str]], torch.Tensor]


def _npy(array: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array.detach().float().cpu().numpy(), allow_pickle=False)
    return buffer.getvalue()


class _ShardEncoder:
    def __init__(
        self, encode_video: VideoEncoder, encode_text: TextEncoder | None, shape: ClipShape, batch_size: int
    ) -> None:
        self.encode_video, self.encode_text, self.shape, self.batch_size = (
            encode_video,
            encode_text,
            shape,
            batch_size,
        )

    def _encode(
        self, batch: list[tuple[str, np.ndarray, str, dict[str, Any]]]
    ) -> list[tuple[str, dict[str, bytes]]]:
        with torch.no_grad():
            latents = self.encode_video(to_unit_range(np.stack([clip for _, clip, _, _ in batch])))
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
    encode_video: VideoEncoder,
    encode_text: TextEncoder | None,
    *,
    shape: ClipShape,
    shard_size_mb: float,
    batch_size: int,
    params: dict[str, Any],
) -> dict[str, Any]:
    """Encode every clip of `input_urls` (centre crop, start frame 0) and return the manifest.

    Resumable like every `lvd shard` job; `params` identifies the job in the manifest.
    """
    job = ShardJob(out_dir, params=params, shard_bytes=int(shard_size_mb * 2**20), labels=list(input_urls))
    return job.run(list(input_urls), _ShardEncoder(encode_video, encode_text, shape, batch_size), workers=1)
