"""Aspect and length buckets in training: real shards of three aspect ratios and two lengths,
one bucket per step agreed by the ranks, skipped clips counted, and a 2-rank ZeRO-2 run that
touches every bucket and resumes bit-identically after kill -9."""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import load_config
from data_pipeline.buckets import build_buckets, scheduled_bucket
from data_pipeline.config import DataConfig
from data_pipeline.loader import build_loader
from data_pipeline.video_io import encode_mp4
from trainer.checkpoint import read_rank_state
from trainer.config import TrainJobConfig
from trainer.monitor import read_metrics

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "tiny" / "unet3d_buckets.yaml"
SOURCES = {"wide": (64, 96), "square": (64, 64), "tall": (96, 64)}  # (height, width) of the videos
STEPS = 6
BUCKETS = "data.buckets=[8x32x48,8x32x32,4x48x32,4x32x32]"


def _video(height: int, width: int, seed: int) -> bytes:
    """16 frames of a smooth random pattern drifting right: real h264, decodable by the loader."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (height // 8, width // 8 + 16, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    return encode_mp4([np.ascontiguousarray(base[:, 2 * i : 2 * i + width]) for i in range(16)], Fraction(8))


def _shard(folder: Path, out: Path, clip_frames: int) -> None:
    cmd = [
        sys.executable,
        "-m",
        "data_pipeline.shard_cli",
        "videos",
        "--input",
        str(folder),
        "--out",
        str(out),
    ]
    cmd += ["--clip-frames", str(clip_frames), "--size", "32", "--shard-size-mb", "0.02"]
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def mixed_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Two shard sets ('::'): 8-frame clips and 4-frame clips, each of wide, square and tall videos."""
    root = tmp_path_factory.mktemp("mixed")
    videos = root / "videos"
    videos.mkdir()
    for number in range(4):
        for name, (height, width) in SOURCES.items():
            (videos / f"{name}{number}.mp4").write_bytes(_video(height, width, 10 * number + len(name)))
            (videos / f"{name}{number}.txt").write_text(f"a {name} pattern drifting right\n")
    _shard(videos, root / "long", 8)
    _shard(videos, root / "short", 4)
    return f"{root / 'long'}::{root / 'short'}"


def _cfg(shards: str, *overrides: str) -> TrainJobConfig:
    return load_config(TrainJobConfig, CONFIG, [f"data.shards={shards}", BUCKETS, *overrides])


def test_batch_sizes_keep_tokens_per_batch_near_the_reference():
    buckets = build_buckets(
        DataConfig(frames=8, height=32, width=32, buckets=("8x32x48", "4x32x32", "4x48x32:5")), 2
    )
    assert [bucket.batch_size for bucket in buckets] == [1, 4, 5]
    tokens = [b.batch_size * b.shape.frames * b.shape.height * b.shape.width for b in buckets[:2]]
    assert all(0.6 < count / (2 * 8 * 32 * 32) < 1.4 for count in tokens)


def test_every_round_of_batches_visits_every_bucket_in_a_seeded_order():
    rounds = [[scheduled_bucket(7, n, 4) for n in range(4 * r, 4 * r + 4)] for r in range(5)]
    assert all(sorted(order) == [0, 1, 2, 3] for order in rounds)
    assert len({tuple(order) for order in rounds}) > 1
    assert [scheduled_bucket(7, n, 4) for n in range(20)] == [o for order in rounds for o in order]


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_agree_on_each_batch_bucket_and_clips_fit_by_aspect(mixed_shards, workers):
    cfg = _cfg(mixed_shards, f"data.workers={workers}")
    buckets = build_buckets(cfg.data, cfg.train.micro_batch_size)
    shapes = []
    for rank in range(2):
        loader = build_loader(
            cfg.data, rank=rank, world_size=2, batch_size=2, seed=cfg.train.seed, tokenizer=None
        )
        batches = [next(loader) for _ in range(8)]
        shapes.append([tuple(batch["video"].shape) for batch in batches])
        for batch in batches:
            _, _, frames, height, width = batch["video"].shape
            for meta in batch["meta"]:  # the nearest aspect among the buckets the clip is long enough for
                fits = [b.shape for b in buckets if b.shape.frames <= meta["num_frames"]]
                distance = [abs(math.log(s.width / s.height * meta["height"] / meta["width"])) for s in fits]
                assert meta["num_frames"] >= frames and (height, width) == (
                    fits[np.argmin(distance)].height,
                    fits[np.argmin(distance)].width,
                )
    expected = [
        (b.batch_size, 3, b.shape.frames, b.shape.height, b.shape.width)
        for b in (buckets[scheduled_bucket(cfg.train.seed, n, len(buckets))] for n in range(8))
    ]
    assert shapes[0] == shapes[1] == expected
    assert len(set(expected)) == 4


