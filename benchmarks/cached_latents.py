"""Training step time on cached latents / on raw mp4 with on-the-fly VAE + text encoding.

    OMP_NUM_THREADS=1 python -m benchmarks.cached_latents [--steps 25] [--repeats 3] [--size 32]

Shards the bundled real videos, writes a tiny lvd pipeline (seeded random `video_vae` and
`text_encoder`), caches the shards with `lvd shard latents --vae <pipeline>` (latents and text
embeddings), then trains the same `unet3d/tiny` with the same frozen VAE and text encoder, the
same micro-batch and clip shape, on 1 rank: on the raw shards (decode, VAE encoding and text
encoding inside every step) and on the cache (`data.latent=true`). Each repeat runs raw then
cached; a run's step time is the lower quartile of the `step_time` of its steps after the first 5
(on a machine shared with other jobs the upper part of the distribution is their load, not the
step; the medians are listed too); the figure is the median over repeats of cached / raw (lower
is better). The ceiling measured in the same run is the raw side itself. The last stdout line is
JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WARMUP_STEPS = 5


def make_pipeline(root: Path) -> Path:
    import torch

    import model_zoo

    for name, family in (("vae", "video_vae"), ("text_encoder", "text_encoder")):
        torch.manual_seed(0)
        model_zoo.save_pretrained(model_zoo.build_model(family, "tiny"), root / name)
    (root / "model_index.json").write_text(json.dumps({"vae": ["model_zoo", "video_vae"], "text_encoder": ["model_zoo", "text_encoder"]}))
    return root


def make_shards(out: Path, size: int, frames: int) -> Path:
    cmd = [sys.executable, "-m", "data_pipeline.shard_cli", "videos", "--input", str(REPO / ".cache/media/videos"), "--out", str(out)]
    cmd += ["--clip-frames", str(frames), "--size", str(size), "--shard-size-mb", "0.05", "--no-scores"]
    subprocess.run(cmd, check=True, capture_output=True)
    return out


def make_cache(shards: Path, pipeline: Path, out: Path, size: int, frames: int) -> Path:
    cmd = [sys.executable, "-m", "lvd", "shard", "latents", "--input", str(shards), "--vae", str(pipeline), "--out", str(out)]
    cmd += ["--frames", str(frames), "--height", str(size), "--width", str(size), "--shard-size-mb", "0.05"]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    return out


def step_times(run_dir: Path, shards: Path, pipeline: Path, *, latent: bool, steps: int, size: int, frames: int) -> list[float]:
    """Seconds of each step of one `lvd train` run after its first steps, sorted."""
    cmd = [sys.executable, "-m", "lvd", "train", "--quiet", "--config", "configs/tiny/unet3d.yaml", f"data.shards={shards}"]
    cmd += [f"run.dir={run_dir}", f"train.steps={steps}", "train.checkpoint_every=0", "run.log_every=1"]
    cmd += [f"data.height={size}", f"data.width={size}", f"data.frames={frames}", "train.micro_batch_size=2"]
    cmd += [f"model.vae={pipeline / 'vae'}", f"model.text_encoder={pipeline / 'text_encoder'}", f"data.latent={str(latent).lower()}"]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    from trainer.monitor import read_metrics

    return sorted(r["step_time"] for step, r in read_metrics(run_dir).items() if step > WARMUP_STEPS)


def lower_quartile(values: list[float]) -> float:
    return statistics.quantiles(values, n=4)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=32, help="clip height and width (pixels)")
    parser.add_argument("--frames", type=int, default=8)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    pipeline = make_pipeline(work / "pipeline")
    raw = make_shards(work / "clips", args.size, args.frames)
    cache = make_cache(raw, pipeline, work / "latents", args.size, args.frames)
    rounds = []
    for repeat in range(args.repeats):
        shape = dict(steps=args.steps, size=args.size, frames=args.frames)
        on_raw = step_times(work / f"raw{repeat}", raw, pipeline, latent=False, **shape)
        on_cache = step_times(work / f"cached{repeat}", cache, pipeline, latent=True, **shape)
        rounds.append({
            "raw_s": round(lower_quartile(on_raw), 4),
            "cached_s": round(lower_quartile(on_cache), 4),
            "ratio": round(lower_quartile(on_cache) / lower_quartile(on_raw), 3),
            "median_raw_s": round(statistics.median(on_raw), 4),
            "median_cached_s": round(statistics.median(on_cache), 4),
            "load_average": round(os.getloadavg()[0], 2),
        })
    print(json.dumps({
        "name": "train_step_time_cached_latents_vs_raw_mp4",
        "value": statistics.median(r["ratio"] for r in rounds),
        "unit": "cached / raw step time (lower quartile of steps, median of repeats)",
        "goal": 0.8,
        "better": "lower",
        "rounds": rounds,
        "config": f"configs/tiny/unet3d.yaml, {args.frames}x{args.size}x{args.size} clips, micro-batch 2, 1 rank, "
        "tiny video_vae + text_encoder (random, seeded); raw: decode + VAE + text encoding per step",
        "machine": f"{platform.node()} ({os.cpu_count()} cores)",
    }))


if __name__ == "__main__":
    main()
