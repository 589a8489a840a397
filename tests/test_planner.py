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


def _plan(capsys, monkeypatch, *argv: str) -> tuple[int, str, str]:
    from lvd.cli import main

    monkeypatch.chdir(REPO)  # in-process through the entry point's main (a process start saved)
    code = main(["plan", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_plan_cli_json_for_dit_1b_on_8x8_h100_picks_sp_1(capsys, monkeypatch):
    """dit/1b's micro-batch fits without sequence parallelism: `lvd plan` (train.sp_size not set)
    compares the valid Ulysses degrees and picks 1; the JSON carries the candidates."""
    code, out, err = _plan(capsys, monkeypatch, "--config", "configs/scale/dit-1b.yaml", "--nodes", "8", "--gpus-per-node", "8", "--gpu", "h100", "--json")
    assert code == 0, err[-2000:]
    plan = json.loads(out)
    assert plan["fits"] is True
    assert plan["trainable_params"] >= 1.0e9
    assert plan["max_micro_batch"] >= plan["micro_batch_size"]
    assert plan["memory_gb"]["total"] <= 80
    assert plan["step_time_s"] > 0 and plan["clips_per_s"] > 0 and plan["days_for_samples"] > 0
    for key in ("params", "grads", "optimizer", "activations_no_ckpt", "activations_ckpt", "buffers"):
        assert key in plan["memory_gb"]
    choice = plan["sp_choice"]
    assert (choice["chosen"], choice["rule"], plan["sp_size"]) == (1, "auto", 1)
    candidates = {c["sp_size"]: c for c in choice["candidates"]}
    assert sorted(candidates) == [1, 2, 4, 8]  # the divisors of 8 GPUs per node; dit/1b's 16 heads take all
    assert all(c["valid"] for c in candidates.values())
    assert candidates[1]["memory_gb"] == plan["memory_gb"]["total"] and candidates[1]["fits"]
    memory = [candidates[sp]["memory_gb"] for sp in (1, 2, 4, 8)]
    assert memory == sorted(memory, reverse=True)  # activations per rank shrink with the degree
    assert candidates[1]["all_to_all_gb_per_step"] == 0 < candidates[2]["all_to_all_gb_per_step"]


def test_plan_picks_the_smallest_sp_at_which_the_121_frame_5b_fits(capsys, monkeypatch):
    """video_dit/5b on 121 frames at 720x1280 (111,600 tokens): micro-batch 2 does not fit at SP 1,
    so `lvd plan` picks the smallest Ulysses degree whose per-rank memory is within the budget."""
    code, out, err = _plan(capsys, monkeypatch, "--config", "configs/scale/video-dit-5b-121f.yaml", "--nodes", "16", "--gpus-per-node", "8", "--gpu", "h100", "--json", "--sp", "auto")
    assert code == 0, err[-2000:]
    plan = json.loads(out)
    choice = plan["sp_choice"]
    valid = sorted(c["sp_size"] for c in choice["candidates"] if c["valid"])
    assert valid == [1, 2, 4, 8]  # 24 heads
    memory = {c["sp_size"]: c["memory_gb"] for c in choice["candidates"]}
    chosen = choice["chosen"]
    assert chosen > 1 and plan["sp_size"] == chosen and choice["rule"] == "auto"
    below = valid[valid.index(chosen) - 1]
    assert memory[chosen] <= choice["budget_gb"] == 80 * 0.9 < memory[below]
    assert plan["fits"] and plan["memory_gb"]["total"] == memory[chosen]
    assert chosen == min(sp for sp in valid if memory[sp] <= choice["budget_gb"])
    assert plan["all_to_all_gb_per_step"] > 0


def test_plan_says_when_no_sp_degree_fits_and_shows_the_least_memory(capsys, monkeypatch):
    """Without activation checkpointing the 121-frame 5B fits at no degree: the table says so and
    shows the degree needing the least memory per GPU, with the per-degree comparison."""
    code, out, err = _plan(capsys, monkeypatch, "--config", "configs/scale/video-dit-5b-121f.yaml", "--nodes", "16", "train.act_ckpt=false", "--sp", "auto")
    assert code == 0, err[-2000:]
    lines = out.splitlines()
    why = next(line for line in lines if line.startswith("SP degree:"))
    assert why.startswith("SP degree: 8 -- no valid degree (1, 2, 4, 8) fits micro-batch 2"), why
    assert "DOES NOT FIT" in out
    rows = lines[lines.index(why) + 2:]
    assert [row.split()[0] for row in rows] == ["1", "2", "4", "8*"]
    assert all(row.split()[3] == "no" for row in rows)


def test_plan_forced_sp_and_an_invalid_one_in_one_line(capsys, monkeypatch, tmp_path):
    """--sp N and train.sp_size=N (override or file) force the degree; one that does not divide the
    heads or a node's GPUs is one config-error line naming it, before anything is measured."""
    tiny = ["--config", "configs/tiny/video_dit.yaml", "--gpus-per-node", "8"]
    code, out, err = _plan(capsys, monkeypatch, *tiny, "--sp", "4", "data.shards=unused")
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [err.strip()] and "--sp 4" in err and "2 attention heads" in err, err
    code, out, err = _plan(capsys, monkeypatch, *tiny, "data.shards=unused", "train.sp_size=3")
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [err.strip()] and "train.sp_size=3" in err and "8 GPUs of a node" in err, err
    code, out, err = _plan(capsys, monkeypatch, *tiny, "--sp", "2", "data.shards=unused", "--json")
    assert code == 0, err[-2000:]
    choice = json.loads(out)["sp_choice"]
    assert (choice["chosen"], choice["rule"]) == (2, "forced") and "--sp 2" in choice["reason"]
    assert [c["sp_size"] for c in choice["candidates"]] == [2]
    import yaml

    data = yaml.safe_load((REPO / "configs/tiny/video_dit.yaml").read_text())
    data.setdefault("train", {})["sp_size"] = 2
    (tmp_path / "sp2.yaml").write_text(yaml.safe_dump(data))
    code, out, err = _plan(capsys, monkeypatch, "--config", str(tmp_path / "sp2.yaml"), "data.shards=unused", "--json")
    assert code == 0, err[-2000:]
    choice = json.loads(out)["sp_choice"]
    assert (choice["chosen"], choice["rule"], choice["reason"]) == (2, "forced", "forced by train.sp_size=2")
    code, out, err = _plan(capsys, monkeypatch, "--config", str(tmp_path / "sp2.yaml"), "data.shards=unused", "--json", "--sp", "auto")
    assert code == 0 and json.loads(out)["sp_choice"]["rule"] == "auto", err[-2000:]


def test_per_rank_counts_of_each_degree_equal_measure_at_that_degree():
    """`measure_degrees` (SP-independent counts taken once) gives what `measure` gives with
    train.sp_size set, at every degree."""
    import torch

    from trainer.plan import measure_degrees

    overrides = ["data.shards=unused", "data.height=128", "data.width=128"]
    cfg = load_config(TrainJobConfig, REPO / "configs/tiny/video_dit.yaml", overrides)
    counts = measure_degrees(cfg, [1, 2], dtype=torch.bfloat16)
    for sp in (1, 2):
        alone = measure(load_config(TrainJobConfig, REPO / "configs/tiny/video_dit.yaml", [*overrides, f"train.sp_size={sp}"]), dtype=torch.bfloat16)
        assert counts[sp] == alone, sp
    assert counts[2].activation_bytes_per_sample < counts[1].activation_bytes_per_sample


def test_plan_takes_a_ring_where_the_heads_stop_ulysses(capsys, monkeypatch):
    """A degree whose Ulysses part cannot split the heads is planned with the least ring degree
    that makes it valid (the hybrid with the largest Ulysses part), and the per-degree counts with
    a ring equal `measure` with train.sp_size and train.sp_ring set; a forced degree takes the
    config's train.sp_ring."""
    import torch

    from trainer.plan import measure_degrees

    tiny = ["--config", "configs/tiny/video_dit.yaml", "--gpus-per-node", "8", "data.shards=unused"]  # 2 heads
    code, out, err = _plan(capsys, monkeypatch, *tiny, "--sp", "auto", "--json")
    assert code == 0, err[-2000:]
    candidates = json.loads(out)["sp_choice"]["candidates"]
    assert [(c["sp_size"], c["valid"], c.get("sp_ring")) for c in candidates] == [(1, True, 1), (2, True, 1), (4, True, 2), (8, True, 4)]
    code, out, err = _plan(capsys, monkeypatch, *tiny, "train.sp_size=4", "train.sp_ring=2", "--json")
    assert code == 0, err[-2000:]
    plan = json.loads(out)
    assert (plan["sp_size"], plan["sp_ring"], plan["sp_choice"]["rule"]) == (4, 2, "forced")
    code, out, err = _plan(capsys, monkeypatch, *tiny, "train.sp_size=4", "train.sp_ring=2")
    assert code == 0 and "SP degree: 4 with train.sp_ring=2" in out, err[-2000:]
    overrides = ["data.shards=unused", "data.height=64", "data.width=64"]
    cfg = load_config(TrainJobConfig, REPO / "configs/tiny/video_dit.yaml", overrides)
    counts = measure_degrees(cfg, [4], dtype=torch.float32, rings={4: 2})
    alone = measure(load_config(TrainJobConfig, REPO / "configs/tiny/video_dit.yaml", [*overrides, "train.sp_size=4", "train.sp_ring=2"]), dtype=torch.float32)
    assert counts[4] == alone and alone.ring_elements_per_sample > 0
