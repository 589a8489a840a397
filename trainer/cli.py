"""`lvd train`: load the typed config, then run the training loop on one or N local ranks."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from common.config import dump_yaml, load_config
from trainer.config import TrainJobConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lvd train",
        description="Train a model from a YAML config (only what differs from the defaults) plus dotted overrides.",
        epilog="example: lvd train --config configs/tiny/unet3d.yaml train.steps=20 data.shards='/x/{000..003}.tar'",
    )
    parser.add_argument("--config", type=Path, help="YAML file in configs/ (optional: defaults otherwise)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument(
        "--nproc", type=int, default=1, help="local ranks to launch (torchrun/srun set RANK/WORLD_SIZE themselves)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar or lines (run.progress=quiet)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="dotted overrides")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    overrides = [*args.overrides, "run.progress=quiet"] if args.quiet else args.overrides
    config = load_config(TrainJobConfig, args.config, overrides)
    if args.print_config:
        sys.stdout.write(dump_yaml(config))
        return 0
    if args.nproc < 1:
        print(f"lvd train: --nproc must be >= 1, got {args.nproc}", file=sys.stderr)
        return 2
    if args.nproc > 1 and "RANK" not in os.environ:
        from common.launch import launch_local

        return launch_local(["-m", "trainer.cli", *_without_nproc(argv)], nproc=args.nproc)
    from common.allocator import keep_freed_memory
    from trainer.engine import leave_distributed
    from trainer.loop import train

    keep_freed_memory()  # this process is a training rank: see common/allocator.py
    code = train(config)
    leave_distributed(succeeded=code == 0)
    return code


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        if arg.startswith("--nproc="):
            continue
        out.append(arg)
    return out


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
