"""Loader throughput vs raw PyAV decoding of the same clips, with the same number of processes.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.data_throughput [--processes 2] [--seconds 8]

Shards are cut from the real test videos (.cache/media or $LVD_MEDIA) into a temporary folder.
"raw" decodes every clip's mp4 bytes (already in memory) to RGB arrays with PyAV in P processes.
"loader" is `build_loader` with P DataLoader workers producing (B, C, T, H, W) float batches in
[-1, 1] (tar reading, shuffle buffer, decode, crop, collation, transfer to the main process).
Worker start-up is excluded from both, and the two never run at the same time (raw, loader,
raw). The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

from data_pipeline.config import DataConfig
from data_pipeline.loader import build_loader
from data_pipeline.shard_cli import main as shard_main
from data_pipeline.tario import iter_samples
from data_pipeline.video_io import decode_mp4

REPO = Path(__file__).resolve().parent.parent


def _make_shards(out: Path, size: int, clip_frames: int) -> list[bytes]:
    media = Path(os.environ.get("LVD_MEDIA", REPO / ".cache" / "media")) / "videos"
    args = [
        "videos",
        "--input",
        str(media),
        "--out",
        str(out),
        "--clip-frames",
        str(clip_frames),
        "--size",
        str(size),
        "--shard-size-mb",
        "0.5",
    ]
    if shard_main(args) != 0:
        raise SystemExit("data_throughput: sharding the test media failed")
    return [sample.files["mp4"] for path in sorted(out.glob("shard-*.tar")) for sample in iter_samples(path)]


def _decode_for(payloads: list[bytes], seconds: float) -> tuple[int, float]:
    """Decode clips round-robin for `seconds`; return how many were decoded and the CPU seconds used."""
    done, deadline, cpu = 0, time.perf_counter() + seconds, time.process_time()
    while time.perf_counter() < deadline:
        decode_mp4(payloads[done % len(payloads)])
        done += 1
    return done, time.process_time() - cpu


def _tree_cpu_seconds() -> float:
    """User + system CPU seconds of this process and its live descendants (Linux /proc; 0 elsewhere)."""
    parents, times = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        pid = int(stat.parent.name)
        parents[pid], times[pid] = int(fields[1]), int(fields[11]) + int(fields[12])
    tree, grown = {os.getpid()}, True
    while grown:
        children = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree, grown = tree | children, bool(children)
    return sum(times.get(pid, 0) for pid in tree) / os.sysconf("SC_CLK_TCK")


class RawDecoders:
    """P processes that decode the clips' mp4 bytes to RGB arrays, nothing else."""

    def __init__(self, payloads: list[bytes], processes: int) -> None:
        self.payloads, self.processes = payloads, processes
        self.pool = multiprocessing.get_context("forkserver").Pool(processes)
        self.measure(0.5)  # warm up

    def measure(self, seconds: float) -> tuple[int, float, float]:
        """(clips, wall seconds, CPU seconds) of one timed window."""
        start = time.perf_counter()
        shares = [
            (self.payloads[rank :: self.processes] or self.payloads, seconds)
            for rank in range(self.processes)
        ]
        results = self.pool.starmap(_decode_for, shares)
        elapsed = time.perf_counter() - start
        return sum(done for done, _ in results), elapsed, sum(cpu for _, cpu in results)


def measure_loader(cfg: DataConfig, seconds: float) -> tuple[int, float, float]:
    """(clips, wall seconds, CPU seconds of the main process and its workers) of timed batches, once
    the workers run and their prefetch queues are full."""
    loader = build_loader(cfg, rank=0, world_size=1, batch_size=4, seed=0, tokenizer=None)
    for _ in range(cfg.workers * cfg.prefetch + 2):
        next(loader)
    clips, start, cpu = 0, time.perf_counter(), _tree_cpu_seconds()
    while time.perf_counter() - start < seconds:
        clips += next(loader)["video"].shape[0]
    return clips, time.perf_counter() - start, _tree_cpu_seconds() - cpu


def run(processes: int, seconds: float, size: int, clip_frames: int) -> dict[str, object]:
    """raw, loader, raw: never both at once; the two raw windows bracket the loader's so that load
    from other users of the machine weighs on both sides alike."""
    with tempfile.TemporaryDirectory() as folder:
        payloads = _make_shards(Path(folder) / "shards", size, clip_frames)
        cfg = DataConfig(
            shards=str(Path(folder) / "shards"),
            frames=clip_frames,
            height=size,
            width=size,
            workers=processes,
            shuffle_buffer=16,
            prefetch=4,
        )
        decoders = RawDecoders(payloads, processes)
        before = decoders.measure(seconds / 2)
        clips, elapsed, loader_cpu = measure_loader(cfg, seconds)
        after = decoders.measure(seconds / 2)
        decoders.pool.terminate()
    raw = (before[0] + after[0]) / (before[1] + after[1])
    loaded = clips / elapsed
    raw_cpu_ms = 1e3 * (before[2] + after[2]) / (before[0] + after[0])
    loader_cpu_ms = 1e3 * loader_cpu / clips
    return {
        "name": "data_loader_vs_raw_pyav_decode",
        "value": round(loaded / raw, 3),
        "unit": "ratio",
        "goal": 0.9,
        "better": "higher",
        "detail": {
            "loader_clips_per_s": round(loaded, 2),
            "raw_decode_clips_per_s": round(raw, 2),
            "processes": processes,
            "clips": len(payloads),
            "raw_before_after_clips_per_s": [round(before[0] / before[1], 2), round(after[0] / after[1], 2)],
            # Work per clip, less sensitive to other load on the machine than the wall-clock rates;
            # CPU used / wall time shows how much of the machine each side got.
            "cpu_ms_per_clip": {"raw": round(raw_cpu_ms, 2), "loader": round(loader_cpu_ms, 2)},
            "cpu_ratio_raw_over_loader": round(raw_cpu_ms / loader_cpu_ms, 3),
            "cores_used": {
                "raw": round((before[2] + after[2]) / (before[1] + after[1]), 2),
                "loader": round(loader_cpu / elapsed, 2),
            },
            "clip": f"{clip_frames} frames, short side {size}, h264 one-GOP",
            "batch": f"(4, 3, {clip_frames}, {size}, {size}) float32",
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0, help="total measured time per side")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--clip-frames", type=int, default=16)
    args = parser.parse_args()
    print(json.dumps(run(args.processes, args.seconds, args.size, args.clip_frames)))


if __name__ == "__main__":
    main()
