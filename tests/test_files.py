"""common.files: an interrupted write leaves the previous file whole; a finished one replaces it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from common.files import atomic_write, atomic_write_json, replacing, replacing_folder

REPO = Path(__file__).resolve().parent.parent


def test_atomic_write_replaces_text_bytes_and_json(tmp_path):
    path = tmp_path / "f"
    atomic_write(path, "old\n")
    assert path.read_text() == "old\n"
    atomic_write(path, b"\x00new")
    assert path.read_bytes() == b"\x00new"
    atomic_write_json(path, {"b": 1, "a": [2]}, indent=1, sort_keys=True)
    assert path.read_text() == '{\n "a": [\n  2\n ],\n "b": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_an_exception_mid_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "state.json"
    atomic_write(path, "old")
    with pytest.raises(RuntimeError), replacing(path) as tmp:
        tmp.write_text("half of the ne")
        raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_process_killed_mid_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "weights.bin"
    atomic_write(path, b"old weights")
    child = (
        "import os, signal, sys\nfrom pathlib import Path\nfrom common.files import replacing\n"
        "with replacing(Path(sys.argv[1])) as tmp:\n"
        "    with open(tmp, 'wb') as handle:\n"
        "        handle.write(b'new wei')\n"
        "        handle.flush()\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", child, str(path)], env=env, cwd=REPO, timeout=60)
    assert result.returncode == -signal.SIGKILL
    assert path.read_bytes() == b"old weights"
    assert (tmp_path / "weights.bin.tmp").read_bytes() == b"new wei"  # the killed write's leftover
    atomic_write(path, b"new weights")  # the next write of the same file takes its place
    assert path.read_bytes() == b"new weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.bin"]


def test_concurrent_writers_use_their_own_temporary_files(tmp_path):
    path = tmp_path / "unit.safetensors"
    with replacing(path, concurrent=True) as mine:
        assert mine.name == f"unit.safetensors.{os.getpid()}.tmp"
        mine.write_bytes(b"x")
    assert path.read_bytes() == b"x"


def test_replacing_folder_swaps_the_whole_folder_or_nothing(tmp_path):
    out = tmp_path / "export"
    with replacing_folder(out) as folder:
        (folder / "model_index.json").write_text(json.dumps({"task": "old"}))
    with pytest.raises(ValueError), replacing_folder(out) as folder:
        (folder / "model_index.json").write_text(json.dumps({"task": "new"}))
        raise ValueError("a component failed to load")
    assert json.loads((out / "model_index.json").read_text()) == {"task": "old"}
    with replacing_folder(out) as folder:
        (folder / "denoiser").mkdir()
    assert [p.name for p in out.iterdir()] == ["denoiser"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
