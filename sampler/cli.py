"""`lvd sample` command line: flags -> `SampleConfig` -> `program.generate` on every rank.

The flags are generated from the config dataclasses (`sampler.flags`): `SampleConfig`'s fields,
then every strategy's knobs (`sampler.strategies.STRATEGIES[name].config`), a knob that several
strategies have being one flag. Paper names are aliases of the knobs (--k, --s, --w, --N, --M,
--alpha, --beta, --F, --O, --lambda, --stride). A flag of another strategy than the chosen one is
accepted and has no effect.

`--nproc R` (outside torchrun / srun) relaunches this module as R local ranks with
`common.launch.launch_local`; under torchrun / srun the environment already names the ranks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.config import field_default
from sampler.config import SampleConfig, trained_size
from sampler.flags import add_flags, dataclass_flags, given, merged_flags
from sampler.state import ParamsMismatch
from sampler.strategies import STRATEGIES

EXAMPLE = "lvd sample --model runs/t2v/export --strategy vidrd --frames 64 --prompt 'a red car' --out car.mp4"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lvd sample",
        description="Generate long videos with a distributed long-video strategy (docs/methods.md §6).",
        epilog=f"example: {EXAMPLE}\nStrategy knobs count latent frames; --frames counts pixel frames.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_flags(parser, dataclass_flags(SampleConfig))
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="one prompt")
    prompt.add_argument("--prompts", type=Path, help="file with one prompt per line -> one video per prompt")
    knobs = parser.add_argument_group("strategy knobs (each strategy reads its own)")
    add_flags(knobs, merged_flags({name: spec.config for name, spec in STRATEGIES.items()}))
    return parser


def read_prompts(args: argparse.Namespace) -> tuple[str, ...]:
    if args.prompt is not None:
        return (args.prompt,)
    prompts = tuple(line.strip() for line in args.prompts.read_text().splitlines() if line.strip())
    if not prompts:
        raise ValueError(f"{args.prompts}: no prompts")
    return prompts


def config_from_args(args: argparse.Namespace) -> SampleConfig:
    """The command's config: the flags given, the dataclass defaults for the others; --height and
    --width default to the --model's training size when the export records it."""
    command = given(args, SampleConfig)
    size = trained_size(args.model)
    if size is not None:
        command.setdefault("height", size[0])
        command.setdefault("width", size[1])
    strategy = command.get("strategy", field_default(SampleConfig, "strategy"))
    spec = STRATEGIES[strategy]
    knobs = given(args, spec.config)
    if spec.export_knobs is not None:
        knobs = spec.export_knobs(knobs, args.model, args.model2)
    return SampleConfig(**command, prompts=read_prompts(args), strategy_config=spec.config(**knobs))


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except (ValueError, OSError) as err:
        print(f"lvd sample: {err}", file=sys.stderr)
        return 2
    from sampler.distributed import environment_world

    if config.nproc > 1 and environment_world()[1] == 1:
        from common.launch import launch_local

        return launch_local(["-m", "sampler.cli", *argv], nproc=config.nproc)
    from common.allocator import keep_freed_memory
    from sampler.program import generate

    keep_freed_memory()  # this process is a sampling rank: see common/allocator.py
    try:
        written = generate(config)
    except ParamsMismatch as err:
        print(f"lvd sample: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as err:
        print(f"lvd sample: {err}", file=sys.stderr)
        return 1
    for path in written:
        print(f"lvd sample: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
