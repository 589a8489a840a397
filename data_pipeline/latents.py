"""Latent cache: pixel shards -> shards of frozen-VAE latents (+ text embeddings).

The encoders are passed in by the caller (the CLI layer loads them the way the trainer does), so
this package never imports model_zoo. A latent sample keeps its key, caption and json and adds
`latents.npy` (c, t, h, w) and, with a text encoder, `text_emb.npy` (L, D) plus, for an encoder
that masks its padded tokens (T5), `text_mask.npy` (L,). With buckets, each clip is resized and
cropped to the bucket the loader would give it (`choose_bucket`) before encoding, and its json
names the bucket. The embedding of the empty caption is written once beside the shards
(`null_caption.npz`), named with the text encoder's identity in the manifest: the loader puts it
in place of a caption it drops for classifier-free guidance, and the trainer refuses a cache
whose text encoder is not the run's. The loader reads the cache with `DataConfig(latent=True)`.

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

from common.files import atomic_write
from data_pipeline.buckets import Bucket, choose_bucket
from data_pipeline.remote import ONCE, is_remote, open_shard
from data_pipeline.shard_writer import MANIFEST, ShardJob, UnitResult
from data_pipeline.stages import ClipShape, decode_clip, sample_caption, sample_meta, to_unit_range
from data_pipeline.stream import expand_shard_sets
from data_pipeline.tario import iter_samples

VideoEncoder = Callable[[torch.Tensor], torch.Tensor]
"""Clips (B, 3, T, H, W) in [-1, 1] -> latents (B, c, t, h, w) that depend on the clips alone."""
TextEncoder = Callable[[list[str]], torch.Tensor]
"""Captions -> per-token embeddings (B, L, D)."""
NULL_CAPTION = "null_caption.npz"
"""File of a cache folder holding the text encoder's embedding of '' (`text_emb`, `text_mask`)."""


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


@dataclass(frozen=True)
class TextEmbedder:
    """A text encoder for the cache, with what identifies it in the manifest."""

    encode: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor | None]]
    """Captions -> (embeddings (B, L, D), token mask (B, L) of the real tokens, or None for an
    encoder that attends to every position)."""
    identity: dict[str, Any]
    """JSON-able description (source, class, widths) written into the manifest's 'text_encoder'."""


@dataclass(frozen=True)
class CachedText:
    """The text encoder record of a latent cache: who made its embeddings, and the empty caption's."""

    identity: dict[str, Any]
    """The manifest's 'text_encoder' entry."""
    null_emb: np.ndarray
    """(L, D) float32 embedding of the caption ''."""
    null_mask: np.ndarray | None
    """(L,) token mask of '' (encoders that mask padded tokens), else None."""
    where: str
    """The manifest it was read from."""


