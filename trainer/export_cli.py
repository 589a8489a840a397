"""`lvd export` command line: flags -> `trainer.export.export`.

Only argparse at import time, so `lvd export --help` answers at once; the export itself needs
torch, model_zoo and the engine's checkpoint reader (deepspeed), imported when it runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

LATENT_SCALE_CLIPS = 32
"""Training clips an autoencoder export encodes to fit the latent scale and shift."""
DESCRIPTION = "A run's checkpoint (any ZeRO stage) -> a pipeline folder laid out like diffusers'."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lvd export", description=DESCRIPTION)
    parser.add_argument(
        "--run",
        type=Path,
        action="append",
        required=True,
        help="the run folder (run.dir of the training config); give it once per stage to bundle CMD's "
        "cmd_content and cmd_motion runs (and optionally cmd_autoencoder) into one `cmd` pipeline",
    )
    parser.add_argument("--step", type=int, help="checkpoint step (default: latest; one run only)")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights of the trained network")
    parser.add_argument("--out", type=Path, required=True, help="pipeline folder to write")
    parser.add_argument(
        "--format",
        choices=("lvd", "diffusers"),
        default="lvd",
        help="diffusers: a TextToVideoSDPipeline folder (ModelScope-layout unet3d, AutoencoderKL, CLIP text "
        "encoder); runs diffusers has no class for are written in lvd's layout, with a message",
    )
    parser.add_argument(
        "--latent-scale-clips",
        type=int,
        default=LATENT_SCALE_CLIPS,
        help="autoencoder runs: training clips encoded to fit the latent scale/shift to unit variance (0: keep the configured ones)",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="LoRA runs: also write the pipeline folder whose denoiser is the base with the adapter merged in "
        "(without it only the adapter is written)",
    )
    parser.add_argument(
        "--lora-format",
        choices=("diffusers", "comfyui"),
        help="LoRA runs: also write the adapter with the key names of diffusers' load_lora_weights "
        "(pytorch_lora_weights.safetensors) or of ComfyUI (lora_comfyui.safetensors); peft's layout is always written",
    )
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if len(args.run) > 1 and args.step is not None:
        parser.error("--step takes one --run (a bundle exports each stage's latest checkpoint)")
    from trainer.export import export
    from trainer.export_cmd import export_cmd_bundle

    try:
        if args.format == "diffusers":
            from trainer.export_diffusers import export_diffusers

            out, message = export_diffusers(args.run[0], args.out, step=args.step, ema=args.ema)
            print(f"lvd export: {message}")
        elif len(args.run) > 1:
            out = export_cmd_bundle(args.run, args.out, ema=args.ema)
        else:
            formats = ("peft",) + ((args.lora_format,) if args.lora_format else ())
            out = export(
                args.run[0], args.out, step=args.step, ema=args.ema, latent_scale_clips=args.latent_scale_clips,
                merge=args.merge, lora_formats=formats,
            )
    except (FileNotFoundError, ValueError) as err:
        print(f"lvd export: {err}", file=sys.stderr)
        return 1
    print(f"lvd export: wrote {out}")
    return 0
