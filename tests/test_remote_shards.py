"""Remote shards: real tar shards served over HTTP by a local server, read through WebDataset's
handlers, with retries and a clear error on an unreachable shard; a resampled, multi-worker
2-rank training run over HTTP."""

from __future__ import annotations

import functools
import http.server
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.config import DataConfig
from data_pipeline.loader import build_loader
from trainer.monitor import read_metrics

REPO = Path(__file__).resolve().parent.parent


class _Server:
    """A `http.server` thread serving `folder`; `requests` lists the paths asked for."""

    def __init__(self, folder: Path) -> None:
        self.requests: list[str] = []
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
                server.requests.append(self.path)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(folder))
        )
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def served(video_shards: str) -> Iterator[tuple[str, _Server]]:
    """(local brace URL of the real shards, the server serving their folder)."""
    server = _Server(Path(video_shards).parent)
    yield video_shards, server
    server.httpd.shutdown()


def _http(local: str, server: _Server) -> str:
    return f"{server.url}/{Path(local).name}"


def _cfg(shards: str, **overrides: object) -> DataConfig:
    fields = dict(shards=shards, frames=8, height=32, width=32, p_uncond=0.0, shuffle_buffer=4)
    return DataConfig(**{**fields, **overrides})


def _take(loader, count: int) -> list[tuple[list[str], np.ndarray]]:
    return [
        ([meta["__key__"] for meta in batch["meta"]], batch["video"].numpy())
        for batch in (next(loader) for _ in range(count))
    ]


def _same(a: list[tuple[list[str], np.ndarray]], b: list[tuple[list[str], np.ndarray]]) -> bool:
    return all(ka == kb and np.array_equal(va, vb) for (ka, va), (kb, vb) in zip(a, b, strict=True))


def test_a_loader_over_http_yields_the_samples_of_the_local_shards_and_resumes(served):
    local, server = served
    remote = _http(local, server)
    expected = _take(build_loader(_cfg(local), rank=0, world_size=1, batch_size=2, seed=3, tokenizer=None), 6)
    loader = build_loader(_cfg(remote), rank=0, world_size=1, batch_size=2, seed=3, tokenizer=None)
    first = _take(loader, 3)
    state = loader.state_dict()
    resumed = build_loader(_cfg(remote), rank=0, world_size=1, batch_size=2, seed=3, tokenizer=None)
    resumed.load_state_dict(state)
    assert _same(first + _take(resumed, 3), expected)
    assert any(path.endswith(".tar") for path in server.requests)


def test_an_unreachable_shard_fails_after_the_retries_naming_the_url_and_reason(served):
    local, server = served
    missing = f"{server.url}/no-such-shard-{{000..001}}.tar"
    cfg = _cfg(missing, shard_retries=2, shard_retry_backoff=0.01)
    before = len(server.requests)
    loader = build_loader(cfg, rank=0, world_size=1, batch_size=2, seed=0, tokenizer=None)
    with pytest.raises(OSError, match=r"no-such-shard-00[01]\.tar: unreachable after 3 attempts: .*HTTP error"):
        next(loader)
    assert len(server.requests) - before == 3  # the first try and 2 retries

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}/clips-000000.tar"
    cfg = _cfg(closed, shard_retries=1, shard_retry_backoff=0.01)
    loader = build_loader(cfg, rank=0, world_size=1, batch_size=2, seed=0, tokenizer=None)
    with pytest.raises(OSError, match=rf"{closed}: unreachable after 2 attempts: could not connect"):
        next(loader)


def test_pipe_commands_are_shards_and_a_failing_command_is_retried(served, tmp_path):
    local, _ = served
    folder, name = Path(local).parent, Path(local).name
    piped = _take(build_loader(_cfg(f"pipe:cat {folder}/{name}"), rank=0, world_size=1, batch_size=2, seed=1, tokenizer=None), 2)
    assert _same(piped, _take(build_loader(_cfg(local), rank=0, world_size=1, batch_size=2, seed=1, tokenizer=None), 2))
    tries = tmp_path / "tries"
    cfg = _cfg(f"pipe:echo try >> {tries}; exit 3", shard_retries=3, shard_retry_backoff=0.0)
    with pytest.raises(OSError, match=r"pipe:echo .*unreachable after 4 attempts: .*status 3"):
        next(build_loader(cfg, rank=0, world_size=1, batch_size=2, seed=0, tokenizer=None))
    assert tries.read_text().split() == ["try"] * 4


@pytest.mark.multirank
def test_two_rank_multi_worker_resampled_training_over_http(served, tmp_path):
    local, server = served
    first, second = sorted(Path(local).parent.glob("*.tar"))[:2]
    shards = f"{server.url}/{{{first.name},{second.name}}}"  # 2 shards for 4 reader slots: resampled
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "lvd", "train", "--nproc", "2", "--config", str(REPO / "configs" / "tiny" / "unet3d.yaml"),
        f"data.shards={shards}", "data.workers=2", "data.height=32", "data.width=32", f"run.dir={run_dir}",
        "train.steps=3", "train.checkpoint_every=3", "run.log_every=1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(read_metrics(run_dir)) == [1, 2, 3]
    assert all(np.isfinite(record["loss"]) for record in read_metrics(run_dir).values())
    assert {f"/{first.name}", f"/{second.name}"} <= set(server.requests)