def clip_generator(seed: int, key: str) -> torch.Generator:
    """The generator of the posterior draw of the clip `key` in a job seeded `seed`."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def bucket_name(shape: ClipShape) -> str:
    """'FRAMESxHEIGHTxWIDTH' of a clip shape, as `data.buckets` writes it."""
    return f"{shape.frames}x{shape.height}x{shape.width}"


def _npy(array: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array.detach().float().cpu().numpy(), allow_pickle=False)
    return buffer.getvalue()


def _as_embedder(encode_text: TextEncoder | TextEmbedder | None) -> TextEmbedder | None:
    if encode_text is None or isinstance(encode_text, TextEmbedder):
        return encode_text
    return TextEmbedder(lambda captions: (encode_text(captions), None), {"source": "a text encoder callable"})


Pending = tuple[int, str, np.ndarray, str, dict[str, Any]]
"""(position in the shard, key, decoded clip (T, H, W, 3), caption, json) of a clip to encode."""


class _ShardEncoder:
    def __init__(
        self,
        encode_video: VideoEncoder | PosteriorEncoder,
        encode_text: TextEmbedder | None,
        buckets: list[Bucket],
        batch_size: int,
        seed: int | None,
    ) -> None:
        if isinstance(encode_video, PosteriorEncoder) and seed is None:
            raise ValueError("a PosteriorEncoder needs the seed of its draws")
        self.encode_video, self.encode_text, self.buckets = encode_video, encode_text, buckets
        self.batch_size, self.seed = batch_size, seed

    def _latents(self, keys: list[str], clips: list[np.ndarray]) -> torch.Tensor:
        video = to_unit_range(np.stack(clips))
        if isinstance(self.encode_video, PosteriorEncoder):
            return self.encode_video.encode(video, [clip_generator(self.seed, key) for key in keys])
        return self.encode_video(video)

    def _encode(self, batch: list[Pending], shape: ClipShape) -> list[tuple[int, str, dict[str, bytes]]]:
        """Encode one bucket's clips; (position, key, files) of each."""
        with torch.no_grad():
            latents = self._latents([key for _, key, _, _, _ in batch], [clip for _, _, clip, _, _ in batch])
            texts, masks = self.encode_text.encode([caption for *_, caption, _ in batch]) if self.encode_text else (None, None)
        out = []
        for number, (position, key, _, caption, meta) in enumerate(batch):
            files = {"latents.npy": _npy(latents[number]), "txt": caption.encode("utf-8")}
            if texts is not None:
                files["text_emb.npy"] = _npy(texts[number])
            if masks is not None:
                files["text_mask.npy"] = _npy(masks[number])
            meta = dict(
                meta,
                bucket=bucket_name(shape),
                latent_shape=list(latents[number].shape),
                clip_shape=[shape.frames, shape.height, shape.width],
            )
            files["json"] = json.dumps(meta, sort_keys=True).encode()
            out.append((position, key, files))
        return out

    def __call__(self, url: str) -> UnitResult:
        encoded: list[tuple[int, str, dict[str, bytes]]] = []
        warnings: list[str] = []
        waiting: list[list[Pending]] = [[] for _ in self.buckets]
        try:
            for position, sample in enumerate(iter_samples(url)):
                meta = sample_meta(sample.files)
                number = choose_bucket(self.buckets, meta)
                shape = self.buckets[number].shape
                clip = decode_clip(sample.files["mp4"], shape, None) if "mp4" in sample.files else None
                if clip is None:
                    warnings.append(f"{sample.key}: no mp4 or fewer than the {shape.span} frames of bucket {bucket_name(shape)}, not encoded")
                    continue
                waiting[number].append((position, sample.key, clip, sample_caption(sample.files), meta))
                if len(waiting[number]) == self.batch_size:
                    encoded += self._encode(waiting[number], shape)
                    waiting[number] = []
        except OSError as error:
            return UnitResult(skipped=f"unreadable shard: {error}")
        for number, batch in enumerate(waiting):
            if batch:
                encoded += self._encode(batch, self.buckets[number].shape)
        if not encoded:
            return UnitResult(skipped="no encodable clip in shard", warnings=warnings)
        samples = [(key, files) for _, key, files in sorted(encoded, key=lambda entry: entry[0])]
        frames = sum(json.loads(files["json"])["clip_shape"][0] for _, files in samples)
        return UnitResult(samples=samples, warnings=warnings, frames=frames)


def _write_null_caption(out_dir: Path, encode_text: TextEmbedder) -> dict[str, Any]:
    """Write the embedding of '' once; the manifest's 'text_encoder' entry."""
    with torch.no_grad():
        embedding, mask = encode_text.encode([""])
    arrays = {"text_emb": embedding[0].detach().float().cpu().numpy()}
    if mask is not None:
        arrays["text_mask"] = mask[0].detach().float().cpu().numpy()
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write(out_dir / NULL_CAPTION, buffer.getvalue())
    return encode_text.identity | {
        "null_caption": NULL_CAPTION,
        "embedding_shape": list(arrays["text_emb"].shape),
        "token_mask": mask is not None,
    }


