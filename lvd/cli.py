"""The `lvd` command: one entry point, nine subcommands.

Heavy imports (torch, deepspeed) happen inside the subcommand that needs them, so `lvd --help`
is instant. Exit codes: 0 ok, 1 failure or not implemented, 2 bad usage or bad config,
and common.launch.PREEMPTED_EXIT_CODE when a run stopped on SIGUSR1/SIGTERM after checkpointing.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

from common.config import ConfigError

# subcommand -> (one-line help, "module:function" taking argv and returning an exit code).
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "shard": ("turn videos, images or clips into WebDataset shards (videos | images | latents)", "lvd.shard_cmd:main"),
    "data": ("inspect shards: stats (counts, durations, buckets, captions, scores) | preview (contact sheet)", "lvd.data_cmd:main"),
    "train": ("train a model with DeepSpeed ZeRO from a YAML config and dotted overrides", "trainer.cli:main"),
    "export": ("consolidate a run's checkpoint into a diffusers-style pipeline folder", "trainer.export_cli:main"),
    "sample": ("generate long videos with a distributed long-video strategy", "sampler.cli:main"),
    "eval": ("compute video metrics (SCuts, MAWE, FID/KID, Frechet video proxy) as JSON", "metrics.cli:main"),
    "submit": ("submit shard/train/sample to Slurm through submitit", "slurm.submit:main"),
    "plan": ("estimate memory, throughput and days for a config on a GPU cluster", "trainer.plan_cli:main"),
    "demo": ("run the whole chain on the bundled real media: shard, train, export, sample, eval", "lvd.demo:main"),
}


def _resolve(name: str) -> Callable[[list[str]], int]:
    module, func = SUBCOMMANDS[name][1].split(":")
    return getattr(importlib.import_module(module), func)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="lvd",
        description="Distributed training of latent video diffusion models and long-video generation.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(f"  {name:<8} {help_}" for name, (help_, _) in SUBCOMMANDS.items())
        + "\n\nRun `lvd <subcommand> --help` for its options.",
    )
    parser.add_argument("subcommand", choices=list(SUBCOMMANDS), metavar="subcommand", help="one of: " + ", ".join(SUBCOMMANDS))
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    ns = parser.parse_args(argv[:1])
    try:
        return _resolve(ns.subcommand)(argv[1:])
    except ConfigError as err:
        print(f"lvd {ns.subcommand}: config error: {err}", file=sys.stderr)
        return 2


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
