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


def _run(run_dir: Path, shards: str, *extra: str, nproc: int, common: list[str] = COMMON) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "lvd", "train", "--nproc", str(nproc), *common, f"data.shards={shards}", f"run.dir={run_dir}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "LVD_TRACE_SAMPLES": str(run_dir / "trace.jsonl")}
    run_dir.mkdir(parents=True, exist_ok=True)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _keys_by_step(run_dir: Path) -> dict[int, list[str]]:
    """The sample keys each step trained on, over all ranks and micro-batches (sorted), counted
    once per sequence-parallel group: the second rank of a group (sp 2) trained on the same."""
    steps: dict[int, list[str]] = {}
    followers: dict[int, list[str]] = {}
    for line in (run_dir / "trace.jsonl").read_text().splitlines():
        record = json.loads(line)
        into = steps if record.get("sp_rank", 0) == 0 else followers
        into.setdefault(record["step"], []).extend(record["keys"])
    keys = {step: sorted(keys) for step, keys in sorted(steps.items())}
    for step, theirs in followers.items():
        assert sorted(theirs) == keys[step], step
    return keys


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


def _final_weights(run_dir: Path, steps: int = STEPS) -> dict[str, torch.Tensor]:
    from trainer.engine import consolidated_state_dict

    return consolidated_state_dict(run_dir / "checkpoints" / f"step_{steps:08d}", "model")


def _assert_continues(resumed: Path, reference: Path, steps: int = STEPS) -> None:
    assert _keys_by_step(resumed) == _keys_by_step(reference)  # no sample repeated, skipped or moved
    ours, theirs = read_metrics(resumed), read_metrics(reference)
    assert sorted(ours) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert ours[step]["lr"] == pytest.approx(theirs[step]["lr"], rel=1e-9), step
        assert ours[step]["loss"] == pytest.approx(theirs[step]["loss"], rel=LOSS_RTOL), step
    mine, want = _final_weights(resumed, steps), _final_weights(reference, steps)
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


# Sequence parallelism: the ranks of an SP group share one data rank, so a run's data ranks are its
# data-parallel groups. The tiny DiT at 5 frames of 24x40 px: 45 tokens, odd for SP 2 (padded).
SP_STEPS, SP_CUT = 4, 2
SP_COMMON = [
    "--config", "configs/tiny/dit.yaml",
    "data.frames=5", "data.height=24", "data.width=40", "train.micro_batch_size=1", "train.warmup_steps=2",
    f"train.steps={SP_STEPS}", f"train.checkpoint_every={SP_CUT}", "run.log_every=1", "run.progress=quiet",
    "train.ema_decay=0.9", "train.zero_stage=2",
]  # fmt: skip


def _sp_run(run_dir: Path, shards: str, *extra: str, nproc: int) -> subprocess.CompletedProcess[str]:
    result = _run(run_dir, shards, *extra, nproc=nproc, common=SP_COMMON)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def sp_one_rank(tmp_path_factory: pytest.TempPathFactory, video_shards: str) -> Path:
    run_dir = tmp_path_factory.mktemp("sp_one_rank") / "run"
    _sp_run(run_dir, video_shards, nproc=1)
    return run_dir


def test_sp2_run_resumes_on_one_rank_and_back(sp_one_rank, tmp_path, video_shards):
    """2 ranks x sp_size=2 (1 data rank) -> 1 rank, and 1 rank -> 2 ranks x sp_size=2: the samples,
    losses and weights of the uninterrupted runs (which equal each other to fp32 rounding)."""
    sp_two = tmp_path / "sp_two"
    _sp_run(sp_two, video_shards, "train.sp_size=2", nproc=2)
    assert json.loads((sp_two / "checkpoints" / f"step_{SP_CUT:08d}" / "meta.json").read_text())["data_ranks"] == 1

    run_dir = _cut(sp_two, tmp_path / "to_one", SP_CUT)
    result = _sp_run(run_dir, video_shards, nproc=1)
    assert "written by 2 rank(s) at ZeRO-2, this run has 1" in result.stderr
    _assert_continues(run_dir, sp_two, SP_STEPS)

    run_dir = _cut(sp_one_rank, tmp_path / "to_two", SP_CUT)
    result = _sp_run(run_dir, video_shards, "train.sp_size=2", nproc=2)
    assert "written by 1 rank(s) at ZeRO-2, this run has 2" in result.stderr
    _assert_continues(run_dir, sp_one_rank, SP_STEPS)
    _assert_continues(sp_two, sp_one_rank, SP_STEPS)  # SP 2 itself is the one-rank run


@pytest.mark.extended  # two more 2-rank runs; the hosting of several data ranks is covered by test_two_ranks_resume_on_one
def test_two_data_ranks_resume_in_one_sp_group(tmp_path, video_shards):
    """2 ranks x sp_size=1 (2 data ranks) -> 2 ranks x sp_size=2 (1 DP group): the group hosts both
    data ranks, each rank runs 2 accumulation steps of its half of the tokens."""
    reference = tmp_path / "dp_two"
    _sp_run(reference, video_shards, nproc=2)
    run_dir = _cut(reference, tmp_path / "run", SP_CUT)
    result = _sp_run(run_dir, video_shards, "train.sp_size=2", nproc=2)
    assert "the run's 2 data rank(s) on 1 data-parallel group(s) of train.sp_size=2 rank(s), 2 micro-batch(es) a step" in result.stderr
    _assert_continues(run_dir, reference, SP_STEPS)
    steps = [json.loads(line) for line in (run_dir / "trace.jsonl").read_text().splitlines()]
    resumed = [(r["sp_rank"], r["data_rank"]) for r in steps if r["step"] == SP_STEPS]
    assert sorted(resumed) == [(0, 0), (0, 1), (1, 0), (1, 1)]
