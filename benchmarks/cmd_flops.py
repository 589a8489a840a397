"""CMD's efficiency claim, measured: FLOPs and wall time to generate one clip with CMD against a
full 3-D-latent DiT at the same resolution and frame count (prints JSON).

CMD (docs/methods.md, 'CMD: sampling'): the content model's DDIM run on one image (the content
frame's space-to-depth), the motion DiT's DDIM run on the packed motion latent, one decoding by the
CMD autoencoder, through the strategy's own `chunk`. The baseline: the `diffusion` task's DiT on
the tiny video VAE's 3-D latents of the same clip (`ddim.sample_window`), then the VAE's decoding.
Both at the tiny flavours (the DiTs are the same size), with the same DDIM steps and text
classifier-free guidance (two network calls per step), on random weights: FLOPs and time do not
depend on the values. FLOPs are counted by `model_zoo.counting.flop_counter` over the whole
generation with the networks on the `meta` device (matmuls, convolutions, attention; on CPU the
oneDNN 3-D convolutions of the VAE would go uncounted); time is the best of a few CPU runs on one
thread.
The paper reports about 16.7x fewer FLOPs; the goal here is >= 5x at the tiny size.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.cmd_flops
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable

import torch

import model_zoo
from model_zoo.cmd import (
    content_condition,
    content_model_config,
    motion_grid,
    motion_model_config,
    unpack_motion,
    unpatchify_content,
)
from model_zoo.counting import flop_counter
from model_zoo.diffusion.guidance import cfg
from model_zoo.diffusion.schedules import alphas_cumprod, ddim_timesteps, make_betas
from sampler.strategies import cmd, ddim
from sampler.strategies.common import SamplingSetup

FRAMES, SIZE, STEPS, GUIDANCE = 16, 128, 50, 7.5
"""One clip of 16 frames at 128 x 128, 50 DDIM steps, guidance 7.5."""
ROUNDS = 3
"""Timed generations per method (the fastest counts)."""


def guided(model: torch.nn.Module, context: torch.Tensor, empty: torch.Tensor, **cond: torch.Tensor) -> Callable:
    return cfg(lambda x, t: model(x, t, context=context, **cond), lambda x, t: model(x, t, context=empty, **cond), GUIDANCE)


def setup(frame_shape: tuple[int, int, int, int], device: str) -> SamplingSetup:
    """The DDIM run (the schedule on the CPU; the latents on `device`)."""
    with torch.device("cpu"):
        betas = make_betas("sqrt_linear", 1000, beta_start=0.00085, beta_end=0.012)
        return SamplingSetup(
            timesteps=ddim_timesteps(1000, STEPS), alphas_cumprod=alphas_cumprod(betas), frame_shape=frame_shape, device=device
        )


def cmd_generator(text: torch.nn.Module, context: torch.Tensor, empty: torch.Tensor, device: str) -> Callable[[], torch.Tensor]:
    autoencoder = model_zoo.build_model("cmd", "tiny").eval()
    config, dim = autoencoder.config, text.config.context_dim
    content = model_zoo.build_from_config(content_model_config(config, "tiny", context_dim=dim)).eval()
    motion = model_zoo.build_from_config(motion_model_config(config, "tiny", context_dim=dim)).eval()
    p, rows = config.patch_size, SIZE // config.patch_size
    content_setup = setup((1, 3 * p * p, rows, rows), device)
    motion_setup = setup((1, *motion_grid(config, SIZE, SIZE)), device)

    def generate() -> torch.Tensor:
        clip, _ = cmd.chunk(
            guided(content, context, empty),
            lambda patches: unpatchify_content(patches, p),
            lambda image: guided(motion, context, empty, cond_frame=content_condition(image, p)),
            lambda image, packed: autoencoder.decode(image, unpack_motion(packed, rows)),
            0, None, FRAMES, content_setup=content_setup, setup=motion_setup, config=cmd.CMDSamplingConfig(), seed=0,
        )
        return clip

    return generate


def baseline_generator(text: torch.nn.Module, context: torch.Tensor, empty: torch.Tensor, device: str) -> Callable[[], torch.Tensor]:
    vae = model_zoo.build_model("video_vae", "tiny").eval()
    ft, fh, fw = vae.downsample_factors
    channels = vae.latent_channels
    dit = model_zoo.build_model("dit", "tiny", in_channels=channels, context_dim=text.config.context_dim, cond_channels=0).eval()
    latent_setup = setup((1, channels, SIZE // fh, SIZE // fw), device)

    def generate() -> torch.Tensor:
        latents = ddim.sample_window(guided(dit, context, empty), 0, FRAMES // ft, setup=latent_setup, seed=0)
        return vae.from_latents(latents)

    return generate


Builder = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, str], Callable[[], torch.Tensor]]


def measure(build: Builder) -> dict[str, float]:
    """GFLOPs of one generation (networks on `meta`) and its best CPU time."""
    counter = flop_counter()
    with torch.device("meta"):
        text = model_zoo.build_model("text_encoder", "tiny")
        context = torch.randn(1, text.config.context_length, text.config.context_dim)
        generate = build(text, context, context, "meta")
    with counter:
        clip = generate()
    assert clip.shape == (1, 3, FRAMES, SIZE, SIZE), clip.shape
    text = model_zoo.build_model("text_encoder", "tiny").eval()
    generate = build(text, text.encode_prompts(["a red bicycle"]), text.encode_prompts([""]), "cpu")
    best = float("inf")
    for _ in range(ROUNDS):
        start = time.perf_counter()
        generate()
        best = min(best, time.perf_counter() - start)
    return {"gflops": counter.get_total_flops() / 1e9, "seconds": best, "by_module": _by_module(counter)}


def _by_module(counter: torch.utils.flop_counter.FlopCounterMode) -> dict[str, float]:
    """GFLOPs of the top-level modules (the networks), as the counter attributes them."""
    counts = counter.get_flop_counts()
    return {name: round(sum(per_op.values()) / 1e9, 3) for name, per_op in counts.items() if name != "Global" and "." not in name}


def main() -> int:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    with torch.no_grad():
        ours = measure(cmd_generator)
        full = measure(baseline_generator)
    result = {
        "name": "cmd_vs_3d_latent_dit_flops_ratio",
        "value": round(full["gflops"] / ours["gflops"], 2),
        "unit": "x fewer FLOPs per clip",
        "goal": 5.0,
        "better": "higher",
        "detail": {
            "clip": {"frames": FRAMES, "height": SIZE, "width": SIZE, "ddim_steps": STEPS, "guidance": GUIDANCE},
            "cmd": {k: round(v, 3) if isinstance(v, float) else v for k, v in ours.items()},
            "dit_3d_latent": {k: round(v, 3) if isinstance(v, float) else v for k, v in full.items()},
            "time_ratio": round(full["seconds"] / ours["seconds"], 2),
            "threads": 1,
        },
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
