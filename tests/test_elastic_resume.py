"""Elastic resume: a checkpoint written at one layout (world size, ZeRO stage) resumes at another
with the same samples, the same weights and Adam moments, and losses within rounding of the
uninterrupted run. Real `lvd train --nproc N` runs on real shards (gloo, fp32)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer.monitor import read_metrics

pytestmark = pytest.mark.multirank
REPO = Path(__file__).resolve().parent.parent
STEPS, CUT = 8, 4
COMMON = [
    "--config", "configs/tiny/unet3d.yaml",
    "data.height=32", "data.width=32", "train.micro_batch_size=1", "train.warmup_steps=2",
    f"train.steps={STEPS}", f"train.checkpoint_every={CUT}", "run.log_every=1", "run.progress=quiet",
    "train.ema_decay=0.9",
]
# Losses and weights after an elastic resume differ from the uninterrupted run only in the order
# of floating-point sums (gradient all-reduce vs local accumulation): fp32 rounding, amplified a
# little by four Adam steps. A lost moment or a shifted sample moves them by 1e-2 or more.
LOSS_RTOL = 1e-4
WEIGHT_ATOL = 1e-5


def _run(run_dir: Path, shards: str, *extra: str, nproc: int) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "lvd", "train", "--nproc", str(nproc), *COMMON, f"data.shards={shards}", f"run.dir={run_dir}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "LVD_TRACE_SAMPLES": str(run_dir / "trace.jsonl")}
    run_dir.mkdir(parents=True, exist_ok=True)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _keys_by_step(run_dir: Path) -> dict[int, list[str]]:
    """The sample keys each step trained on, over all ranks and micro-batches (sorted)."""
    steps: dict[int, list[str]] = {}
    for line in (run_dir / "trace.jsonl").read_text().splitlines():
        record = json.loads(line)
        steps.setdefault(record["step"], []).extend(record["keys"])
    return {step: sorted(keys) for step, keys in sorted(steps.items())}


def _cut(run_dir: Path, dest: Path, step: int) -> Path:
    """A copy of a finished run folder as it was right after the checkpoint of `step`."""
    shutil.copytree(run_dir, dest)
    ckpt = dest / "checkpoints"
    for path in ckpt.glob("step_*"):
        if int(path.name.removeprefix("step_")) > step:
            shutil.rmtree(path)
    (ckpt / "latest").write_text(f"step_{step:08d}\n")
    for name in ("metrics.jsonl", "trace.jsonl"):
        lines = (dest / name).read_text().splitlines()
        (dest / name).write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= step))
    return dest


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from trainer.engine import consolidated_state_dict

    return consolidated_state_dict(run_dir / "checkpoints" / f"step_{STEPS:08d}", "model")


def _assert_continues(resumed: Path, reference: Path) -> None:
    assert _keys_by_step(resumed) == _keys_by_step(reference)  # no sample repeated, skipped or moved
    ours, theirs = read_metrics(resumed), read_metrics(reference)
    assert sorted(ours) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert ours[step]["lr"] == pytest.approx(theirs[step]["lr"], rel=1e-9), step
        assert ours[step]["loss"] == pytest.approx(theirs[step]["loss"], rel=LOSS_RTOL), step
    mine, want = _final_weights(resumed), _final_weights(reference)
    assert mine.keys() == want.keys()
    worst = max((mine[name] - want[name]).abs().max().item() for name in mine)
    assert worst < WEIGHT_ATOL, worst


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory: pytest.TempPathFactory, video_shards: str) -> Path:
    run_dir = tmp_path_factory.mktemp("two_ranks") / "run"
    result = _run(run_dir, video_shards, "train.zero_stage=2", nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_two_ranks_resume_on_one(two_rank_run, tmp_path, video_shards):
    run_dir = _cut(two_rank_run, tmp_path / "run", CUT)
    result = _run(run_dir, video_shards, "train.zero_stage=2", nproc=1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "elastic resume" in result.stderr and "written by 2 rank(s) at ZeRO-2" in result.stderr
    _assert_continues(run_dir, two_rank_run)


@pytest.mark.extended  # two more runs (about a minute on 2 free cores): out of the default suite's budget
def test_one_rank_resumes_on_two(tmp_path, video_shards):
    """1 rank x 2 accumulation steps, resumed on 2 ranks that share the one data rank: each reads
    all its batches and keeps every other one; same samples, same noise."""
    reference = tmp_path / "one_rank"
    result = _run(reference, video_shards, "train.zero_stage=1", "train.grad_accum=2", nproc=1)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = _cut(reference, tmp_path / "run", CUT)
    result = _run(run_dir, video_shards, "train.zero_stage=1", "train.grad_accum=2", nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_continues(run_dir, reference)


@pytest.mark.parametrize("stage", [3, 0])
def test_zero_stage_change_keeps_weights_and_moments(two_rank_run, tmp_path, video_shards, stage):
    """The 2-rank ZeRO-2 checkpoint loaded into a 1-rank engine of ZeRO-3 / no ZeRO holds the same
    fp32 weights, Adam moments and step, the same EMA; the data ranks keep their positions."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from common.config import load_config
    from trainer.config import TrainJobConfig
    from trainer.engine import (
        gathered_parameters,
        init_distributed,
        leave_distributed,
        read_layout_free,
        restore_torch_linear,
    )
    from trainer.session import build, save

    run_dir = _cut(two_rank_run, tmp_path / "run", CUT)
    overrides = [c for c in COMMON if "=" in c] + [f"data.shards={video_shards}", f"run.dir={run_dir}", f"train.zero_stage={stage}"]
    cfg = load_config(TrainJobConfig, REPO / "configs/tiny/unet3d.yaml", overrides)
    session = build(cfg, init_distributed())
    try:
        engine = session.engines["model"]
        names = [name for name, p in engine.module.named_parameters() if p.requires_grad]
        saved = read_layout_free(run_dir / "checkpoints" / f"step_{CUT:08d}" / "model", names)
        assert saved["step"] == CUT and session.counters.step == CUT
        for name, p in engine.module.named_parameters():
            if stage == 0:
                weight, moments = p.data, engine.optimizer.state[p]
            else:
                weight = safe_get_full_fp32_param(p)
                moments = {key: safe_get_full_optimizer_state(p, key) for key in ("exp_avg", "exp_avg_sq")}
            assert torch.equal(weight, saved["weights"][name]), name
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(moments[key], saved[key][name]), (name, key)
        with gathered_parameters(engine.module, enabled=stage == 3):  # the working copies too
            for name, p in engine.module.named_parameters():
                assert torch.equal(p.data, saved["weights"][name]), name
        assert engine.lr_scheduler.last_batch_iteration == saved["lr_scheduler"]["last_batch_iteration"]
        # The moments are those of the run, not zeros (some parameters get no gradient yet).
        assert sum(bool(saved["exp_avg_sq"][name].abs().sum() > 0) for name in names) > len(names) // 2
        # The ZeRO-2 checkpoint's weights as DeepSpeed's own zero_to_fp32 reads them.
        from trainer.engine import consolidated_state_dict

        reference = consolidated_state_dict(run_dir / "checkpoints" / f"step_{CUT:08d}", "model")
        assert all(torch.equal(saved["weights"][name], reference[name]) for name in names)
        assert sorted(session.loaders) == [0, 1] and session.layout.accum == 2
        assert [loader.batches for loader in session.loaders.values()] == [CUT, CUT]
        from trainer import checkpoint
        from trainer.ema import assemble

        old_ema = assemble([state.ema for state in checkpoint.read_rank_states(run_dir / "checkpoints", f"step_{CUT:08d}", 2)])
        for name in names:
            assert torch.equal(session.ema.shadow[name].flatten()[: old_ema[name].numel()], old_ema[name].flatten()), name
        # Saved again at this stage, the checkpoint reads back to the same tensors (the reader of
        # ZeRO-3 / ZeRO-0 files).
        save(session)
        again = read_layout_free(run_dir / "checkpoints" / f"step_{CUT:08d}" / "model", names)
        for key in ("weights", "exp_avg", "exp_avg_sq"):
            assert all(torch.equal(again[key][name], saved[key][name]) for name in names), key
        assert again["step"] == saved["step"]
    finally:
        leave_distributed()
        restore_torch_linear()


