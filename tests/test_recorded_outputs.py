"""Outputs recorded before a restructuring of the code, compared after it.

A refactor must not change what the system computes. This module pins three outputs to files in
tests/golden/:
- the video every long-video strategy writes, through the `lvd sample` command line, on tiny
  seeded pipelines (decoded uint8 frames, `sampler_<strategy>.npz`);
- the first three losses of every tiny task config (`tiny_task_losses.json`, written by
  tests/test_trainer_tasks.py, which trains them anyway);
- the exported weights of those runs (per-tensor sums, same file).

By default the comparison allows what another CPU's fp32 low bits may change (losses to a relative
2e-3, frames to a mean of 0.5 grey levels); `LVD_GOLDEN_EXACT=1` demands bit-identical results, as a
refactor on the machine that recorded them must give. `LVD_UPDATE_GOLDEN=1` rewrites the files (the
run then fails once, saying so); commit them only with a change that is meant to alter the outputs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from lvd.cli import main as lvd_main
from lvd.demo_data import read_mp4
from sampler.tiny import tiny_pipeline

GOLDEN = Path(__file__).resolve().parent / "golden"
EXACT = os.environ.get("LVD_GOLDEN_EXACT") == "1"
UPDATE = os.environ.get("LVD_UPDATE_GOLDEN") == "1"
TASKS = ("diffusion", "lvdm_prediction", "lvdm_interpolation", "videofusion", "streaming")
COMMON = ["--prompt", "a red bicycle", "--steps", "3", "--height", "32", "--width", "32", "--device", "cpu", "--quiet", "--seed", "5"]
STRATEGIES = {
    "ddim": ("diffusion", None, ["--frames", "7"]),
    "lvdm-autoregressive": ("lvdm_prediction", None, ["--frames", "22", "--k", "1"]),
    "lvdm-hierarchical": ("lvdm_prediction", "lvdm_interpolation", ["--frames", "20", "--stride", "3"]),
    "vidrd": ("diffusion", None, ["--frames", "16", "--N", "4", "--M", "2"]),
    "videofusion": ("videofusion", None, ["--frames", "16", "--N", "4"]),
    "streaming": ("streaming", "diffusion", ["--frames", "28", "--N", "4", "--F", "6", "--O", "2"]),
}
"""Per strategy: --model's task, --model2's task, and the flags of the recorded command."""


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("recorded_pipelines")
    return {task: str(tiny_pipeline(root / task, task, seed=index)) for index, task in enumerate(TASKS)}


def compare_frames(name: str, frames: np.ndarray) -> None:
    path = GOLDEN / f"sampler_{name}.npz"
    if UPDATE:
        np.savez_compressed(path, frames=frames)
        pytest.fail(f"LVD_UPDATE_GOLDEN=1: wrote {path}; run again without it")
    recorded = np.load(path)["frames"]
    assert frames.shape == recorded.shape, f"{name}: {frames.shape} frames now, {recorded.shape} recorded"
    diff = np.abs(frames.astype(np.int16) - recorded.astype(np.int16))
    message = f"{name}: mean |diff| {diff.mean():.4f} grey levels, max {diff.max()}, {int((diff > 0).sum())} values differ"
    if EXACT:
        assert diff.max() == 0, message
    else:
        assert diff.mean() <= 0.5, message


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_strategy_writes_the_recorded_video(strategy: str, pipelines: dict[str, str], tmp_path: Path) -> None:
    task, task2, flags = STRATEGIES[strategy]
    out = tmp_path / "video.mp4"
    argv = ["sample", "--model", pipelines[task], "--strategy", strategy, "--out", str(out), *COMMON, *flags]
    if task2 is not None:
        argv += ["--model2", pipelines[task2]]
    assert lvd_main(argv) == 0
    compare_frames(strategy, read_mp4(out))


def tensor_sums(folder: Path) -> dict[str, list[float]]:
    """Per tensor of every component's `model.safetensors`: (sum, sum of squares) in float64."""
    from safetensors.torch import load_file

    sums = {}
    for weights in sorted(folder.glob("*/model.safetensors")):
        for key, tensor in sorted(load_file(str(weights)).items()):
            values = tensor.double()
            sums[f"{weights.parent.name}/{key}"] = [values.sum().item(), values.square().sum().item()]
    return sums


def export_sums_match(now: list[float], want: list[float]) -> bool:
    """[sum, sum of squares] of one tensor against its recording. Exact under LVD_GOLDEN_EXACT;
    otherwise the sum of squares to 5e-3 relative, and the sum to 1e-2 of the tensor's L2 norm:
    Adam moves a parameter whose gradient is nearly zero (a bias of a zero-initialised branch) by
    about the learning rate whatever the gradient's size, in the direction of its rounding noise, so
    such tensors move by more than 1e-3 between CPUs whose kernels round differently; the sum of
    values that nearly cancel is bounded by the norm instead of its own size."""
    if EXACT:
        return now == want
    (total, squares), (want_total, want_squares) = now, want
    norm = float(np.sqrt(max(want_squares, 0.0)))
    return bool(np.isclose(squares, want_squares, rtol=5e-3, atol=1e-12) and abs(total - want_total) <= 1e-3 * abs(want_total) + 1e-2 * norm)


def compare_run(name: str, losses: list[float], export: Path) -> None:
    """The losses and the exported weights of the tiny run of config `name` against the recording."""
    path = GOLDEN / "tiny_task_losses.json"
    recorded = json.loads(path.read_text()) if path.is_file() else {}
    now = {"loss": losses, "export": tensor_sums(export)}
    if UPDATE:
        recorded[name] = now
        path.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
        pytest.fail(f"LVD_UPDATE_GOLDEN=1: wrote {name} into {path}; run again without it")
    assert name in recorded, f"no recording of {name} in {path}: record it with LVD_UPDATE_GOLDEN=1"
    rtol = 0.0 if EXACT else 2e-3
    want = recorded[name]
    assert np.allclose(losses, want["loss"], rtol=rtol, atol=0.0), f"{name}: losses {losses}, recorded {want['loss']}"
    assert sorted(now["export"]) == sorted(want["export"]), f"{name}: the export holds other tensors than recorded"
    bad = [
        f"{key}: {now['export'][key]} vs {want['export'][key]}"
        for key in want["export"]
        if not export_sums_match(now["export"][key], want["export"][key])
    ]
    assert not bad, f"{name}: {len(bad)} exported tensors differ from the recording:\n" + "\n".join(bad[:10])

