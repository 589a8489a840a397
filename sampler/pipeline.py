"""Load (and, for tests and benchmarks, write) a pipeline folder, the format of
common/pipeline_folder.py that `lvd export` writes: its networks on one device and its schedule."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import model_zoo
from common.files import replacing_folder
from common.pipeline_folder import (
    NETWORK_COMPONENTS,
    FlowSchedulerSpec,
    SchedulerSpec,
    read_index,
    write_index,
)
from model_zoo.diffusion.objectives import Parameterization
from model_zoo.diffusion.schedules import alphas_cumprod, ddim_timesteps, make_betas
from model_zoo.lora import apply_adapter, load_adapter

TINY_SCHEDULER = SchedulerSpec(
    schedule="sqrt_linear", parameterization="eps", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012
)
"""The schedule `save_pipeline` writes by default: Stable Diffusion's (scaled_linear 0.00085 -> 0.012, ε)."""
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
    """denoiser, vae and, when present, text_encoder, image_encoder and (CMD) content_denoiser."""
    schedule: Schedule | FlowSchedulerSpec
    """The DDIM schedule, or a flow-matching model's time scale and shift."""
    content_schedule: Schedule | None = None
    """CMD bundles: the content-frame model's DDIM schedule (`content_scheduler`)."""
    model_id: dict[str, Any]
    """What identifies the models: folder, task, source checkpoint, and a hash per component config."""
    uncond_level: int | None = None
    """LVDM masked networks: the perturbation-level class training used for samples without any
    mask (the unconditional branch ε_u); None for networks without a level embedding."""
    frame_strides: tuple[int, int] | None = None
    """LVDM exports: the (lowest, highest) frame stride of the clips the denoiser was trained on
    (model_index.json's 'frame_stride'); None when the export does not record it."""
    trained_size: tuple[int, int] | None = None
    """(height, width) of the clips the denoiser was trained on (model_index.json's 'sample_size');
    None when the export does not record it."""
    image_conditioning: bool = False
    """The denoiser takes first-frame image conditioning channels (model_index.json's
    'image_conditioning', from a `diffusion` run with `objective.image_rate` > 0)."""
    text_cache: dict[str, Tensor] = field(default_factory=dict, repr=False, compare=False)
    """Text tokens of the last `TEXT_CACHE_SIZE` prompts (StreamingT2V asks for them every chunk)."""

    @property
    def denoiser(self) -> nn.Module:
        return self.networks["denoiser"]

    @property
    def vae(self) -> nn.Module:
        return self.networks["vae"]

    @property
    def objective(self) -> str:
        """What the denoiser was trained with: diffusion (ε/v/x0) or flow_matching."""
        return "flow_matching" if isinstance(self.schedule, FlowSchedulerSpec) else "diffusion"

    @property
    def num_train_timesteps(self) -> int:
        """T of the denoiser's time input."""
        if isinstance(self.schedule, FlowSchedulerSpec):
            return self.schedule.num_train_timesteps
        return len(self.schedule.alphas_cumprod)

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

    def text_inputs(self, prompt: str) -> dict[str, Tensor]:
        """The denoiser's text keywords for `prompt`: {} without a text encoder, else its `context`
        (1, L, D) and, for a variable-length (T5) encoder, `context_mask` (1, L) bool of its real tokens."""
        context = self.text_context(prompt)
        if context is None:
            return {}
        encoder = self.networks["text_encoder"]
        mask = encoder.token_mask(encoder.tokenize([prompt]))
        return {"context": context} if mask is None else {"context": context, "context_mask": mask}


def recorded_frame_strides(entries: dict[str, Any]) -> tuple[int, int] | None:
    """(lowest, highest) training frame stride of an export's model_index.json entries, or None."""
    strides = entries.get("frame_stride")
    return None if strides is None else (int(strides[0]), int(strides[1]))


def recorded_size(entries: dict[str, Any]) -> tuple[int, int] | None:
    """(height, width) of the training clips in an export's model_index.json entries, or None."""
    size = entries.get("sample_size")
    return None if not size or "height" not in size else (int(size["height"]), int(size["width"]))


def vae_factors(vae: nn.Module) -> tuple[int, int, int]:
    """(time, height, width) downsampling of a VAE, as its family declares it."""
    return vae.downsample_factors


