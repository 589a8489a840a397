"""Shared fixtures: real media, fresh temporary run folders, one thread per test process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    import torch

    torch.set_num_threads(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that launches ranks or Slurm jobs is also `slow`, so that `-m "not slow"` is the
    fast lane: one process, no launches."""
    for item in items:
        if item.get_closest_marker("multirank") or item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def torch_linear_left_in_place():
    """No test may leave `torch.nn.functional.linear` replaced (ZeRO-3 does that process-wide, see
    `trainer.engine.restore_torch_linear`): later tests in this process would compute other bits."""
    import torch.nn.functional as F

    before = F.linear
    yield
    if F.linear is not before:
        replaced, F.linear = F.linear, before
        pytest.fail(f"the test left torch.nn.functional.linear replaced by {replaced!r}")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def media_dir() -> Path:
    """Real media installed by scripts/install_media.py (videos/ and images/ with captions)."""
    root = Path(os.environ.get("LVD_MEDIA", REPO / ".cache" / "media"))
    if not (root / "videos" / "bikes.mp4").is_file():
        subprocess.run([sys.executable, str(REPO / "scripts" / "install_media.py"), "--out", str(root)], check=True)
    return root


def run_lvd(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run the real `lvd` console entry point in a subprocess."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "lvd", *args], cwd=cwd or REPO, env=full_env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="session")
def video_shards(media_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Real clips from the bundled videos, 8 frames at 32 px, in several small shards (brace URL)."""
    out = tmp_path_factory.mktemp("video_shards")
    cmd = [sys.executable, "-m", "data_pipeline.shard_cli", "videos", "--input", str(media_dir / "videos"), "--out", str(out)]
    cmd += ["--clip-frames", "8", "--size", "32", "--shard-size-mb", "0.03"]
    subprocess.run(cmd, check=True, capture_output=True)
    shards = sorted(out.glob("*.tar"))
    assert len(shards) >= 4, shards
    first, last = shards[0].stem.rsplit("-", 1)[1], shards[-1].stem.rsplit("-", 1)[1]
    prefix = shards[0].stem.rsplit("-", 1)[0]
    return f"{out}/{prefix}-{{{first}..{last}}}.tar"
