"""What a run reports: a plain log line, `metrics.jsonl`, and TensorBoard scalars and preview GIFs.

Only rank 0 writes. `metrics.jsonl` holds one JSON record per step (a resumed run appends; when
a step appears twice, the later record is the one that counts: see `read_metrics`).
"""

from __future__ import annotations

import io
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from common.config import dump_yaml
from common.progress import Progress, ProgressMode


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def measured_peak_flops(device: torch.device) -> float:
    """Per-device peak FLOP/s used for the MFU estimate: datasheet bf16 on known GPUs, a measured fp32 GEMM on CPU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        for key, flops in (("h200", 989e12), ("h100", 989e12), ("a100", 312e12), ("l40", 181e12), ("a10", 125e12)):
            if key in name:
                return flops
        return 100e12
    a = torch.randn(512, 512)
    b = torch.randn(512, 512)
    torch.mm(a, b)
    start = time.perf_counter()
    reps = 20
    for _ in range(reps):
        torch.mm(a, b)
    return 2 * 512**3 * reps / (time.perf_counter() - start)


CONSOLE_HIDDEN = frozenset({"skipped", "skipped_total", "step_time", "samples_per_sec", "data_wait_frac", "peak_mem_gb"})
"""Scalars left out of the console line (TensorBoard and metrics.jsonl have every one)."""


class Monitor:
    def __init__(self, run_dir: Path, *, enabled: bool, log_every: int, progress: ProgressMode = "auto"):
        self.enabled = enabled
        self.log_every = log_every
        self.run_dir = run_dir
        self.progress_mode: ProgressMode = progress
        self.progress: Progress | None = None
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tb"))
            self.metrics_file = open(run_dir / "metrics.jsonl", "a")  # noqa: SIM115 (closed in close())

    def start(self, step: int, total: int) -> None:
        """Begin the console progress at `step` (after a resume) of `total` steps."""
        if self.enabled:
            self.progress = Progress("lvd train", "step", total=total, start=step, mode=self.progress_mode, every=self.log_every)

    def step(self, step: int, metrics: dict[str, float]) -> None:
        """One finished step: metrics.jsonl, TensorBoard scalars, and the console progress (the
        line every `log_every` steps shows the step's own scalars, loss first)."""
        if not self.enabled:
            return
        self.metrics_file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.metrics_file.flush()
        for key, value in metrics.items():
            self.writer.add_scalar(key if "/" in key else f"train/{key}", value, step)
        if self.progress is None:  # `start` not called: metrics and TensorBoard only
            return
        shown = {k: v for k, v in metrics.items() if "/" not in k and k not in CONSOLE_HIDDEN}
        if metrics.get("skipped_total"):
            shown["skipped"] = int(metrics["skipped_total"])
        self.progress.update(step - self.progress.count, **shown)

    def message(self, text: str) -> None:
        """A line that is always printed (resumes, stops, the end of the run), even when quiet."""
        if self.enabled:
            print(text, flush=True)

    def video(self, step: int, video: torch.Tensor, tag: str = "preview") -> None:
        """A (1, 3, T, H, W) video in [-1, 1] as an animated GIF image summary (add_video needs moviepy)."""
        if not self.enabled:
            return
        from tensorboard.compat.proto.summary_pb2 import Summary

        frames = ((video[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).cpu().numpy()  # (T, H, W, 3)
        gif = encode_gif(frames)
        image = Summary.Image(height=frames.shape[1], width=frames.shape[2], colorspace=3, encoded_image_string=gif)
        self.writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)

    def write_config(self, config: Any) -> None:
        if self.enabled:
            (self.run_dir / "config.yaml").write_text(dump_yaml(config))

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.enabled:
            self.writer.flush()
            self.writer.close()
            self.metrics_file.close()


def encode_gif(frames: np.ndarray, fps: int = 8) -> bytes:
    images = [Image.fromarray(frame) for frame in frames]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return buffer.getvalue()


def read_metrics(run_dir: Path) -> dict[int, dict[str, float]]:
    """Per step, the last record written (a resumed run rewrites the steps after its checkpoint)."""
    records: dict[int, dict[str, float]] = {}
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                records[int(record.pop("step"))] = record
    return records


def stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
