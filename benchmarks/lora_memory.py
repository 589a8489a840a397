"""Per-rank memory of LoRA against full fine-tuning of the same network, on real DeepSpeed engines.

    python -m benchmarks.lora_memory [--config configs/tiny/dit.yaml] [--set model.flavor=S] [--zero-stage 2]

Each measurement is its own 2-rank launch (gloo), so that the peak RSS of a rank belongs to one
mode: build the task's trained network (with `train.lora.rank` adapters injected for LoRA), wrap it
in an engine, take two optimizer steps, then read the bytes the engine holds for model and
optimizer (`trainer.engine.allocated_state_bytes`) and the rank's peak memory
(`trainer.monitor.peak_memory_bytes`: peak RSS on CPU, the CUDA allocator's peak on GPU). Each mode
is launched `--repeats` times; the JSON printed holds the median per rank.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
STEPS = 2
"""Optimizer steps per measurement (Adam creates its moments in the first)."""
PEAK_RATIO_GOAL = 0.8
"""LoRA's peak per rank at most this share of full fine-tuning's on the default network (dit/S):
its gradients and Adam moments vanish, the weights and the process's fixed cost (torch, gloo,
activations) stay."""


def measure_rank(config: str, overrides: list[str], rank: int, zero_stage: int, out: Path) -> None:
    """One rank of one launch: train `STEPS` steps and write (rank 0) every rank's figures to `out`."""
    from common.config import load_config
    from trainer.config import TrainJobConfig
    from trainer.engine import allocated_state_bytes, build_engine, init_distributed, leave_distributed
    from trainer.lora import inject_lora
    from trainer.monitor import peak_memory_bytes
    from trainer.tasks import build_task

    info = init_distributed()
    cfg = load_config(TrainJobConfig, config, ["data.shards=unused", *overrides, f"train.lora.rank={rank}"])
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, zero_stage=zero_stage))
    model = build_task(cfg, info.device).trained["model"]
    if cfg.train.lora.enabled:
        inject_lora(model, cfg.train.lora, init_from=cfg.model.init_from)
    x = torch.randn(1, model.config.in_channels, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    kwargs = model.example_inputs(x)
    engine = build_engine(model, cfg.train, info)
    for _ in range(STEPS):
        engine.backward(engine(x, **kwargs).float().square().mean())
        engine.step()
    figures = {
        **allocated_state_bytes(engine),
        "peak_bytes": peak_memory_bytes(info.device),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    gathered: list[object] = [None] * info.world_size
    torch.distributed.all_gather_object(gathered, figures)
    if info.is_main:
        out.write_text(json.dumps(gathered))
    leave_distributed()


def _launch(args: argparse.Namespace, rank: int) -> list[dict[str, int]]:
    from common.launch import launch_local

    out = Path(tempfile.mkdtemp()) / "lora_memory.json"
    worker = [__file__, "--rank-worker", "--lora-rank", str(rank), "--config", args.config, "--out", str(out)]
    worker += ["--zero-stage", str(args.zero_stage), *(f"--set={item}" for item in args.set)]
    code = launch_local(worker, nproc=2)
    if code != 0:
        sys.exit(code)
    return json.loads(out.read_text())


def _median_per_rank(runs: list[list[dict[str, int]]]) -> list[dict[str, float]]:
    return [
        {key: statistics.median(run[r][key] for run in runs) for key in runs[0][r]}
        for r in range(len(runs[0]))
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs/tiny/dit.yaml"))
    parser.add_argument(
        "--set", action="append", default=None, help="config override a.b=value (default: model.flavor=S)"
    )
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--lora-rank", type=int, default=8, help="adapter rank of the LoRA runs")
    parser.add_argument("--repeats", type=int, default=3, help="launches per mode; the median is reported")
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--rank-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.set = ["model.flavor=S"] if args.set is None else args.set
    if args.rank_worker:
        measure_rank(args.config, args.set, args.lora_rank, args.zero_stage, args.out)
        return
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    modes = {"full": 0, "lora": args.lora_rank}
    medians = {
        mode: _median_per_rank([_launch(args, rank) for _ in range(args.repeats)])
        for mode, rank in modes.items()
    }
    peak = {mode: max(r["peak_bytes"] for r in ranks) for mode, ranks in medians.items()}
    state = {mode: max(r["model"] + r["optimizer"] for r in ranks) for mode, ranks in medians.items()}
    print(json.dumps({
        "name": "lora_vs_full_finetune_memory_per_rank",
        "value": peak["lora"] / peak["full"],
        "unit": "ratio of peak memory per rank (LoRA / full)",
        "goal": PEAK_RATIO_GOAL,
        "better": "lower",
        "model_optimizer_bytes_ratio": state["lora"] / state["full"],
        "per_rank_median": medians,
        "repeats": args.repeats,
        "world_size": 2,
        "zero_stage": args.zero_stage,
        "lora_rank": args.lora_rank,
        "config": args.config,
        "overrides": args.set,
        "machine": platform.node(),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
