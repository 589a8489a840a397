"""`lvd shard videos|images|latents`: raw media -> WebDataset shards + manifest.json.

`images` writes VidRD pseudo-videos, or with `--plain` the captioned images themselves (for
`data.image_shards`).

Run as `lvd shard ...` or `python -m data_pipeline.shard_cli ...`. Re-running the same command
resumes an interrupted job (also after kill -9) and is a no-op on a finished one.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from data_pipeline.aesthetic import load_aesthetic
from data_pipeline.buckets import Bucket, build_buckets
from data_pipeline.config import DataConfig
from data_pipeline.inputs import list_inputs
from data_pipeline.latents import PosteriorEncoder, TextEmbedder, TextEncoder, VideoEncoder, shard_latents
from data_pipeline.pseudo_video import PseudoOptions, process_image, process_still
from data_pipeline.shard_writer import JobMismatchError, ShardJob
from data_pipeline.stages import ClipShape
from data_pipeline.stream import expand_shard_sets
from data_pipeline.video_shards import CutOptions, process_video

EncoderLoader = Callable[..., tuple[VideoEncoder | PosteriorEncoder, TextEncoder | TextEmbedder | None]]
"""`load_encoder(vae, *, text_encoder, tokenizer, posterior)` with the --vae, --text-encoder,
--tokenizer and --posterior values returns (encode_video, encode_text or None); supplied by the
CLI layer, which loads the networks as the trainer does."""


def _common(parser: argparse.ArgumentParser, *, input_help: str) -> None:
    parser.add_argument("--input", required=True, help=input_help)
    parser.add_argument("--out", required=True, help="output folder (shards, manifest.json)")
    parser.add_argument("--shard-size-mb", type=float, default=256.0, help="maximum shard size (MiB)")


def _media(parser: argparse.ArgumentParser, *, input_help: str) -> None:
    """The options of the commands that read raw media (videos, images)."""
    _common(parser, input_help=input_help)
    parser.add_argument("--size", type=int, default=256, help="short side of the clips in pixels")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lvd shard", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    media = "a folder (captions in sidecar name.txt), a .csv or a .jsonl with columns path, caption"
    videos = commands.add_parser("videos", help="cut videos into captioned clips")
    _media(videos, input_help=media)
    videos.add_argument("--clip-frames", type=int, default=16, help="frames per clip")
    videos.add_argument("--frame-stride", type=int, default=1, help="source frames between clip frames")
    videos.add_argument("--scene-split", action="store_true", help="no clip spans a PySceneDetect cut")
    videos.add_argument(
        "--no-scores", action="store_true", help="skip the curation scores (motion, sharpness, cuts) in each clip's json"
    )
    videos.add_argument(
        "--aesthetic-model", help="folder (config.json + model.safetensors) of a CLIP aesthetic head: adds an 'aesthetic' score"
    )
    images = commands.add_parser("images", help="VidRD pseudo-videos from captioned images")
    _media(images, input_help=media + " (sidecar: first line)")
    images.add_argument("--frames", type=int, default=16, help="frames per pseudo-video")
    images.add_argument("--fps", type=float, default=8.0, help="frame rate written into the clip")
    images.add_argument("--seed", type=int, default=0, help="base seed of the zoom/pan paths")
    images.add_argument("--min-scale", type=float, default=0.6, help="smallest crop window (strongest zoom)")
    images.add_argument(
        "--plain", action="store_true", help="plain captioned images (jpg), for data.image_shards, instead of pseudo-videos"
    )
    latents = commands.add_parser("latents", help="encode pixel shards into latent shards")
    _common(latents, input_help="pixel shards: brace glob, shard folder or manifest.json")
    latents.add_argument(
        "--vae",
        required=True,
        help="any VAE the trainer takes as model.vae: an lvd export or model folder (video_vae, causal_vae, ...), "
        "a diffusers AutoencoderKL folder (per frame, with its scaling_factor) or a pipeline folder (its vae/)",
    )
    latents.add_argument(
        "--text-encoder",
        help="text encoder as model.text_encoder takes it (lvd folder, transformers CLIP or T5 folder, pipeline); "
        "default: the --vae pipeline folder's text_encoder/, if any",
    )
    latents.add_argument("--tokenizer", help="tokenizer folder of a transformers text encoder (default: ../tokenizer)")
    latents.add_argument(
        "--posterior", choices=("sample", "mean"), default="sample", help="cache a posterior sample or its mean"
    )
    latents.add_argument(
        "--buckets",
        help="comma-separated FRAMESxHEIGHTxWIDTH buckets, as data.buckets: each clip is cut to its bucket's shape "
        "(closest aspect ratio among those it is long enough for) before encoding",
    )
    latents.add_argument("--frames", type=int, default=16, help="frames per clip given to the VAE")
    latents.add_argument("--frame-stride", type=int, default=1, help="stride of those frames in the clip")
    latents.add_argument("--height", type=int, default=256, help="clip height given to the VAE")
    latents.add_argument("--width", type=int, default=256, help="clip width given to the VAE")
    latents.add_argument("--batch-size", type=int, default=4, help="clips per encoder call")
    latents.add_argument(
        "--seed", type=int, default=0, help="seed of the posterior draws (each clip's draw: this seed and its key)"
    )
    return parser


def _params(args: argparse.Namespace) -> dict[str, Any]:
    """What defines the job's output (not --workers): compared on resume, written to the manifest."""
    params = {key: value for key, value in sorted(vars(args).items()) if key not in ("workers", "out")}
    if not params.get("plain", True):
        del params["plain"]  # pseudo-video jobs keep the parameters they were written with
    if Path(args.input).exists():
        params["input"] = str(Path(args.input).resolve())
    return params


