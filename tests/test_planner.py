"""`lvd plan`: meta-device counts, the ZeRO arithmetic checked against real engines, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.config import load_config
from trainer.config import TrainJobConfig
from trainer.plan import measure, static_bytes

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.multirank
def test_planner_matches_engine_memory_on_2_ranks(tmp_path):
    import torch

    out = tmp_path / "measured.json"
    script = REPO / "benchmarks" / "zero_memory.py"
    result = subprocess.run([sys.executable, str(script), "--out", str(out), "--precision", "fp32"], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])[0]["name"].startswith("zero3_vs_zero0")
    measured = json.loads(out.read_text())
    cfg = load_config(TrainJobConfig, REPO / "configs/tiny/unet3d.yaml")
    counts = measure(cfg, dtype=torch.float32)
    for stage in (0, 1, 2, 3):
        predicted = static_bytes(counts.trainable_params, counts.frozen_params, world=2, stage=stage, bf16=False)
        for rank_bytes in measured[str(stage)]:
            real = rank_bytes["model"] + rank_bytes["optimizer"]
            plan = predicted["params"] + predicted["optimizer"]
            assert abs(plan - real) / real <= 0.15, f"ZeRO-{stage}: planned {plan} B, engine holds {real} B"
    zero0 = sum(measured["0"][0].values())
    zero3 = sum(measured["3"][0].values())
    assert zero3 < zero0  # the exact ratio goes into the closing note


def test_meta_counts_of_a_1b_config():
    import torch

    cfg = load_config(TrainJobConfig, REPO / "configs/scale/unet3d-1b.yaml")
    counts = measure(cfg, dtype=torch.bfloat16)
    assert counts.trainable_params >= 1.0e9
    assert counts.frozen_params > 0.3e9  # LVDM VAE + ViT-H text tower
    assert counts.activation_bytes_per_sample_ckpt < counts.activation_bytes_per_sample
    assert counts.train_flops_per_sample > 1e12


def test_plan_cli_json_for_dit_1b_on_8x8_h100(capsys, monkeypatch):
    from lvd.cli import main

    monkeypatch.chdir(REPO)  # in-process through the entry point's main (a process start saved)
    code = main(["plan", "--config", "configs/scale/dit-1b.yaml", "--nodes", "8", "--gpus-per-node", "8", "--gpu", "h100", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    plan = json.loads(captured.out)
    assert plan["fits"] is True
    assert plan["trainable_params"] >= 1.0e9
    assert plan["max_micro_batch"] >= plan["micro_batch_size"]
    assert plan["memory_gb"]["total"] <= 80
    assert plan["step_time_s"] > 0 and plan["clips_per_s"] > 0 and plan["days_for_samples"] > 0
    for key in ("params", "grads", "optimizer", "activations_no_ckpt", "activations_ckpt", "buffers"):
        assert key in plan["memory_gb"]
