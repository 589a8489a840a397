"""Our `unet3d` vs diffusers' `UNet3DConditionModel`: fwd+bwd time at matched parameter count.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.unet_vs_diffusers [--repeats 3]

Both networks get the same latent (1x4x8x32x32), timesteps and 77 text tokens of width 768,
and the same loss (mean square of the output); their fwd+bwd steps are timed interleaved in
one process, best of `repeats`; the value is the ratio of CPU times (one thread, so not
inflated by other processes on a shared machine), the wall-time ratio is in the detail. Matched layout: 2 ResNet blocks per level, spatial + temporal
attention with cross-attention at the first three levels (down factors 1, 2, 4), 8 heads
everywhere. Ours uses widths (64, 128, 256, 256), diffusers (64, 128, 224, 224), which puts
the parameter counts within 10% (ours is the larger: diffusers spends 4 temporal
convolutions per ResNet block where ours has one). The last stdout line is a JSON object;
goal: ours <= 0.8x diffusers' time.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch
from diffusers import UNet3DConditionModel

from benchmarks.mfu_cpu import best_times
from model_zoo import build_model, count_parameters

LATENT = (1, 4, 8, 32, 32)
CONTEXT_DIM = 768
OURS: dict[str, Any] = dict(
    model_channels=64,
    channel_mult=(1, 2, 4, 4),
    num_res_blocks=2,
    attention_resolutions=(1, 2, 4),
    num_heads=8,
    context_dim=CONTEXT_DIM,
)
DIFFUSERS: dict[str, Any] = dict(
    block_out_channels=(64, 128, 224, 224),
    layers_per_block=2,
    cross_attention_dim=CONTEXT_DIM,
    attention_head_dim=8,  # diffusers' UNet3D reads this as the number of heads
)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    ours = build_model("unet3d", "lvdm-t2v", **OURS)
    theirs = UNet3DConditionModel(**DIFFUSERS)
    x, t = torch.randn(LATENT), torch.tensor([500])
    context = torch.randn(LATENT[0], 77, CONTEXT_DIM)

    def ours_step() -> None:
        ours.zero_grad(set_to_none=True)
        ours(x, t, context=context).square().mean().backward()

    def diffusers_step() -> None:
        theirs.zero_grad(set_to_none=True)
        theirs(x, t, encoder_hidden_states=context).sample.square().mean().backward()

    times = best_times({"ours": ours_step, "diffusers": diffusers_step}, args.repeats)
    params = {"ours": count_parameters(ours), "diffusers": count_parameters(theirs)}
    if abs(params["ours"] / params["diffusers"] - 1) > 0.1:
        raise RuntimeError(f"parameter counts are not matched within 10%: {params}")
    result = {
        "name": "unet3d_vs_diffusers_fwd_bwd_time_ratio",
        "value": round(times["ours"]["cpu"] / times["diffusers"]["cpu"], 3),
        "unit": "ours / diffusers CPU time (1 thread)",
        "goal": 0.8,
        "better": "lower",
        "detail": {
            "cpu_seconds": {k: round(v["cpu"], 3) for k, v in times.items()},
            "wall_seconds": {k: round(v["wall"], 3) for k, v in times.items()},
            "ratio_by_wall_time": round(times["ours"]["wall"] / times["diffusers"]["wall"], 3),
            "params": params,
            "latent": list(LATENT),
            "ours": OURS,
            "diffusers": DIFFUSERS,
            "threads": torch.get_num_threads(),
        },
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
