"""CPU model-FLOP utilisation: achieved fwd+bwd FLOP/s of `unet3d` and `dit` vs this machine's fp32 GEMM.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.mfu_cpu [--repeats 5]

FLOPs are counted with `torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions and
attention; forward + backward), so the figures compare with other models counted the same
way; `model_zoo.counting.flop_counter` adds the CPU fused-attention kernel, which PyTorch's
counter counts as 0 (it is counted as the unfused matmuls, without the kernel's recomputation).
The GEMM reference is a square fp32 `torch.mm`: for each model it runs as many GEMMs as the model
step has FLOPs, interleaved with the model step, keeping the best of `repeats` of
each, so both are timed over the same span under the same background load. The value uses
CPU time (single thread: the step's own compute, robust on a shared machine); the ratio by
wall time is in the detail. The last stdout
line is a JSON list of results (goals: DiT >= 0.8 and U-Net >= 0.55 of GEMM, one
thread).

The detail gives the fewest minor page faults of a round of each side: glibc maps and unmaps
activation-sized blocks, and a step with many faults is a slow one. The benchmark keeps freed
memory in-process as `lvd train` ranks do (`common.allocator.keep_freed_memory`, which takes the
model's faults to ~0); `LVD_KEEP_FREED_MEMORY=0` measures glibc's defaults. In five A/B runs
each the setting changed the fraction by less than the run-to-run noise here.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from common.allocator import keep_freed_memory
from model_zoo import build_model, count_parameters
from model_zoo.counting import flop_counter

GEMM_SIZE = 2048
# (family, flavour, config overrides, latent shape): the benchmark sizes. The DiT one is
# DiT-B/2 on 256 tokens per sample (the DiT paper's 32x32-latent setting, here 4x16x16), batch 8.
BENCHMARKS: dict[str, tuple[str, str, dict[str, Any], tuple[int, ...]]] = {
    "unet3d": (
        "unet3d",
        "lvdm-256",
        dict(model_channels=128, num_res_blocks=2, head_dim=64),
        (1, 4, 8, 32, 32),
    ),
    "dit": ("dit", "B", {}, (8, 4, 4, 16, 16)),
}
GOALS = {"unet3d": 0.55, "dit": 0.8}


def best_times(steps: dict[str, Callable[[], object]], repeats: int) -> dict[str, dict[str, float]]:
    """Best CPU time, best wall time and fewest minor page faults of each step over `repeats`
    interleaved rounds (after one warm-up call each). With one thread, CPU time is the step's
    own compute and is not inflated by other processes sharing the cores; wall time is reported
    beside it."""
    for step in steps.values():
        step()
    best = {name: {"cpu": float("inf"), "wall": float("inf"), "faults": float("inf")} for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            cpu, wall = time.process_time(), time.perf_counter()
            step()
            best[name]["cpu"] = min(best[name]["cpu"], time.process_time() - cpu)
            best[name]["wall"] = min(best[name]["wall"], time.perf_counter() - wall)
            best[name]["faults"] = min(best[name]["faults"], resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
    return best


def training_step(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """A closure running forward + backward of a mean-square loss on `model`'s example inputs."""
    kwargs = model.example_inputs(x)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(x, **kwargs).square().mean().backward()

    return step


def counted_flops(step: Callable[[], None]) -> int:
    counter = flop_counter()
    with counter:
        step()
    return int(counter.get_total_flops())


def gemm_step(flops: int, size: int = GEMM_SIZE) -> tuple[Callable[[], None], int]:
    """A square fp32 GEMM loop doing about `flops` FLOPs (so it is timed over the same span as
    the model step, under the same background load); returns it and its exact FLOP count."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    calls = max(1, round(flops / (2 * size**3)))

    def step() -> None:
        for _ in range(calls):
            torch.mm(a, b)

    return step, calls * 2 * size**3


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", choices=sorted(BENCHMARKS), help="run one model only")
    args = parser.parse_args(argv)
    allocator = keep_freed_memory()
    torch.manual_seed(0)
    results = []
    for name, (family, flavor, overrides, shape) in BENCHMARKS.items():
        if args.only not in (None, name):
            continue
        model = build_model(family, flavor, **overrides)
        step = training_step(model, torch.randn(shape))
        flops = counted_flops(step)
        gemm, gemm_flops = gemm_step(flops)
        times = best_times({"model": step, "gemm": gemm}, args.repeats)
        achieved, reference = flops / times["model"]["cpu"], gemm_flops / times["gemm"]["cpu"]
        wall_fraction = (flops / times["model"]["wall"]) / (gemm_flops / times["gemm"]["wall"])
        detail = {
            "model": f"{family}/{flavor}",
            "overrides": overrides,
            "latent": list(shape),
            "params": count_parameters(model),
            "flops_fwd_bwd": flops,
            "cpu_seconds": round(times["model"]["cpu"], 3),
            "wall_seconds": round(times["model"]["wall"], 3),
            "fraction_by_wall_time": round(wall_fraction, 3),
            "achieved_gflops": round(achieved / 1e9, 2),
            "gemm_gflops": round(reference / 1e9, 2),
            "threads": torch.get_num_threads(),
            "allocator": allocator,
            "minor_page_faults_per_step": {"model": int(times["model"]["faults"]), "gemm": int(times["gemm"]["faults"])},
        }
        results.append(
            {
                "name": f"{name}_mfu_vs_gemm",
                "value": round(achieved / reference, 3),
                "unit": "fraction of fp32 GEMM FLOP/s",
                "goal": GOALS[name],
                "better": "higher",
                "detail": detail,
            }
        )
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