def latent_frames_for(vae: nn.Module, frames: int) -> int:
    """Latent frames whose decoding covers `frames` pixel frames: ceil(frames / ft), or for a causal
    VAE (one that declares `latent_frames`: 1 + ft·k frames <-> 1 + k latents) 1 + ceil((frames - 1) / ft)."""
    time_factor = vae_factors(vae)[0]
    if hasattr(vae, "latent_frames"):
        return 1 + math.ceil((frames - 1) / time_factor)
    return math.ceil(frames / time_factor)


def latent_channels(vae: nn.Module) -> int:
    """Channels of the latents the pipeline's denoiser works on, as the VAE's family declares them."""
    return vae.latent_channels


def _schedule(spec: SchedulerSpec | FlowSchedulerSpec) -> Schedule | FlowSchedulerSpec:
    if isinstance(spec, FlowSchedulerSpec):
        return spec
    betas = make_betas(spec.schedule, spec.num_train_timesteps, beta_start=spec.beta_start, beta_end=spec.beta_end)
    cumprod = alphas_cumprod(betas)
    return Schedule(
        alphas_cumprod=cumprod,
        parameterization=spec.parameterization,
        steps_offset=spec.steps_offset,
        final_alpha_cumprod=1.0 if spec.set_alpha_to_one else float(cumprod[0]),
    )


def load_pipeline(folder: str | Path, *, device: str = "cpu", lora: str | None = None, lora_scale: float = 1.0) -> Pipeline:
    """Every network component of `folder` (eval, no grad) and its schedule; `lora`: a LoRA adapter
    folder merged into the denoiser at `lora_scale` (its base must be this denoiser)."""
    index = read_index(folder)
    path, index_file = index.path, index.index_file
    for required in ("denoiser", "vae"):
        if required not in index.components:
            raise ValueError(f"{index_file}: no {required!r} component")
    if index.scheduler is None:
        raise ValueError(f"{index_file}: no scheduler (an exported autoencoder has none; sample with a diffusion export)")
    networks = {
        name: model_zoo.from_pretrained(path / name, device=device).eval().requires_grad_(False)
        for name in NETWORK_COMPONENTS
        if name in index.components
    }
    if lora is not None:
        adapter = load_adapter(lora)
        apply_adapter(networks["denoiser"], adapter, scale=lora_scale, where=f"--lora {lora} on {path / 'denoiser'}")
    model_id = {
        "path": str(path.resolve()),
        "task": index.task,
        "source": index.entries.get("source"),
        "step": index.entries.get("step"),
        "lora": None if lora is None else {"path": str(Path(lora).resolve()), "scale": lora_scale},
        "components": {
            name: hashlib.sha256((path / name / "config.json").read_bytes()).hexdigest()[:16]
            for name in networks
        },
    }
    task = index.task or "diffusion"
    uncond_level = index.entries.get("uncond_level")
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
        frame_strides=recorded_frame_strides(index.entries),
        trained_size=recorded_size(index.entries),
        image_conditioning="image_conditioning" in index.entries,
        networks=networks,
        schedule=_schedule(index.scheduler),
        content_schedule=_schedule(index.extra_schedulers["content_scheduler"]) if "content_scheduler" in index.extra_schedulers else None,
        model_id=model_id,
    )


def save_pipeline(
    folder: str | Path,
    task: str,
    networks: dict[str, nn.Module],
    *,
    scheduler: SchedulerSpec | FlowSchedulerSpec = TINY_SCHEDULER,
    uncond_level: int | None = None,
    extra_schedulers: dict[str, SchedulerSpec] | None = None,
    entries: dict[str, Any] | None = None,
) -> Path:
    """Write a pipeline folder of `networks` (tiny pipelines for tests and benchmarks)."""
    path = Path(folder)
    with replacing_folder(path) as tmp:
        for name, module in networks.items():
            model_zoo.save_pretrained(module, tmp / name)
        entries = (entries or {}) | ({} if uncond_level is None else {"uncond_level": uncond_level})
        families = {name: module.family for name, module in networks.items()}
        write_index(tmp, task=task, components=families, scheduler=scheduler, entries=entries, extra_schedulers=extra_schedulers)
    return path


@torch.no_grad()
def anchor_embedding(pipeline: Pipeline, frame: Tensor) -> Tensor:
    """StreamingT2V's APM anchor: the CLIP image embedding (B, D) of a pixel frame (B, 3, H, W)."""
    encoder = pipeline.networks.get("image_encoder")
    if encoder is None:
        raise ValueError(f"{pipeline.path}: the streaming strategy needs an image_encoder component")
    return encoder(frame)[:, 0]  # (B, 1, D) -> (B, D)
