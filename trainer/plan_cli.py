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

from common.config import ConfigError, given_keys, load_config
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
    parser.add_argument(
        "--sp", type=_sp_degree, metavar="auto|N",
        help="sequence-parallel degree: auto picks the smallest valid one at which the micro-batch fits "
        "(the default unless the config or an override sets train.sp_size); N forces it",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    return parser


def _sp_degree(value: str) -> str | int:
    if value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: give auto or a degree >= 1")
    return int(value)


def _forced_sp(args: argparse.Namespace, cfg: TrainJobConfig) -> tuple[int | None, str, str | None]:
    """(the forced degree or None for auto, what forced it, where) from --sp and train.sp_size."""
    if args.sp == "auto":
        return None, "", None
    if args.sp is not None:
        return args.sp, f"--sp {args.sp}", None
    overridden = any(item.split("=", 1)[0].strip() == "train.sp_size" for item in args.overrides)
    if overridden or "train.sp_size" in given_keys(args.config):
        return cfg.train.sp_size, f"train.sp_size={cfg.train.sp_size}", "command line" if overridden else str(args.config)
    return None, "", None


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from trainer.plan import SPError, format_sp_choice, format_table, plan_sp, sp_choice_json

    cfg = load_config(TrainJobConfig, args.config, args.overrides)
    zero = cfg.train.zero_stage if args.zero_stage is None else args.zero_stage
    act_ckpt = cfg.train.act_ckpt if args.act_ckpt is None else args.act_ckpt
    cfg = replace(cfg, train=replace(cfg.train, zero_stage=zero, act_ckpt=act_ckpt))
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    forced, forced_by, source = _forced_sp(args, cfg)
    try:
        choice = plan_sp(
            cfg, dtype=dtype, forced=forced, forced_by=forced_by, config_name=str(args.config), gpu=args.gpu, nodes=args.nodes,
            gpus_per_node=args.gpus_per_node, zero_stage=zero, act_ckpt=act_ckpt, mfu=args.mfu, samples=args.samples,
        )
    except SPError as err:
        raise ConfigError(forced_by, str(err), source) from None
    if args.json:
        sys.stdout.write(json.dumps({**asdict(choice.plan), "sp_choice": sp_choice_json(choice)}, indent=2) + "\n")
    else:
        sys.stdout.write(format_table(choice.plan) + "\n" + format_sp_choice(choice) + "\n")
    return 0
