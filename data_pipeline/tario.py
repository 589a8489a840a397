"""WebDataset tar shards: deterministic archive bytes and a reader that knows byte offsets.

A sample is a run of consecutive tar members sharing a key (the member name up to the first dot
of its base name), e.g. ``clip-00001.mp4``, ``clip-00001.txt``, ``clip-00001.json``. The reader
reports where each sample starts so the loader can resume reading a shard in the middle and can
re-read the samples held in a shuffle buffer (exact resume without replaying the stream).
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from data_pipeline.remote import ONCE, Retry, open_shard

BLOCK = 512


@dataclass(frozen=True, kw_only=True)
class TarSample:
    key: str
    """Sample key shared by its members."""
    files: dict[str, bytes]
    """Extension (e.g. 'mp4', 'latents.npy') -> payload bytes."""
    offset: int
    """Byte offset of the sample's first tar header in the shard."""
    end: int
    """Byte offset just past the sample's last member (where the next sample starts)."""


def split_key(name: str) -> tuple[str, str]:
    """'dir/clip-1.latents.npy' -> ('dir/clip-1', 'latents.npy') (WebDataset's key rule)."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext


def tar_bytes(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    """A USTAR archive of (key, {ext: bytes}) with fixed metadata, so equal input gives equal bytes."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for key, files in samples:
            for ext in sorted(files):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(files[ext])
                info.mtime, info.mode, info.uid, info.gid = 0, 0o644, 0, 0
                archive.addfile(info, io.BytesIO(files[ext]))
    return buffer.getvalue()


def _header_field(block: bytes, start: int, length: int) -> str:
    return block[start : start + length].split(b"\0", 1)[0].decode("utf-8", "replace")


def _parse_size(block: bytes) -> int:
    raw = block[124:136]
    if raw[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(raw[1:], "big")
    return int(raw.split(b"\0", 1)[0].strip() or b"0", 8)


def _pax_path(payload: bytes) -> str | None:
    for record in payload.decode("utf-8", "replace").splitlines():
        _, _, keyval = record.partition(" ")
        key, _, value = keyval.partition("=")
        if key == "path":
            return value
    return None


def iter_members(handle: BinaryIO, start: int = 0) -> Iterator[tuple[str, bytes, int, int]]:
    """Yield (name, payload, header_offset, end_offset) of regular files of a handle positioned at
    byte `start` of the archive.

    Understands USTAR, GNU long names ('L') and PAX path records ('x'); skips other entries.
    A truncated archive ends the iteration with an OSError naming the offset.
    """
    offset, long_name = start, None
    while True:
        header = handle.read(BLOCK)
        if not header or header == b"\0" * BLOCK:
            return
        if len(header) < BLOCK:
            raise OSError(f"truncated tar header at byte {offset}")
        size, kind = _parse_size(header), header[156:157]
        padded = (size + BLOCK - 1) // BLOCK * BLOCK
        payload = handle.read(padded)
        if len(payload) < padded:
            raise OSError(f"truncated tar member at byte {offset}")
        payload = payload[:size]
        member_offset, offset = offset, offset + BLOCK + padded
        if kind in (b"L", b"x"):
            long_name = payload.split(b"\0", 1)[0].decode() if kind == b"L" else _pax_path(payload)
            continue
        name = long_name or _ustar_name(header)
        long_name = None
        if kind in (b"0", b"\0", b"7"):
            yield name, payload, member_offset, offset


def _ustar_name(header: bytes) -> str:
    prefix, name = _header_field(header, 345, 155), _header_field(header, 0, 100)
    return f"{prefix}/{name}" if prefix else name


def iter_samples(path: str | Path, start: int = 0, retry: Retry = ONCE) -> Iterator[TarSample]:
    """Group consecutive members by key into samples, starting at byte `start` of the shard (a
    local path, or a remote URL re-opened up to `retry.attempts` times)."""
    with open_shard(str(path), start, retry) as handle:
        key, files, first = None, {}, start
        last_end = start
        for name, payload, member_offset, end in iter_members(handle, start):
            member_key, ext = split_key(name)
            if key is not None and member_key != key:
                yield TarSample(key=key, files=files, offset=first, end=member_offset)
                files, first = {}, member_offset
            key = member_key
            files[ext] = payload
            last_end = end
        if key is not None:
            yield TarSample(key=key, files=files, offset=first, end=last_end)


def read_sample(path: str | Path, offset: int, retry: Retry = ONCE) -> TarSample:
    """The one sample whose first header is at `offset`."""
    samples = iter_samples(path, offset, retry)
    sample = next(samples, None)
    samples.close()
    if sample is None:
        raise OSError(f"{path}: no sample at byte {offset}")
    return sample
