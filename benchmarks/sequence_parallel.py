"""Per-rank activation memory and step time of Ulysses sequence parallelism, SP=1 against SP=2.

    python -m benchmarks.sequence_parallel [--tokens 8192] [--repeats 3] [--ring]

A narrow video_dit (width 64, 4 heads, 2 blocks) on one clip of `--tokens` tokens (8 latent
frames, square latent grid): one forward + backward per measurement, SP=1 in one process, SP=2 on
2 gloo ranks (real all-to-all). Activation memory is what autograd keeps for the backward: the
bytes of the distinct storages saved by the forward (`torch.autograd.graph.saved_tensors_hooks`),
read on each rank; it is what sequence parallelism divides (the weights are the same on every
rank). The step time is the forward + backward wall time (the slowest rank). Each figure is the
median of `--repeats` runs; the ideal per-rank ratio of SP=2 to SP=1 is 0.5, the goal is <= 0.6.
With `--ring`, a third row: ring attention over the same 2 ranks (train.sp_ring=2; keys and values
passed by point-to-point sends), measured the same way.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
FRAMES = 8
"""Latent frames of the clip; the latent grid is square, patches (1, 2, 2)."""
RATIO_GOAL = 0.6
MODEL = dict(hidden_size=64, num_heads=4, depth=2, context_dim=32, context_tokens=8, mlp="swiglu")


def _clip(tokens: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.nn.Module]:
    from model_zoo import build_model

    side = 2 * math.isqrt(tokens // FRAMES)
    torch.manual_seed(0)
    model = build_model("video_dit", "tiny", **MODEL)
    x = torch.randn(1, model.config.in_channels, FRAMES, side, side)
    return x, model.example_inputs(x), model


def _step(model: torch.nn.Module, x: torch.Tensor, kwargs: dict[str, torch.Tensor]) -> tuple[int, float]:
    """(bytes saved for backward, seconds) of one forward + backward."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device.type != "meta":
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(x, **kwargs)
    out.float().square().mean().backward()
    return sum(storages.values()), time.perf_counter() - start


def _rank(rank: int, port: int, tokens: int, ring: int, results: dict) -> None:
    import torch.distributed as dist

    from model_zoo.layers.sequence_parallel import apply_ulysses
    from trainer.sequence_parallel import SequenceParallelGroups, group_collectives

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        x, kwargs, model = _clip(tokens)
        if ring == 1:
            apply_ulysses(model, group_collectives(dist.group.WORLD, rank, 2))
        else:
            SequenceParallelGroups.build(rank, 2, 2, ring, timeout=datetime.timedelta(minutes=30)).apply(model)
        dist.barrier()
        saved, seconds = _step(model, x, kwargs)
        results[rank] = (saved, seconds)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure(tokens: int, sp: int, ring: int = 1) -> dict[str, float]:
    """Per-rank saved bytes (the largest rank's) and step seconds (the slowest rank's) of one step
    (`ring`: the ring degree of SP=2, 1 for Ulysses)."""
    if sp == 1:
        x, kwargs, model = _clip(tokens)
        saved, seconds = _step(model, x, kwargs)
        return {"saved_bytes": saved, "seconds": seconds}
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(_free_port(), tokens, ring, results), nprocs=2, join=True)
        per_rank = dict(results)
    return {"saved_bytes": max(r[0] for r in per_rank.values()), "seconds": max(r[1] for r in per_rank.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192, help="tokens of the clip (8 frames x a square grid)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per SP degree; the median is reported")
    parser.add_argument("--ring", action="store_true", help="also ring attention over the 2 ranks (sp_ring=2)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = {1: (1, 1), 2: (2, 1), **({"ring2": (2, 2)} if args.ring else {})}
    runs = {row: [measure(args.tokens, sp, ring) for _ in range(args.repeats)] for row, (sp, ring) in rows.items()}
    median = {
        sp: {key: statistics.median(run[key] for run in values) for key in ("saved_bytes", "seconds")}
        for sp, values in runs.items()
    }
    ratio = median[2]["saved_bytes"] / median[1]["saved_bytes"]
    extra = {}
    if args.ring:
        extra["ring2"] = {
            "activation_mb_per_rank": round(median["ring2"]["saved_bytes"] / 2**20, 1),
            "step_s": round(median["ring2"]["seconds"], 2),
            "ratio_to_sp1": round(median["ring2"]["saved_bytes"] / median[1]["saved_bytes"], 3),
        }
    print(json.dumps({
        "name": "sequence_parallel_activation_ratio",
        "value": round(ratio, 3),
        "unit": "SP=2 per-rank activation bytes / SP=1",
        "goal": RATIO_GOAL,
        "better": "lower",
        "ceiling": 0.5,
        "tokens": args.tokens,
        "model": {"family": "video_dit", **MODEL},
        "sp1": {"activation_mb": round(median[1]["saved_bytes"] / 2**20, 1), "step_s": round(median[1]["seconds"], 2)},
        "sp2": {"activation_mb_per_rank": round(median[2]["saved_bytes"] / 2**20, 1), "step_s": round(median[2]["seconds"], 2)},
        **extra,
        "repeats": args.repeats,
        "torch_threads": 1,
    }))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
