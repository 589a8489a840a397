"""`lvd data`: inspect a dataset of shards.

  lvd data stats SHARDS [--buckets 16x64x64,8x64x112] [--json]
  lvd data preview SHARDS --out grid.png [--clips 8] [--seed 0]

SHARDS uses the syntax of `data.shards` (brace globs, shard folders, manifest.json, '::' between
sets, http(s) URLs and 'pipe:' commands). `stats` prints the clip count, durations, clip sizes per
bucket (or per frames x height x width shape), caption lengths and histograms of the curation
scores in the clips' json. `preview` writes a contact sheet of randomly chosen clips (seeded),
one row per clip labelled with its caption.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from data_pipeline.buckets import build_buckets
from data_pipeline.config import DataConfig
from data_pipeline.dataset_stats import dataset_stats, format_stats, iter_dataset
from data_pipeline.stages import sample_caption
from data_pipeline.tario import read_sample
from data_pipeline.video_io import decode_mp4
from lvd.demo_report import contact_sheet


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lvd data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    stats = commands.add_parser("stats", help="clip count, durations, sizes per bucket, captions, scores")
    stats.add_argument("shards", help="shards in data.shards syntax")
    stats.add_argument("--buckets", default="", help="comma-separated FRAMESxHEIGHTxWIDTH[:BATCH] buckets")
    stats.add_argument("--json", action="store_true", help="print the statistics as JSON")
    preview = commands.add_parser("preview", help="contact sheet of random clips with their captions")
    preview.add_argument("shards", help="shards in data.shards syntax")
    preview.add_argument("--out", required=True, type=Path, help="PNG file to write")
    preview.add_argument("--clips", type=int, default=8, help="clips (rows) in the sheet")
    preview.add_argument("--seed", type=int, default=0, help="seed of the clip choice")
    return parser


def stats_main(args: argparse.Namespace) -> int:
    texts = tuple(text.strip() for text in args.buckets.split(",") if text.strip())
    buckets = build_buckets(DataConfig(buckets=texts), batch_size=1) if texts else []
    stats = dataset_stats(args.shards, buckets)
    print(json.dumps(stats, indent=1) if args.json else format_stats(stats))
    return 0


def preview_main(args: argparse.Namespace) -> int:
    if args.clips < 1:
        raise ValueError(f"--clips: must be >= 1, got {args.clips}")
    refs = [(url, sample.offset, sample.key) for url, sample in iter_dataset(args.shards) if "mp4" in sample.files]
    if not refs:
        raise ValueError(f"{args.shards}: no sample with an mp4 to preview")
    picked = sorted(random.Random(args.seed).sample(range(len(refs)), min(args.clips, len(refs))))
    rows = []
    for number in picked:
        url, offset, key = refs[number]
        sample = read_sample(url, offset)
        rows.append((sample_caption(sample.files) or key, decode_mp4(sample.files["mp4"])))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet = contact_sheet(rows)
    sheet.save(args.out)
    keys = ", ".join(refs[number][2] for number in picked)
    print(f"wrote {args.out} ({sheet.width}x{sheet.height}): {len(rows)} clips: {keys}")
    return 0


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        return stats_main(args) if args.command == "stats" else preview_main(args)
    except (ValueError, OSError) as error:
        print(f"lvd data {args.command}: {error}", file=sys.stderr)
        return 2