def shard_latents(
    input_urls: list[str],
    out_dir: Path,
    encode_video: VideoEncoder | PosteriorEncoder,
    encode_text: TextEncoder | TextEmbedder | None,
    *,
    shape: ClipShape,
    shard_size_mb: float,
    batch_size: int,
    params: dict[str, Any],
    seed: int | None = None,
    buckets: list[Bucket] | None = None,
) -> dict[str, Any]:
    """Encode every clip of `input_urls` (centre crop, start frame 0) and return the manifest.

    Without `buckets` every clip is cut to `shape`; with them, to the shape of its bucket (the
    loader's rule, `choose_bucket`), and the manifest counts the clips of each ('buckets').
    Resumable like every `lvd shard` job; `params` identifies the job in the manifest. `seed`
    seeds the draws of a `PosteriorEncoder` (required with one, unused by a `VideoEncoder`).
    """
    embedder = _as_embedder(encode_text)
    buckets = buckets or [Bucket(shape=shape, batch_size=batch_size)]
    encoder = _ShardEncoder(encode_video, embedder, buckets, batch_size, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    extra = {"text_encoder": _write_null_caption(out_dir, embedder)} if embedder is not None else {}
    job = ShardJob(
        out_dir, params=params, shard_bytes=int(shard_size_mb * 2**20), labels=list(input_urls), extra=extra
    )
    return job.run(list(input_urls), encoder, workers=1)


def _read(url: str) -> bytes | None:
    """The bytes at a local path or a remote URL; None when there is nothing to read."""
    try:
        if not is_remote(url):
            return Path(url).read_bytes() if Path(url).is_file() else None
        with open_shard(url, 0, ONCE) as stream:
            return io.BufferedReader(stream).read()
    except OSError:
        return None


def _manifest_url(urls: list[str], pattern: str) -> str:
    """The manifest.json a shard set comes with: the one it names, or the one beside its shards."""
    if not is_remote(pattern) and Path(pattern).is_dir():
        return str(Path(pattern) / MANIFEST)
    if pattern.endswith(MANIFEST):
        return pattern
    return urls[0].rsplit("/", 1)[0] + "/" + MANIFEST if "/" in urls[0] else MANIFEST


def _cached_text_of_set(pattern: str) -> CachedText | None:
    urls = list(expand_shard_sets(pattern, ())[0].urls)
    where = _manifest_url(urls, pattern)
    payload = _read(where)
    if payload is None:
        return None
    identity = json.loads(payload).get("text_encoder")
    if not identity:
        return None
    null = _read(where.rsplit("/", 1)[0] + "/" + identity["null_caption"] if "/" in where else identity["null_caption"])
    if null is None:
        raise FileNotFoundError(f"{where}: names {identity['null_caption']}, which is missing (re-run lvd shard latents)")
    arrays = np.load(io.BytesIO(null), allow_pickle=False)
    mask = arrays["text_mask"] if "text_mask" in arrays.files else None
    return CachedText(identity=identity, null_emb=arrays["text_emb"], null_mask=mask, where=where)


def cached_text(shards: str) -> CachedText | None:
    """The text encoder record of the latent cache(s) `shards` names (`data.shards`), from the
    manifest beside the shards; None when no manifest records one. Shard sets mixed with '::'
    must come from one text encoder (an error naming both otherwise)."""
    found = [record for pattern in shards.split("::") if pattern.strip() for record in [_cached_text_of_set(pattern.strip())] if record]
    for other in found[1:]:
        same = other.null_emb.shape == found[0].null_emb.shape and np.allclose(other.null_emb, found[0].null_emb, rtol=1e-3, atol=1e-5)
        if not same:
            raise ValueError(
                f"data.shards: the latent caches {found[0].where} ({describe(found[0].identity)}) and "
                f"{other.where} ({describe(other.identity)}) hold text embeddings of different text encoders"
            )
    return found[0] if found else None


def describe(identity: dict[str, Any]) -> str:
    """A text encoder identity in a few words, for messages."""
    details = ", ".join(f"{key} {identity[key]}" for key in ("class", "embedding_shape") if key in identity)
    return f"{identity.get('source', 'an unnamed text encoder')}" + (f" ({details})" if details else "")
