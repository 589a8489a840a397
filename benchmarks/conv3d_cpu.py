"""3-D convolutions on CPU: `model_zoo.layers.time_padded_conv.Conv3d` (always oneDNN) against the
kernel PyTorch picks itself (`nn.Conv3d`), alone and inside a tiny VAE decoding (prints JSON).

PyTorch sends a float32 CPU convolution to oneDNN only above a size heuristic; below it (batch 1,
N·C·T·H ≤ 20480) it runs `slow_conv3d` (im2col). The sampler decodes one video at a time, so at
small sizes every VAE convolution took the slow kernel. Goal: the tiny VAE decoding of one
sampler piece (1, 4, 8, 8, 8) latents -> 32 frames of 32x32) at least 2x faster than with
PyTorch's choice, with the same frames to float32 rounding.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.conv3d_cpu
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from functools import partial

import torch
from torch import nn

SHAPES = [
    ((1, 16, 18, 34, 34), 16),
    ((1, 32, 18, 34, 34), 16),
    ((1, 32, 10, 10, 10), 32),
    ((1, 16, 18, 34, 34), 3),
]
"""Padded inputs and output channels of the tiny VAE decoder's 3x3x3 convolutions."""


def best_of(work: Callable[[], object], rounds: int = 5, calls: int = 5) -> float:
    """Fastest mean seconds per call over `rounds` rounds of `calls` calls (after one warm-up call)."""
    work()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            work()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def main() -> int:
    from model_zoo import build_model
    from model_zoo.layers.time_padded_conv import Conv3d

    torch.set_num_threads(1)
    torch.manual_seed(0)
    convs = []
    with torch.no_grad():
        for shape, out_channels in SHAPES:
            ours = Conv3d(shape[1], out_channels, 3)
            plain = nn.Conv3d(shape[1], out_channels, 3)
            plain.load_state_dict(ours.state_dict())
            x = torch.randn(shape)
            diff = (ours(x) - plain(x)).abs().max().item()
            seconds = {
                "onednn_ms": best_of(partial(ours, x)) * 1e3,
                "pytorch_choice_ms": best_of(partial(plain, x)) * 1e3,
            }
            convs.append(
                {
                    "input": list(shape),
                    "out_channels": out_channels,
                    **{k: round(v, 2) for k, v in seconds.items()},
                    "speedup": round(seconds["pytorch_choice_ms"] / seconds["onednn_ms"], 2),
                    "max_abs_diff": diff,
                }
            )
        vae = build_model("video_vae", "tiny").eval()
        z = torch.randn(1, vae.config.latent_channels, 8, 8, 8)
        fast_frames = vae.from_latents(z)
        fast = best_of(lambda: vae.from_latents(z), calls=2)
        original = Conv3d._conv_forward
        Conv3d._conv_forward = nn.Conv3d._conv_forward  # PyTorch's own kernel choice
        try:
            slow_frames = vae.from_latents(z)
            slow = best_of(lambda: vae.from_latents(z), calls=2)
        finally:
            Conv3d._conv_forward = original
    result = {
        "name": "vae_decode_cpu_onednn_speedup",
        "value": round(slow / fast, 2),
        "unit": "x",
        "goal": 2.0,
        "better": "higher",
        "detail": {
            "latents": list(z.shape),
            "decode_s_onednn": round(fast, 4),
            "decode_s_pytorch_choice": round(slow, 4),
            "frames_max_abs_diff": (fast_frames - slow_frames).abs().max().item(),
            "threads": 1,
            "convolutions": convs,
        },
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
