"""CPU training-step time of a small `dit` under `train.compile` (regional torch.compile) ÷ eager.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.compile_speed [--rounds 3] [--steps 5]

The compiled copy is built the way `lvd train` builds it (`trainer.compiling.compile_blocks`: each
block compiled in place with the inductor backend). A step is zero-grad, forward, mean-square loss,
backward and an AdamW update. The first `WARMUP_STEPS` steps of each side are timed apart (for the
compiled side they include compiling the forward and backward graphs, with inductor's on-disk cache
as it happens to be) and left out of the ratio. Then `rounds` interleaved rounds of `steps` steps
each side; the value is the median over the rounds of the compiled time per step ÷ the median of
the eager one, by wall time (the CPU-time ratio is in the detail). The last stdout line is one JSON
object; where the backend does not work here, its value is null and `unavailable` says why.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from model_zoo import build_model, count_parameters
from trainer.compiling import compile_blocks, unavailable_reason

BACKEND = "inductor"
WARMUP_STEPS = 2
MODEL = ("dit", "tiny", dict(hidden_size=128, depth=4, num_heads=4))
LATENT = (2, 4, 4, 16, 16)  # (B, C, T, H, W): 256 tokens per sample at patch 2


def training_step(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """A closure running one AdamW step on the mean-square output of `model`."""
    kwargs = model.example_inputs(x)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(x, **kwargs).square().mean().backward()
        optimizer.step()

    return step


def timed(step: Callable[[], None], count: int) -> tuple[float, float]:
    """Wall and CPU seconds per step over `count` steps."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(count):
        step()
    return (time.perf_counter() - wall) / count, (time.process_time() - cpu) / count


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round and side")
    args = parser.parse_args(argv)
    family, flavor, overrides = MODEL
    result: dict[str, Any] = {
        "name": "dit_compiled_vs_eager_step_time_cpu",
        "value": None,
        "unit": "ratio",
        "goal": 1.0,
        "better": "lower",
    }
    reason = unavailable_reason(BACKEND)
    if reason is not None:
        print(json.dumps({**result, "unavailable": reason}))
        return result
    torch.manual_seed(0)
    eager = build_model(family, flavor, **overrides)
    compiled = copy.deepcopy(eager)
    compile_blocks(compiled, BACKEND)
    x = torch.randn(LATENT)
    steps = {"eager": training_step(eager, x), "compiled": training_step(compiled, x)}
    warmup = {name: round(timed(step, WARMUP_STEPS)[0] * WARMUP_STEPS, 3) for name, step in steps.items()}
    per_round: dict[str, list[tuple[float, float]]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            per_round[name].append(timed(step, args.steps))
    wall = {name: statistics.median(w for w, _ in runs) for name, runs in per_round.items()}
    cpu = {name: statistics.median(c for _, c in runs) for name, runs in per_round.items()}
    result["value"] = round(wall["compiled"] / wall["eager"], 3)
    result["detail"] = {
        "model": f"{family}/{flavor}",
        "overrides": overrides,
        "params": count_parameters(eager),
        "latent": list(LATENT),
        "backend": BACKEND,
        "median_step_seconds": {name: round(value, 4) for name, value in wall.items()},
        "ratio_by_cpu_time": round(cpu["compiled"] / cpu["eager"], 3),
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "warmup_seconds": {"steps": WARMUP_STEPS, **warmup},
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
