"""Training samples/s of the tiny text-to-video config on 1 rank and on 2 ranks (ZeRO-2, gloo).

    python benchmarks/train_throughput.py [--steps 30] [--shards URL]

Shards the bundled real videos (unless --shards is given), runs `lvd train` twice in this one
run, and reads samples/s from each run's metrics.jsonl (median over the steps after the
first 5). Prints JSON: the 2-rank / 1-rank speed-up (ideal 2.0; this machine has 2 cores).
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


def make_shards(out: Path) -> str:
    cmd = [sys.executable, "-m", "data_pipeline.shard_cli", "videos", "--input", str(REPO / ".cache/media/videos"), "--out", str(out)]
    subprocess.run(cmd + ["--clip-frames", "8", "--size", "32", "--shard-size-mb", "0.03"], check=True, capture_output=True)
    shards = sorted(out.glob("*.tar"))
    first, last = shards[0].stem.rsplit("-", 1)[1], shards[-1].stem.rsplit("-", 1)[1]
    return f"{out}/{shards[0].stem.rsplit('-', 1)[0]}-{{{first}..{last}}}.tar"


def run(nproc: int, shards: str, steps: int, run_dir: Path) -> float:
    cmd = [sys.executable, "-m", "lvd", "train", "--nproc", str(nproc), "--config", "configs/tiny/unet3d.yaml"]
    cmd += [f"data.shards={shards}", f"run.dir={run_dir}", f"train.steps={steps}", "train.checkpoint_every=0"]
    cmd += ["data.height=32", "data.width=32", "train.micro_batch_size=2", "train.zero_stage=2"]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    from trainer.monitor import read_metrics

    rates = [r["samples_per_sec"] for step, r in sorted(read_metrics(run_dir).items()) if step > 5]
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--shards")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    shards = args.shards or make_shards(work / "shards")
    one = run(1, shards, args.steps, work / "r1")
    two = run(2, shards, args.steps, work / "r2")
    print(json.dumps({
        "name": "train_2rank_speedup_tiny_diffusion",
        "value": two / one,
        "unit": "x",
        "goal": 1.8,
        "better": "higher",
        "samples_per_sec_1_rank": one,
        "samples_per_sec_2_ranks": two,
        "config": "configs/tiny/unet3d.yaml, 32x32, micro-batch 2 per rank, ZeRO-2",
        "machine": f"{platform.node()} ({os.cpu_count()} cores)",
    }))


if __name__ == "__main__":
    main()