def test_clips_too_short_for_every_bucket_are_counted_and_logged(mixed_shards, caplog):
    short = mixed_shards.split("::")[1]
    cfg = _cfg(f"{mixed_shards.split('::')[0]}::{short}", "data.buckets=[8x32x48,8x32x32]")
    loader = build_loader(cfg.data, rank=0, world_size=1, batch_size=2, seed=0, tokenizer=None)
    with caplog.at_level(logging.WARNING, logger="data_pipeline.loader"):
        for _ in range(6):
            next(loader)
    (reason, count), *_ = loader.skipped().items()
    assert "fewer frames than the 8-frame span" in reason and count > 0
    assert any(
        "skipped" in record.getMessage() and reason in record.getMessage() for record in caplog.records
    )
    state = loader.state_dict()
    again = build_loader(cfg.data, rank=0, world_size=1, batch_size=2, seed=0, tokenizer=None)
    again.load_state_dict(state)
    assert again.skipped() == loader.skipped()


def _cmd(run_dir: Path, shards: str) -> list[str]:
    return [
        sys.executable, "-m", "lvd", "train", "--nproc", "2", "--config", str(CONFIG), f"data.shards={shards}",
        f"run.dir={run_dir}", f"train.steps={STEPS}", "train.checkpoint_every=2", "run.log_every=1",
        "train.zero_stage=2", "train.warmup_steps=2", BUCKETS,
    ]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from trainer.engine import consolidated_state_dict

    return consolidated_state_dict(run_dir / "checkpoints" / f"step_{STEPS:08d}", "model")


@pytest.mark.multirank
def test_two_rank_zero2_run_touches_every_bucket_and_resumes_bit_identically(mixed_shards, tmp_path):
    reference = tmp_path / "reference"
    result = subprocess.run(
        _cmd(reference, mixed_shards), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = read_metrics(reference)
    assert sorted(records) == list(range(1, STEPS + 1))
    flops = read_rank_state(reference / "checkpoints", f"step_{STEPS:08d}", 0).counters.flops_by_shape
    cfg = _cfg(mixed_shards)
    buckets = build_buckets(cfg.data, cfg.train.micro_batch_size)
    assert {key.split("x", 2)[2] for key in flops} == {
        f"{b.shape.frames}x{b.shape.height}x{b.shape.width}" for b in buckets
    }
    assert len({records[step]["mfu"] for step in records}) > 1  # the MFU of each step's own shape

    interrupted = tmp_path / "interrupted"
    proc = subprocess.Popen(
        _cmd(interrupted, mixed_shards),
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        while (
            not (interrupted / "checkpoints" / "step_00000002" / "COMPLETE").exists()
            or len(read_metrics(interrupted)) < 3
        ):
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert (interrupted / "checkpoints" / "latest").read_text().strip() != f"step_{STEPS:08d}"
    result = subprocess.run(
        _cmd(interrupted, mixed_shards), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0 and "resumed from" in result.stdout, (
        result.stdout[-3000:] + result.stderr[-3000:]
    )
    resumed = read_metrics(interrupted)
    assert [resumed[step]["loss"] for step in range(1, STEPS + 1)] == [
        records[step]["loss"] for step in range(1, STEPS + 1)
    ]
    ours, theirs = _final_weights(interrupted), _final_weights(reference)
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)


def test_plan_of_buckets_takes_the_largest_memory_and_the_mean_step(capsys):
    import json

    from trainer.plan_cli import main as plan_main

    def planned(*overrides: str) -> dict:
        assert plan_main(["--config", str(CONFIG), "--json", *overrides]) == 0
        return json.loads(capsys.readouterr().out)

    mixed = planned()
    wide = planned(
        "data.buckets=[]", "data.frames=8", "data.height=32", "data.width=64", "train.micro_batch_size=1"
    )
    square = planned(
        "data.buckets=[]", "data.frames=8", "data.height=32", "data.width=40", "train.micro_batch_size=2"
    )
    assert mixed["step_flops"] == pytest.approx((wide["step_flops"] + square["step_flops"]) / 2)
    assert mixed["step_time_s"] == pytest.approx((wide["step_time_s"] + square["step_time_s"]) / 2)
    assert mixed["memory_gb"]["total"] == max(wide["memory_gb"]["total"], square["memory_gb"]["total"])
    assert mixed["step_flops"] not in (wide["step_flops"], square["step_flops"])
    assert any("data.buckets: 2 buckets" in line for line in mixed["assumptions"])