def test_a_layout_that_cannot_be_honoured_stops_with_one_line(two_rank_run, tmp_path, video_shards):
    """2 data ranks x 1 micro-batch cannot spread over 4 ranks: one clear line, exit 1, before any
    engine is built."""
    run_dir = _cut(two_rank_run, tmp_path / "run", CUT)
    from common.config import load_config
    from trainer.config import TrainJobConfig
    from trainer.engine import DistInfo
    from trainer.session import TrainingError, build

    overrides = [c for c in COMMON if "=" in c] + [f"data.shards={video_shards}", f"run.dir={run_dir}"]
    cfg = load_config(TrainJobConfig, REPO / "configs/tiny/unet3d.yaml", overrides)
    info = DistInfo(rank=0, world_size=4, local_rank=0, device=torch.device("cpu"), backend="gloo")
    with pytest.raises(TrainingError, match=r"2 data ranks x train.grad_accum=1 .* 4 ranks would need grad_accum divisible by 2"):
        build(cfg, info)
    info = DistInfo(rank=0, world_size=3, local_rank=0, device=torch.device("cpu"), backend="gloo")
    with pytest.raises(TrainingError, match=r"2 data ranks; 3 ranks cannot share them evenly"):
        build(cfg, info)


def test_data_layout_spreads_every_micro_batch_once():
    from trainer.data_ranks import DataLayout

    for data_ranks, world, accum in [(2, 1, 1), (2, 2, 1), (1, 2, 2), (4, 2, 3), (2, 4, 2)]:
        seen = []
        for rank in range(world):
            layout = DataLayout(data_ranks=data_ranks, world_size=world, rank=rank, grad_accum=accum)
            kept = [(d, j) for d, j, keep in layout.schedule() if keep]
            assert len(kept) == layout.accum
            seen += kept
        assert sorted(seen) == [(d, j) for d in range(data_ranks) for j in range(accum)]
