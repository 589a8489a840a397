"""Tiny random pipelines in `lvd export`'s layout, for tests, benchmarks and smoke runs.

Zero-initialised layers (output heads, CAM's projections, APM's α) are filled with small random
values so the untrained networks actually depend on their inputs and conditioning.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import model_zoo
from common.pipeline_folder import FlowSchedulerSpec, SchedulerSpec
from model_zoo.cmd import content_model_config, motion_model_config
from sampler.pipeline import TINY_SCHEDULER, save_pipeline

TASK_DENOISERS = {
    "diffusion": ("unet3d", {}),
    "lvdm_prediction": ("unet3d", {"in_channels": 5, "num_levels": 252}),
    "lvdm_interpolation": ("unet3d", {"in_channels": 5, "num_levels": 252}),
    "videofusion": ("videofusion", {}),
    "streaming": ("streaming_t2v", {}),
}
"""Denoiser family and overrides of each task's tiny pipeline (LVDM: latent + mask channel)."""


def wake_zero_parameters(module: nn.Module, seed: int, scale: float = 0.05) -> nn.Module:
    """Fill every all-zero parameter with N(0, scale²) from a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            if not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return module


def tiny_pipeline(
    folder: str | Path,
    task: str,
    *,
    seed: int = 0,
    vae: str = "video_vae",
    scheduler: SchedulerSpec | FlowSchedulerSpec = TINY_SCHEDULER,
    denoiser: str | None = None,
) -> Path:
    """A pipeline folder for `task` with tiny random networks (latents: 4 channels, /4 in space);
    a `FlowSchedulerSpec` makes it a flow-matching export; `denoiser` names another family (e.g. dit)."""
    if task not in TASK_DENOISERS:
        raise ValueError(f"unknown task {task!r}; valid: {', '.join(TASK_DENOISERS)}")
    family, overrides = TASK_DENOISERS[task]
    if denoiser is not None:
        family, overrides = denoiser, {}
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        networks = {
            "denoiser": wake_zero_parameters(model_zoo.build_model(family, "tiny", **overrides), seed),
            "vae": model_zoo.build_model(vae, "tiny"),
            "text_encoder": model_zoo.build_model("text_encoder", "tiny"),
        }
        if task == "streaming":
            networks["image_encoder"] = model_zoo.build_model("image_encoder", "tiny")
    uncond_level = 251 if task.startswith("lvdm_") else None  # s in 0..250, then "no condition"
    return save_pipeline(folder, task, networks, scheduler=scheduler, uncond_level=uncond_level)


def tiny_cmd_pipeline(folder: str | Path, *, seed: int = 0, clip_frames: int = 4) -> Path:
    """A `cmd` bundle (`lvd export` of CMD's three stages) of tiny random networks, trained-size
    clips of `clip_frames` frames."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        autoencoder = model_zoo.build_model("cmd", "tiny")
        text_encoder = model_zoo.build_model("text_encoder", "tiny")
        context_dim = text_encoder.config.context_dim
        content = content_model_config(autoencoder.config, "tiny", context_dim=context_dim)
        networks = {
            "denoiser": wake_zero_parameters(model_zoo.build_from_config(motion_model_config(autoencoder.config, "tiny", context_dim=context_dim)), seed),
            "content_denoiser": wake_zero_parameters(model_zoo.build_from_config(content), seed + 1),
            "vae": autoencoder,
            "text_encoder": text_encoder,
        }
    return save_pipeline(
        folder, "cmd", networks,
        extra_schedulers={"content_scheduler": TINY_SCHEDULER}, entries={"sample_size": {"frames": clip_frames}},
    )
