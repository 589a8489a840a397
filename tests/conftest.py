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
