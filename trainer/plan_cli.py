"""`lvd plan` command line: flags -> `trainer.plan` (meta-device counts + ZeRO arithmetic) -> table or JSON.

Only argparse and the config loader at import time, so `lvd plan --help` answers at once;
torch and model_zoo are imported when the plan is measured.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

from common.config import load_config
from trainer.config import TrainJobConfig
from trainer.gpus import GPUS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lvd plan", description="Per-GPU memory, fit, step time and days for a config on a GPU cluster.")
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu", choices=sorted(GPUS), default="h100")
    parser.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), help="default: the config's train.zero_stage")
    parser.add_argument("--act-ckpt", action="store_true", default=None, help="default: the config's train.act_ckpt")
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation (default 0.4)")
    parser.add_argument("--samples", type=int, default=10_000_000, help="clips to train on, for the days estimate")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from trainer.plan import bucket_configs, combine_plans, format_table, make_plan, measure

    cfg = load_config(TrainJobConfig, args.config, args.overrides)
    zero = cfg.train.zero_stage if args.zero_stage is None else args.zero_stage
    act_ckpt = cfg.train.act_ckpt if args.act_ckpt is None else args.act_ckpt
    cfg = replace(cfg, train=replace(cfg.train, zero_stage=zero, act_ckpt=act_ckpt))
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    plans = [
        make_plan(
            shape_cfg, measure(shape_cfg, dtype=dtype), config_name=str(args.config), gpu=args.gpu, nodes=args.nodes,
            gpus_per_node=args.gpus_per_node, zero_stage=zero, act_ckpt=act_ckpt, mfu=args.mfu, samples=args.samples,
        )
        for shape_cfg in bucket_configs(cfg)
    ]
    plan = combine_plans(plans)
    sys.stdout.write(json.dumps(asdict(plan), indent=2) + "\n" if args.json else format_table(plan) + "\n")
    return 0
