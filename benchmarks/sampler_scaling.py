"""Scaling of `lvd sample` on tiny random pipelines (CPU): prints a JSON list of results as its last line.

- 2-rank speedup over 1 rank on lvdm-hierarchical and on streaming (whose refinement is the
  randomised-blending stage, by a text-to-video --model2 at twice the size), from the runs' own
  timings (`wall` excludes process start-up).
  Each case runs `--repeats` rounds of: the 1-rank run, the 2-rank run, and two independent
  1-rank runs of the same command at once. The figure is the median over rounds of the 1-rank
  wall over the 2-rank wall of the same round (a drift of the shared VM's speed cancels within a
  round, and one fast outlier cannot set it); the fastest-run ratio and every wall are in the
  detail.
- The machine's ceiling for that speed-up, from the same rounds: two independent copies of the
  1-rank job, each with a core of its own, have no communication and no imbalance, so
  2 x (1-rank wall) / (mean wall of the copies) is what a perfect split of the job could reach on
  this machine at that moment. `efficiency` is the speed-up over that ceiling (median over rounds).
  `busy_fraction_2`, the 2-rank run's CPU seconds over 2 x its wall, is the share of the cores it
  kept busy: its own waits and imbalance, free of the VM's drift between runs.
- Time per frame and peak RSS of lvdm-autoregressive at 1024 frames relative to 64 frames (the
  64-frame video runs before and after the long one; their mean counts).
Goals: speedups >= 1.8, time-per-frame ratio <= 1.1, RSS ratio <= 1.2; and (ours) an
efficiency >= 0.95 of the ceiling.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.sampler_scaling [--steps 3] [--repeats 5] [--only hierarchical|blending|length|parallel]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from sampler.tiny import tiny_pipeline

COMMON = ["--height", "32", "--width", "32", "--device", "cpu", "--no-progress", "--prompt", "a red bicycle"]


def command(argv: list[str], out: Path) -> list[str]:
    return [sys.executable, "-m", "sampler.cli", *argv, *COMMON, "--out", str(out)]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def report(out: Path) -> dict[str, Any]:
    return json.loads(out.with_suffix(".json").read_text())


def sample(argv: list[str], out: Path) -> dict[str, Any]:
    """Run `lvd sample` in a fresh process and return its `<out>.json`."""
    subprocess.run(command(argv, out), check=True, capture_output=True, env=ENV)
    return report(out)


def two_copies(argv: list[str], outs: tuple[Path, Path]) -> list[dict[str, Any]]:
    """Two independent 1-rank runs of the same command at once (each on a core of its own)."""
    procs = [
        subprocess.Popen(command(argv, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
        for out in outs
    ]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode:
            raise subprocess.CalledProcessError(proc.returncode, proc.args, stderr=err)
    return [report(out) for out in outs]


def wall(run: dict[str, Any]) -> float:
    return run["timings"]["wall"]


def speedup(argv: list[str], stage: str, root: Path, name: str, repeats: int) -> dict[str, Any]:
    """`repeats` rounds of 1 rank, 2 ranks and two 1-rank copies at once, in fresh folders."""
    rounds = []
    for repeat in range(repeats):
        folder = root / f"{name}-{repeat}"
        one = sample([*argv, "--nproc", "1"], folder / "one" / "v.mp4")
        two = sample([*argv, "--nproc", "2"], folder / "two" / "v.mp4")
        copies = two_copies(
            [*argv, "--nproc", "1"], (folder / "copy-a" / "v.mp4", folder / "copy-b" / "v.mp4")
        )
        rounds.append((one, two, copies))
    speedups = [wall(one) / wall(two) for one, two, _ in rounds]
    ceilings = [2 * wall(one) / statistics.mean(map(wall, copies)) for one, _, copies in rounds]
    # The share of the two cores the 2-rank run kept busy (its ranks' CPU seconds over 2 x wall):
    # idle time in waits and imbalance, measured inside one run, so the VM's drift does not enter.
    busy = [sum(rank["cpu_seconds"] for rank in two["ranks"]) / (2 * wall(two)) for _, two, _ in rounds]
    fastest_one = min((one for one, _, _ in rounds), key=wall)
    fastest_two = min((two for _, two, _ in rounds), key=wall)
    stage_two = max(rank["timings"].get(stage, 0.0) for rank in fastest_two["ranks"])
    return {
        "speedup": round(statistics.median(speedups), 3),
        "speedups_per_round": [round(value, 3) for value in speedups],
        "ceiling": round(statistics.median(ceilings), 3),
        "ceilings_per_round": [round(value, 3) for value in ceilings],
        "efficiency": round(statistics.median(a / b for a, b in zip(speedups, ceilings)), 3),
        "busy_fraction_2": round(statistics.median(busy), 3),
        "busy_fractions_per_round": [round(value, 3) for value in busy],
        "fastest_run_speedup": round(wall(fastest_one) / wall(fastest_two), 3),
        f"{stage}_speedup_fastest_runs": round(fastest_one["timings"][stage] / stage_two, 3),
        "walls_1": [round(wall(one), 2) for one, _, _ in rounds],
        "walls_2": [round(wall(two), 2) for _, two, _ in rounds],
        "walls_copies": [[round(wall(copy), 2) for copy in copies] for _, _, copies in rounds],
        "stages_1_fastest": {k: round(v, 2) for k, v in fastest_one["timings"].items()},
        "stages_2_fastest_by_rank": [
            {k: round(v, 2) for k, v in rank["timings"].items()} for rank in fastest_two["ranks"]
        ],
    }


def length_scaling(model: str, steps: int, short: int, long: int, root: Path) -> dict[str, Any]:
    """The short video before and after the long one: its mean time per frame cancels a steady
    drift of the VM's speed over the long run."""
    argv = ["--model", model, "--strategy", "lvdm-autoregressive", "--steps", str(steps)]
    before = sample([*argv, "--frames", str(short)], root / "ar-short-before" / "v.mp4")
    longer = sample([*argv, "--frames", str(long)], root / "ar-long" / "v.mp4")
    after = sample([*argv, "--frames", str(short)], root / "ar-short-after" / "v.mp4")
    short_per_frame = statistics.mean([wall(before), wall(after)]) / short
    long_per_frame = wall(longer) / long
    short_rss = max(before["peak_rss_mb"], after["peak_rss_mb"])
    return {
        f"time_per_frame_{short}": round(short_per_frame, 4),
        f"time_per_frame_{short}_before_and_after": [round(wall(run) / short, 4) for run in (before, after)],
        f"time_per_frame_{long}": round(long_per_frame, 4),
        "time_per_frame_ratio": round(long_per_frame / short_per_frame, 3),
        f"peak_rss_mb_{short}": round(short_rss, 1),
        f"peak_rss_mb_{long}": round(longer["peak_rss_mb"], 1),
        "peak_rss_ratio": round(longer["peak_rss_mb"] / short_rss, 3),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--short-frames", type=int, default=64)
    parser.add_argument("--long-frames", type=int, default=1024)
    parser.add_argument("--parallel-frames", type=int, default=192)
    parser.add_argument(
        "--repeats", type=int, default=5, help="rounds of each case (1 rank, 2 ranks, two 1-rank copies)"
    )
    parser.add_argument(
        "--only",
        choices=("hierarchical", "blending", "length", "parallel"),
        help="run one case only ('parallel': the two 2-rank cases, hierarchical and blending)",
    )
    return parser.parse_args(argv)


def parallel_cases(models: dict[str, str], args: argparse.Namespace) -> dict[str, list[str]]:
    """The `lvd sample` arguments of each 2-rank case, by case name."""
    steps = ["--steps", str(args.steps), "--frames", str(args.parallel_frames)]
    hierarchical = ["--model", models["lvdm_prediction"], "--model2", models["lvdm_interpolation"]]
    hierarchical += ["--strategy", "lvdm-hierarchical", "--stride", "7", "--clip-frames", "8", *steps]
    streaming = [
        "--model",
        models["streaming"],
        "--model2",
        models["diffusion"],
        "--strategy",
        "streaming",
        "--clip-frames",
        "8",
        "--F",
        "8",
    ]
    streaming += ["--O", "2", "--refine-t", "999", *steps]
    return {"hierarchical": hierarchical, "blending": streaming}


def measure(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Each case's measurements, by case name (only the cases `--only` selects)."""
    measured = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = {
            task: str(tiny_pipeline(root / task, task))
            for task in ("lvdm_prediction", "lvdm_interpolation", "streaming", "diffusion")
        }
        cases = parallel_cases(models, args)
        if args.only in (None, "hierarchical", "parallel"):
            measured["hierarchical"] = speedup(cases["hierarchical"], "gaps", root, "hier", args.repeats)
        if args.only in (None, "blending", "parallel"):
            measured["blending"] = speedup(cases["blending"], "refine", root, "stream", args.repeats)
        if args.only in (None, "length"):
            measured["length"] = length_scaling(
                models["lvdm_prediction"], args.steps, args.short_frames, args.long_frames, root
            )
    return measured


def speedup_results(case: str, scaling: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """The speed-up and the efficiency entries of one 2-rank case."""
    rounds = {"steps": args.steps, "frames": args.parallel_frames, "rounds": args.repeats}
    return [
        {
            "name": f"sampler_2rank_speedup_{case}",
            "value": scaling["speedup"],
            "unit": "x (median of rounds)",
            "goal": 1.8,
            "better": "higher",
            **rounds,
            "detail": scaling,
        },
        {
            "name": f"sampler_2rank_efficiency_vs_ceiling_{case}",
            "value": scaling["efficiency"],
            "unit": "speed-up / two-independent-copies ceiling (median of rounds)",
            "goal": 0.95,
            "better": "higher",
            **rounds,
            "detail": {
                "ceiling": scaling["ceiling"],
                "ceilings_per_round": scaling["ceilings_per_round"],
            },
        },
    ]


def length_results(length: dict[str, Any]) -> list[dict[str, Any]]:
    """The time-per-frame and the peak-RSS entries of the long-video case."""
    return [
        {
            "name": "sampler_time_per_frame_1024_vs_64",
            "value": length["time_per_frame_ratio"],
            "unit": "ratio",
            "goal": 1.1,
            "better": "lower",
            "detail": length,
        },
        {
            "name": "sampler_peak_rss_1024_vs_64",
            "value": length["peak_rss_ratio"],
            "unit": "ratio",
            "goal": 1.2,
            "better": "lower",
            "detail": length,
        },
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    measured = measure(args)
    results = []
    for case in ("hierarchical", "blending"):
        if case in measured:
            results += speedup_results(case, measured[case], args)
    if "length" in measured:
        results += length_results(measured["length"])
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
