"""A golden loss curve: the first 20 losses of a tiny fixed-seed `unet3d` run on the real test
shards equal the curve stored in tests/golden/, to a relative 2e-3 per step.

Everything in the run is seeded (parameters, data order, timesteps, noise) and CPU fp32 on one
thread is deterministic, so the curve moves only when the training numerics do: the objective,
the schedule, the optimizer, the data path, the initialisation. Across CPUs the low bits of
fp32 GEMMs can differ; 2e-3 leaves room for that and is far below what a numerics change
gives after a few steps. When a change is meant to alter the numerics, regenerate the curve
with `LVD_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden_curve.py` (the run then
fails once, saying it wrote the file) and commit the new file with the change.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from common.config import load_config
from trainer.config import TrainJobConfig
from trainer.loop import train
from trainer.monitor import read_metrics

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO / "tests" / "golden" / "unet3d_tiny_loss.json"
STEPS = 20
RTOL = 2e-3
OVERRIDES = [
    "data.height=32", "data.width=32", "train.micro_batch_size=2", "train.warmup_steps=5", "train.lr=1e-3",
    f"train.steps={STEPS}", "train.checkpoint_every=0", "train.seed=0", "run.progress=quiet",
]


def test_tiny_unet3d_loss_curve_matches_the_stored_curve(tmp_path: Path, video_shards: str) -> None:
    cfg = load_config(TrainJobConfig, REPO / "configs/tiny/unet3d.yaml", [*OVERRIDES, f"data.shards={video_shards}", f"run.dir={tmp_path}"])
    assert train(cfg) == 0
    records = read_metrics(tmp_path)
    losses = [records[step]["loss"] for step in range(1, STEPS + 1)]
    if os.environ.get("LVD_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps({"config": "configs/tiny/unet3d.yaml", "overrides": OVERRIDES, "loss": losses}, indent=1) + "\n")
        pytest.fail(f"LVD_UPDATE_GOLDEN=1: wrote {GOLDEN}; run again without it")
    golden = json.loads(GOLDEN.read_text())
    assert golden["overrides"] == OVERRIDES, "the stored curve was made with other overrides: regenerate it"
    expected = np.array(golden["loss"])
    got = np.array(losses)
    bad = ~np.isclose(got, expected, rtol=RTOL, atol=0.0)
    table = "\n".join(
        f"  step {i + 1:2d}: stored {e:.6f}  now {g:.6f}  ({(g - e) / e:+.2%}){'  <-' if b else ''}"
        for i, (e, g, b) in enumerate(zip(expected, got, bad))
    )
    assert not bad.any(), f"the training numerics changed: {int(bad.sum())} of {STEPS} losses differ by more than {RTOL:.0e} (relative)\n{table}"