def _check_positive(args: argparse.Namespace) -> None:
    for name in ("clip_frames", "frame_stride", "size", "frames", "height", "width", "batch_size", "workers"):
        value = getattr(args, name, 1)
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.shard_size_mb <= 0:
        raise ValueError(f"--shard-size-mb must be > 0, got {args.shard_size_mb}")


def _media_job(args: argparse.Namespace) -> dict[str, Any]:
    items = list_inputs(args.input, first_line=args.command == "images")
    if args.command == "videos":
        if args.aesthetic_model is not None:
            if args.no_scores:
                raise ValueError("--aesthetic-model adds a score: it cannot go with --no-scores")
            load_aesthetic(args.aesthetic_model)  # a bad folder fails here, in one line
        options = CutOptions(
            clip_frames=args.clip_frames,
            frame_stride=args.frame_stride,
            size=args.size,
            scene_split=args.scene_split,
            scores=not args.no_scores,
            aesthetic_model=args.aesthetic_model,
        )
        process = functools.partial(process_video, options=options)
    else:
        options = PseudoOptions(
            frames=args.frames, size=args.size, fps=args.fps, seed=args.seed, min_scale=args.min_scale
        )
        process = functools.partial(process_still if args.plain else process_image, options=options)
    job = ShardJob(
        Path(args.out),
        params=_params(args),
        shard_bytes=int(args.shard_size_mb * 2**20),
        labels=[item.source for item in items],
    )
    return job.run(items, process, workers=args.workers)


def _latent_job(args: argparse.Namespace, load_encoder: EncoderLoader | None) -> dict[str, Any]:
    if load_encoder is None:
        raise ValueError(
            "lvd shard latents needs the model loader of the `lvd` CLI: run it as `lvd shard latents ...`"
        )
    urls = [url for shard_set in expand_shard_sets(args.input, ()) for url in shard_set.urls]
    buckets = _buckets(args)
    encode_video, encode_text = load_encoder(
        args.vae, text_encoder=args.text_encoder, tokenizer=args.tokenizer, posterior=args.posterior
    )
    shape = ClipShape(
        frames=args.frames, frame_stride=args.frame_stride, height=args.height, width=args.width
    )
    return shard_latents(
        urls,
        Path(args.out),
        encode_video,
        encode_text,
        shape=shape,
        shard_size_mb=args.shard_size_mb,
        batch_size=args.batch_size,
        params=_params(args),
        seed=args.seed,
        buckets=buckets,
    )


def _buckets(args: argparse.Namespace) -> list[Bucket] | None:
    """The --buckets shapes (data.buckets' syntax and parser), at --frame-stride."""
    if not args.buckets:
        return None
    names = tuple(name.strip() for name in args.buckets.split(",") if name.strip())
    try:
        cfg = DataConfig(
            frames=args.frames, frame_stride=args.frame_stride, height=args.height, width=args.width, buckets=names
        )
    except ValueError as error:
        raise ValueError(f"--buckets: {error}") from None
    return build_buckets(cfg, args.batch_size)


def main(argv: list[str], *, load_encoder: EncoderLoader | None = None) -> int:
    """The whole `lvd shard` command; returns the exit code (0 when any input gave samples)."""
    args = _parser().parse_args(argv)
    try:
        _check_positive(args)
        manifest = _latent_job(args, load_encoder) if args.command == "latents" else _media_job(args)
    except (ValueError, FileNotFoundError, JobMismatchError) as error:
        print(f"lvd shard: error: {error}", file=sys.stderr)
        return 2
    for entry in manifest["skipped"]:
        print(f"skipped {entry['input']}: {entry['reason']}", file=sys.stderr)
    for entry in manifest["warnings"]:
        print(f"warning {entry['input']}: {entry['reason']}", file=sys.stderr)
    print(
        f"{manifest['samples']} samples in {len(manifest['shards'])} shards, {len(manifest['skipped'])} inputs skipped -> {Path(args.out) / 'manifest.json'}"
    )
    if manifest["samples"] == 0:
        print(
            f"lvd shard: error: none of the {manifest['inputs']} inputs gave a sample (see skipped above)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
