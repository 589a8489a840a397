"""`lvd sample` command line: flags -> `SampleConfig` -> `program.generate` on every rank.

`--nproc R` (outside torchrun / srun) relaunches this module as R local ranks with
`lvd.launch.launch_local`; under torchrun / srun the environment already names the ranks.
Paper names are accepted as aliases of the knobs (--k, --s, --w, --N, --M, --alpha, --beta,
--F, --O, --lambda, --stride).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sampler.config import STRATEGIES, SampleConfig, trained_size
from sampler.state import ParamsMismatch

DEFAULT_SIZE = 256
"""Pixel height and width when neither the command nor the pipeline gives them."""
EXAMPLE = "lvd sample --model runs/t2v/export --strategy vidrd --frames 64 --prompt 'a red car' --out car.mp4"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lvd sample",
        description="Generate long videos with a distributed long-video strategy (SPEC §4).",
        epilog=f"example: {EXAMPLE}\nStrategy knobs count latent frames; --frames counts pixel frames.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--model", required=True, help="exported pipeline folder (prediction model for LVDM)")
    add("--model2", help="interpolation model (lvdm-hierarchical) or refiner (streaming)")
    add("--strategy", choices=STRATEGIES, default="ddim")
    add("--frames", type=int, default=16, help="pixel frames per video")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="one prompt")
    prompt.add_argument("--prompts", type=Path, help="file with one prompt per line -> one video per prompt")
    add("--out", required=True, help="output .mp4 (several prompts: <stem>-000.mp4, ...)")
    add("--seed", type=int, default=0)
    add("--nproc", type=int, default=1, help="local ranks to launch")
    add("--steps", type=int, default=50, help="DDIM steps")
    add("--eta", type=float, default=0.0, help="DDIM eta")
    add("--guidance", type=float, default=7.5, help="text CFG scale g (1 disables)")
    add("--height", type=int, help="pixel height (default: the --model's training size, else 256)")
    add("--width", type=int, help="pixel width (default: the --model's training size, else 256)")
    add("--fps", type=int, default=8)
    add("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    add("--decode-context", type=int, default=1, help="latent frames of left context when decoding a chunk")
    add("--clip-frames", "--N", type=int, help="l (LVDM) / N (VidRD, VideoFusion) / chunk length (streaming)")
    add("--cond-frames", "--k", type=int, default=1, help="k: LVDM conditioning frames")
    add("--perturb-level", "--s", type=int, default=100, help="s: LVDM conditional perturbation level")
    add("--uncond-weight", "--w", type=float, default=0.1, help="w: LVDM unconditional guidance")
    add("--keyframe-stride", "--stride", type=int, default=3, help="LVDM hierarchical keyframe stride")
    add("--overlap", "--M", type=int, default=4, help="M: VidRD overlap frames")
    add("--alpha", type=float, default=4.0, help="alpha: VidRD PNS strength")
    add("--beta", type=float, default=0.4, help="beta: VidRD DSG fraction")
    add("--lam", "--lambda", type=float, help="lambda: VideoFusion base-noise share (default: the model's)")
    add("--blend-frames", "--F", type=int, default=24, help="F: refinement chunk length")
    add("--blend-overlap", "--O", type=int, default=8, help="O: refinement overlap")
    add("--refine-t", type=int, default=600, help="T': SDEdit start timestep of the refinement")
    add("--no-refine", action="store_true", help="streaming: skip the randomised-blending refinement")
    add(
        "--no-progress", "--quiet", dest="no_progress", action="store_true",
        help="no progress (a tqdm bar on a terminal, plain 'lvd sample:' lines otherwise)",
    )
    return parser


def read_prompts(args: argparse.Namespace) -> tuple[str, ...]:
    if args.prompt is not None:
        return (args.prompt,)
    prompts = tuple(line.strip() for line in args.prompts.read_text().splitlines() if line.strip())
    if not prompts:
        raise ValueError(f"{args.prompts}: no prompts")
    return prompts


def config_from_args(args: argparse.Namespace) -> SampleConfig:
    height, width = trained_size(args.model) or (DEFAULT_SIZE, DEFAULT_SIZE)
    return SampleConfig(
        model=args.model,
        model2=args.model2,
        strategy=args.strategy,
        frames=args.frames,
        prompts=read_prompts(args),
        out=args.out,
        seed=args.seed,
        nproc=args.nproc,
        steps=args.steps,
        eta=args.eta,
        guidance=args.guidance,
        height=height if args.height is None else args.height,
        width=width if args.width is None else args.width,
        fps=args.fps,
        device=args.device,
        decode_context=args.decode_context,
        clip_frames=args.clip_frames,
        cond_frames=args.cond_frames,
        perturb_level=args.perturb_level,
        uncond_weight=args.uncond_weight,
        keyframe_stride=args.keyframe_stride,
        overlap=args.overlap,
        alpha=args.alpha,
        beta=args.beta,
        lam=args.lam,
        blend_frames=args.blend_frames,
        blend_overlap=args.blend_overlap,
        refine_t=args.refine_t,
        refine=not args.no_refine,
        progress=not args.no_progress,
    )


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

    keep_freed_memory()  # this process is a sampling rank: see lvd/allocator.py
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
