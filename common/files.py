"""Atomic writes: a reader, or a run resumed after a crash, finds the old file or the whole new one.

The new content goes to a temporary file in the same folder (so the final rename stays on one
file system), which is flushed to disk before `os.replace` moves it onto the target; the folder is
then synced so that the rename itself survives a power loss. If writing fails, the temporary file
is removed and the target is untouched; if the process is killed, the temporary file stays behind
and the next write of the same target overwrites it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_path(path: Path, *, concurrent: bool = False) -> Path:
    """Where the new content of `path` is written: `<name>.tmp`, or `<name>.<pid>.tmp` when
    several processes may write the same file at once."""
    return path.with_name(f"{path.name}.{os.getpid()}.tmp" if concurrent else f"{path.name}.tmp")


def move_into_place(tmp: Path, path: Path) -> None:
    """Flush the finished temporary file `tmp` to disk and rename it onto `path` (for writers
    that stream into `temporary_path(path)` over many calls, such as a video encoder)."""
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)


@contextmanager
def replacing(path: str | os.PathLike[str], *, concurrent: bool = False) -> Iterator[Path]:
    """Yield a temporary path for the caller to write the new content of `path` to (with any
    writer that takes a file name: `torch.save`, `safetensors.torch.save_file`); on leaving the
    block the temporary file replaces `path` atomically. `concurrent=True` when several processes
    may write the same file at once (each then writes its own temporary file)."""
    target = Path(path)
    tmp = temporary_path(target, concurrent=concurrent)
    try:
        yield tmp
        move_into_place(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike[str], content: str | bytes, *, concurrent: bool = False) -> None:
    """Replace `path` with `content` (text is written as UTF-8) atomically."""
    payload = content.encode("utf-8") if isinstance(content, str) else content
    with replacing(path, concurrent=concurrent) as tmp:
        tmp.write_bytes(payload)


def atomic_write_json(
    path: str | os.PathLike[str], value: Any, *, indent: int = 2, sort_keys: bool = False, concurrent: bool = False
) -> None:
    """Replace `path` with `value` as indented JSON and a final newline, atomically."""
    atomic_write(path, json.dumps(value, indent=indent, sort_keys=sort_keys) + "\n", concurrent=concurrent)


@contextmanager
def replacing_folder(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path` to fill; on leaving the block it takes the
    place of `path` (a folder already there is removed first). If the block raises, `path` is
    untouched and the temporary folder is removed."""
    target = Path(path)
    tmp = temporary_path(target)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
