"""The runs behind `benchmarks/fidelity.py`: its recipes, the two models it trains on the demo's
media, the paired `lvd sample` runs (mechanism and ablation) and the shape of a result line."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
SIZE, TIME_FACTOR = 32, 2
"""The demo's pixel size and its VAE's time downsampling (a latent frame is 2 pixel frames)."""


@dataclass(frozen=True)
class Recipe:
    """Training and sampling sizes of one fidelity run."""

    streaming_steps: int
    """Training steps of CAM/APM over the frozen demo text-to-video U-Net."""
    videofusion_steps: int
    """Training steps of the VideoFusion base and residual generators."""
    streaming_lr: float
    """Peak learning rate of the CAM/APM training."""
    videofusion_lr: float
    """Peak learning rate of the VideoFusion training."""
    sample_steps: int
    """DDIM steps of every video (the same on both sides of a comparison)."""
    guidance: float
    """Text CFG scale of every video (the demo's)."""
    frames: int
    """Pixel frames of the streaming, VidRD and VideoFusion videos."""
    lvdm_frames: int
    """Pixel frames of the LVDM autoregressive rollout."""
    drift_chunk: int
    """Pixel frames per chunk of the drift curve."""
    feature_stride: int
    """Inception features of every n-th frame of the rollout (they cost ~0.12 s per frame)."""


FULL = Recipe(
    streaming_steps=1000,
    videofusion_steps=1500,
    streaming_lr=1e-3,
    videofusion_lr=2e-3,
    sample_steps=25,
    guidance=3.0,
    frames=128,
    lvdm_frames=512,
    drift_chunk=64,
    feature_stride=2,
)
QUICK = Recipe(
    streaming_steps=20,
    videofusion_steps=20,
    streaming_lr=1e-3,
    videofusion_lr=1e-3,
    sample_steps=4,
    guidance=3.0,
    frames=48,
    lvdm_frames=64,
    drift_chunk=16,
    feature_stride=4,
)
"""Proves the chain in a minute or two; its figures mean nothing."""


class Runner:
    """Runs `lvd` subcommands, each with its log in <work>/logs, skipped when its output exists."""

    def __init__(self, work: Path):
        self.work = work
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def together(self, jobs: list[tuple[str, Path, list[str]]]) -> None:
        """Start every (name, done, args) job whose `done` is missing, all at once; wait for them."""
        started = []
        for name, done, args in jobs:
            if done.exists():
                continue
            print(f"fidelity: {name} ...", file=sys.stderr, flush=True)
            log = open(self.logs / f"{name}.log", "w")
            command = [sys.executable, "-m", "lvd", *args]
            started.append((name, log, subprocess.Popen(command, cwd=REPO, stdout=log, stderr=log, env=ENV)))
        for name, log, proc in started:
            proc.wait()
            log.close()
            if proc.returncode != 0:
                tail = (self.logs / f"{name}.log").read_text(errors="replace").splitlines()[-20:]
                raise SystemExit(f"fidelity: {name} failed (exit {proc.returncode}):\n" + "\n".join(tail))


def train_models(runner: Runner, demo: Path, recipe: Recipe) -> dict[str, Path]:
    """The StreamingT2V (CAM/APM over the demo's text-to-video U-Net) and VideoFusion exports,
    trained side by side (one process each) on the demo's training clips unless present."""
    t2v, work = demo / "export" / "t2v", runner.work
    common = [
        f"model.vae={demo / 'export' / 'vae' / 'vae'}",
        f"model.text_encoder={t2v / 'text_encoder'}",
        f"data.shards={demo / 'shards' / 'train'}",
        "data.frames=16",
        f"data.height={SIZE}",
        f"data.width={SIZE}",
        "train.ema_decay=0.995",
        "run.log_every=50",
    ]
    recipes = {
        "streaming": (recipe.streaming_steps, recipe.streaming_lr, [f"model.base={t2v / 'denoiser'}"]),
        "videofusion": (recipe.videofusion_steps, recipe.videofusion_lr, []),
    }
    exports = {name: work / "export" / name for name in recipes}
    runner.together(
        [
            (
                f"train-{name}",
                exports[name] / "model_index.json",
                [
                    "train",
                    "--config",
                    f"configs/tiny/{name}.yaml",
                    f"run.dir={work / 'runs' / name}",
                    *common,
                    *extra,
                    f"train.steps={steps}",
                    f"train.checkpoint_every={steps}",
                    f"train.lr={lr}",
                ],
            )
            for name, (steps, lr, extra) in recipes.items()
        ]
    )
    runner.together(
        [
            (
                f"export-{name}",
                exports[name] / "model_index.json",
                ["export", "--run", str(work / "runs" / name), "--ema", "--out", str(exports[name])],
            )
            for name in recipes
        ]
    )
    return exports


@dataclass(frozen=True)
class Pair:
    """Two `lvd sample` runs: the mechanism's flags and the ablation's, on top of shared ones."""

    name: str
    """Stem of the videos and logs."""
    shared: list[str]
    """Flags of both runs (strategy, models, chunk sizes)."""
    mechanism: list[str]
    """Flags of the mechanism's run (empty: the strategy's defaults)."""
    ablation: list[str]
    """Flags of the ablation's run."""


def sample_pair(
    runner: Runner, pair: Pair, prompts: list[str], recipe: Recipe, frames: int
) -> tuple[list[Path], list[Path]]:
    """Both sides' videos, one per prompt (video i with seed i); a side with its videos is not rerun."""
    prompt_file = runner.work / f"prompts-{len(prompts)}.txt"
    prompt_file.write_text("\n".join(prompts) + "\n")
    common = ["--prompts", str(prompt_file), "--frames", str(frames), "--steps", str(recipe.sample_steps)]
    common += ["--guidance", str(recipe.guidance), "--height", str(SIZE), "--width", str(SIZE)]
    common += ["--seed", "0", "--device", "cpu", "--quiet"]
    videos, jobs = {}, []
    for side, flags in (("mechanism", pair.mechanism), ("ablation", pair.ablation)):
        out = runner.work / "videos" / f"{pair.name}-{side}.mp4"
        out.parent.mkdir(parents=True, exist_ok=True)
        many = [out.with_name(f"{out.stem}-{i:03d}.mp4") for i in range(len(prompts))]
        videos[side] = [out] if len(prompts) == 1 else many
        done = videos[side][-1].with_suffix(".json")
        jobs.append(
            (f"sample-{pair.name}-{side}", done, ["sample", *pair.shared, *flags, *common, "--out", str(out)])
        )
    runner.together(jobs)
    return videos["mechanism"], videos["ablation"]


def shows_direction(value: float | None, ablation_value: float | None, better: str) -> bool | None:
    """Whether the mechanism's value beats the ablation's in the paper's direction (a tie does
    not); None when a side could not be measured."""
    if value is None or ablation_value is None:
        return None
    return value < ablation_value if better == "lower" else value > ablation_value


def entry(
    name: str,
    pair: Pair,
    *,
    measurement: str,
    unit: str,
    better: str,
    values: tuple[float | None, float | None],
    detail: dict[str, Any],
) -> dict[str, Any]:
    """One result line: `values` are the mechanism's and the ablation's. `goal` repeats the
    ablation's value, so `python -m benchmarks`' "met" reads "shows the paper's direction"."""
    value, ablation_value = values
    return {
        "name": name,
        "value": value,
        "ablation_value": ablation_value,
        "unit": unit,
        "goal": ablation_value,
        "better": better,
        "paper_direction": f"{better} with the mechanism than without",
        "shows_paper_direction": shows_direction(value, ablation_value, better),
        "measurement": measurement,
        "mechanism": " ".join(pair.mechanism) or "(the strategy's defaults)",
        "ablation": " ".join(pair.ablation),
        "detail": {"flags": " ".join(pair.shared), **detail},
    }
