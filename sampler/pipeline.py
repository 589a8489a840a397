"""Load (and, for tests and benchmarks, write) the exported pipeline folder of `lvd export`.

    DIR/model_index.json                 {"task": ..., "<component>": ["model_zoo", family], ...}
    DIR/<component>/                     config.json + model.safetensors (denoiser, vae, text_encoder, image_encoder)
    DIR/scheduler/scheduler_config.json  a diffusers DDIMScheduler config

The scheduler's `beta_schedule` uses diffusers' names ("scaled_linear" is our `sqrt_linear`,
"squaredcos_cap_v2" is `cosine`) and `prediction_type` epsilon | v_prediction | sample.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import model_zoo
from model_zoo.diffusion.objectives import Parameterization
from model_zoo.diffusion.schedules import BetaScheduleKind, alphas_cumprod, ddim_timesteps, make_betas

BETA_SCHEDULES: dict[str, BetaScheduleKind] = {
    "linear": "linear",
    "scaled_linear": "sqrt_linear",
    "squaredcos_cap_v2": "cosine",
}
PARAMETERIZATIONS: dict[str, Parameterization] = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
NETWORK_COMPONENTS = ("denoiser", "vae", "text_encoder", "image_encoder")
TEXT_CACHE_SIZE = 8
"""Prompts whose text tokens a pipeline keeps (a prompt and the empty one per video, a few videos)."""


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """The diffusion schedule of a pipeline, read from its DDIMScheduler config."""

    alphas_cumprod: Tensor
    """ᾱ_t, shape (T,), float64."""
    parameterization: Parameterization
    """What the denoiser predicts."""
    steps_offset: int
    """Offset of the leading DDIM timestep spacing."""
    final_alpha_cumprod: float
    """ᾱ after the last step (1.0 with `set_alpha_to_one`, else ᾱ_0)."""

    def timesteps(self, num_steps: int) -> Tensor:
        return ddim_timesteps(len(self.alphas_cumprod), num_steps, steps_offset=self.steps_offset)


@dataclass(frozen=True, kw_only=True)
class Pipeline:
    """The networks and schedule of one exported pipeline folder, in eval mode on one device."""

    path: Path
    """The folder it was loaded from."""
    task: str
    """model_index.json's task (diffusion, lvdm_prediction, lvdm_interpolation, streaming, ...)."""
    networks: dict[str, nn.Module]
    """denoiser, vae and, when present, text_encoder and image_encoder."""
    schedule: Schedule
    """The DDIM schedule."""
    model_id: dict[str, Any]
    """What identifies the models: folder, task, source checkpoint, and a hash per component config."""
    uncond_level: int | None = None
    """LVDM masked networks: the perturbation-level class training used for samples without any
    mask (the unconditional branch ε_u); None for networks without a level embedding."""
    text_cache: dict[str, Tensor] = field(default_factory=dict, repr=False, compare=False)
    """Text tokens of the last `TEXT_CACHE_SIZE` prompts (StreamingT2V asks for them every chunk)."""

    @property
    def denoiser(self) -> nn.Module:
        return self.networks["denoiser"]

    @property
    def vae(self) -> nn.Module:
        return self.networks["vae"]

    def text_context(self, prompt: str) -> Tensor | None:
        """Text tokens (1, 77, D) of `prompt`, or None when the pipeline has no text encoder."""
        encoder = self.networks.get("text_encoder")
        if encoder is None:
            return None
        if prompt not in self.text_cache:
            if len(self.text_cache) >= TEXT_CACHE_SIZE:
                del self.text_cache[next(iter(self.text_cache))]  # the oldest
            self.text_cache[prompt] = encoder.encode_prompts([prompt])
        return self.text_cache[prompt]


def vae_factors(vae: nn.Module) -> tuple[int, int, int]:
    """(time, height, width) downsampling of a VAE: 3-D `video_vae` or frame-wise `temporal_decoder_vae`."""
    if vae.family == "video_vae":
        return tuple(vae.config.downsample)
    if vae.family == "temporal_decoder_vae":
        spatial = 2 ** (len(vae.config.block_out_channels) - 1)
        return (1, spatial, spatial)
    raise ValueError(f"unsupported VAE family {vae.family!r}: expected video_vae or temporal_decoder_vae")


