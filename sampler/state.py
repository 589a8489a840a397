"""Per-unit state of a generation in `<out>.parts/`, written atomically, for resuming.

Each finished unit of work (a chunk, a keyframe clip, a gap, a refined chunk) is one safetensors
file holding its latents and whatever the next unit needs (VidRD's noise and guide trajectory,
LVDM's context clip, StreamingT2V's anchor). `params.json` holds the parameters that determine
the video; a run with different parameters refuses to reuse the folder.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

from common.files import atomic_write_json, replacing

PARAMS_FILE = "params.json"


class ParamsMismatch(ValueError):
    """The state folder was written by a command with other parameters."""


class PartsStore:
    """Named tensor dicts in one folder; `save` is atomic (common.files.replacing)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.computed = 0
        """Units computed (saved) by this process."""
        self.reused = 0
        """Units loaded from an earlier run by this process."""

    def check_params(self, params: dict[str, Any], *, write: bool) -> None:
        """Refuse a folder written with other `params`; write them (main rank) when new."""
        path = self.folder / PARAMS_FILE
        if path.is_file():
            stored = json.loads(path.read_text())
            if stored != params:
                differing = sorted(k for k in set(stored) | set(params) if stored.get(k) != params.get(k))
                raise ParamsMismatch(
                    f"{self.folder} holds the state of a different command (differing: {', '.join(differing)}); "
                    "rerun with the same parameters or delete the folder"
                )
        elif write:
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, params, sort_keys=True)

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.safetensors"

    def has(self, name: str) -> bool:
        return self.path(name).is_file()

    def load(self, name: str) -> dict[str, Tensor] | None:
        """The unit's tensors, or None if it has not finished."""
        if not self.has(name):
            return None
        self.reused += 1
        return load_file(str(self.path(name)))

    def wait_for(self, name: str, *, timeout: float, poll: float = 0.005) -> None:
        """Block until another rank has saved `name` (saves are atomic, so the file is whole)."""
        deadline = time.monotonic() + timeout
        while not self.has(name):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.path(name)} did not appear within {timeout:.0f} s")
            time.sleep(poll)

    def claim(self, name: str) -> bool:
        """True for the one process that claims `name` first: it creates `<name>.claim` with
        O_CREAT | O_EXCL, which is atomic on a local disk and on the shared file systems of a
        cluster (NFSv3+, Lustre, GPFS), so ranks on any node can hand out work this way."""
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            os.close(os.open(self.folder / f"{name}.claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
        return True

    def clear(self, pattern: str) -> None:
        """Delete the files matching `pattern` (claims, intermediate frames of a killed run)."""
        for path in self.folder.glob(pattern):
            path.unlink(missing_ok=True)

    def read(self, name: str) -> dict[str, Tensor]:
        """A unit another rank or stage finished (not counted as reuse)."""
        return load_file(str(self.path(name)))

    def save(self, name: str, tensors: dict[str, Tensor], *, unit: bool = True) -> None:
        """Write `name` atomically; `unit=False` for intermediate files that are not units of work."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path(name)
        with replacing(path, concurrent=True) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        self.computed += unit
