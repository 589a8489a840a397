"""Per-rank bytes of model + optimizer states that real DeepSpeed engines hold under ZeRO 0-3.

    python benchmarks/zero_memory.py [--config configs/tiny/unet3d.yaml] [--out measured.json]

Launches itself on 2 local ranks (gloo), builds the task's trained network under each stage,
takes one optimizer step (Adam creates its moments lazily) and reads the bytes off the engine
(`trainer.engine.allocated_state_bytes`). Prints JSON: ZeRO-3 / ZeRO-0 per-rank ratio (goal
<= 0.55 on 2 ranks) with every stage's figures. tests/test_planner.py checks `lvd plan`
against the same measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def measure_rank(config: str, out: Path, precision: str) -> None:
    from common.config import load_config
    from trainer.config import TrainJobConfig
    from trainer.engine import allocated_state_bytes, build_engine, init_distributed, leave_distributed
    from trainer.tasks import build_task

    info = init_distributed()
    cfg = load_config(TrainJobConfig, config, ["data.shards=unused", f"train.precision={precision}"])
    results = {}
    for stage in (0, 1, 2, 3):
        cfg_stage = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, zero_stage=stage))
        model = build_task(cfg_stage, info.device).trained["model"]
        x = torch.randn(1, model.config.in_channels, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        kwargs = model.example_inputs(x)
        engine = build_engine(model, cfg_stage.train, info)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = engine(x, **kwargs).float().square().mean()
        engine.backward(loss)
        engine.step()
        gathered: list[object] = [None] * info.world_size
        torch.distributed.all_gather_object(gathered, allocated_state_bytes(engine))
        results[stage] = gathered
    if info.is_main:
        out.write_text(json.dumps(results))
    leave_distributed()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs/tiny/unet3d.yaml"))
    parser.add_argument("--out", type=Path, help="also keep the per-stage figures here (of the first precision)")
    parser.add_argument("--precision", default="fp32,bf16", help="comma-separated: fp32, bf16")
    parser.add_argument("--rank-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    precisions = args.precision.split(",")
    if args.rank_worker:
        measure_rank(args.config, args.out, precisions[0])
        return
    from common.launch import launch_local

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    entries = []
    for number, precision in enumerate(precisions):
        out = args.out if args.out is not None and number == 0 else Path(tempfile.mkdtemp()) / "zero_memory.json"
        code = launch_local([__file__, "--rank-worker", "--config", args.config, "--out", str(out), "--precision", precision], nproc=2)
        if code != 0:
            sys.exit(code)
        measured = json.loads(out.read_text())
        per_rank = {stage: sum(values[0].values()) for stage, values in measured.items()}
        entries.append({
            "name": f"zero3_vs_zero0_model_optimizer_bytes_per_rank_{precision}",
            "value": per_rank["3"] / per_rank["0"],
            "unit": "ratio",
            "goal": 0.55,
            "better": "lower",
            "bytes_per_rank": per_rank,
            "detail": measured,
            "world_size": 2,
            "config": args.config,
            "machine": platform.node(),
        })
    print(json.dumps(entries))


if __name__ == "__main__":
    main()