def read_schedule(path: Path) -> Schedule:
    config = json.loads((path / "scheduler_config.json").read_text())
    kind = config.get("beta_schedule", "linear")
    if kind not in BETA_SCHEDULES:
        raise ValueError(f"{path}: unsupported beta_schedule {kind!r}; valid: {', '.join(BETA_SCHEDULES)}")
    betas = make_betas(
        BETA_SCHEDULES[kind],
        config.get("num_train_timesteps", 1000),
        beta_start=config.get("beta_start", 0.0001),
        beta_end=config.get("beta_end", 0.02),
    )
    cumprod = alphas_cumprod(betas)
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PARAMETERIZATIONS:
        raise ValueError(f"{path}: unsupported prediction_type {prediction!r}")
    return Schedule(
        alphas_cumprod=cumprod,
        parameterization=PARAMETERIZATIONS[prediction],
        steps_offset=config.get("steps_offset", 0),
        final_alpha_cumprod=1.0 if config.get("set_alpha_to_one", True) else float(cumprod[0]),
    )


def load_pipeline(folder: str | Path, *, device: str = "cpu") -> Pipeline:
    """Every network component of `folder` (eval, no grad) and its schedule."""
    path = Path(folder)
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(f"{path}: no model_index.json (expected a folder written by `lvd export`)")
    index = json.loads(index_file.read_text())
    for required in ("denoiser", "vae"):
        if required not in index:
            raise ValueError(f"{index_file}: no {required!r} component")
    networks = {
        name: model_zoo.from_pretrained(path / name, device=device).eval().requires_grad_(False)
        for name in NETWORK_COMPONENTS
        if name in index
    }
    model_id = {
        "path": str(path.resolve()),
        "task": index.get("task"),
        "source": index.get("source"),
        "step": index.get("step"),
        "components": {
            name: hashlib.sha256((path / name / "config.json").read_bytes()).hexdigest()[:16]
            for name in networks
        },
    }
    task = index.get("task", "diffusion")
    uncond_level = index.get("uncond_level")
    has_levels = getattr(networks["denoiser"], "level_embed", None) is not None
    if task.startswith("lvdm_") and has_levels and uncond_level is None:
        raise ValueError(
            f"{index_file}: an LVDM export without 'uncond_level': it was trained before samples "
            "without any mask had their own perturbation-level class, so its unconditional branch "
            "would see an input training never gave it; retrain it"
        )
    return Pipeline(
        path=path,
        task=task,
        uncond_level=uncond_level if has_levels else None,
        networks=networks,
        schedule=read_schedule(path / "scheduler"),
        model_id=model_id,
    )


def save_pipeline(
    folder: str | Path,
    task: str,
    networks: dict[str, nn.Module],
    *,
    beta_schedule: str = "scaled_linear",
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    prediction_type: str = "epsilon",
    uncond_level: int | None = None,
) -> Path:
    """Write a pipeline folder in `lvd export`'s layout (tiny pipelines for tests and benchmarks)."""
    path = Path(folder)
    index: dict[str, Any] = {"_class_name": "LVDPipeline", "task": task}
    if uncond_level is not None:
        index["uncond_level"] = uncond_level
    for name, module in networks.items():
        model_zoo.save_pretrained(module, path / name)
        index[name] = ["model_zoo", module.family]
    scheduler = {
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": 1000,
        "beta_start": beta_start,
        "beta_end": beta_end,
        "beta_schedule": beta_schedule,
        "prediction_type": prediction_type,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "timestep_spacing": "leading",
    }
    (path / "scheduler").mkdir(parents=True, exist_ok=True)
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n")
    index["scheduler"] = ["diffusers", "DDIMScheduler"]
    (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return path


@torch.no_grad()
def anchor_embedding(pipeline: Pipeline, frame: Tensor) -> Tensor:
    """StreamingT2V's APM anchor: the CLIP image embedding (B, D) of a pixel frame (B, 3, H, W)."""
    encoder = pipeline.networks.get("image_encoder")
    if encoder is None:
        raise ValueError(f"{pipeline.path}: the streaming strategy needs an image_encoder component")
    return encoder(frame)[:, 0]  # (B, 1, D) -> (B, D)
