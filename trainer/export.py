"""`lvd export`: a run's checkpoint (any ZeRO stage) -> a pipeline folder laid out like diffusers'
(the format of common/pipeline_folder.py).

Every network folder loads with `model_zoo.from_pretrained(OUT/<component>)`, without deepspeed.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch

import model_zoo
from common.config import from_dict
from common.files import replacing_folder
from common.pipeline_folder import FlowSchedulerSpec, SchedulerSpec, write_index
from model_zoo.lora import merged_state, save_adapter
from trainer import checkpoint
from trainer.config import (
    AutoencoderObjective,
    CMDAutoencoderObjective,
    DiffusionConfig,
    DiffusionObjective,
    LVDMInterpolationObjective,
    LVDMPredictionObjective,
    TemporalDecoderObjective,
    TrainJobConfig,
    upgrade_resolved_config,
)
from trainer.ema import assemble
from trainer.engine import consolidated_state_dict
from trainer.export_cli import LATENT_SCALE_CLIPS
from trainer.lora import adapter_of, rebuilt_base
from trainer.tasks import TASKS
from trainer.tasks.lvdm import no_condition_level


def export(
    run_dir: Path,
    out: Path,
    *,
    step: int | None = None,
    ema: bool = False,
    latent_scale_clips: int = LATENT_SCALE_CLIPS,
    merge: bool = False,
    lora_formats: tuple[str, ...] = ("peft",),
) -> Path:
    """Write the pipeline folder of a run's checkpoint. The `autoencoder` task's latent scale and
    shift are fitted on `latent_scale_clips` of its training clips (0: keep the configured ones).
    A LoRA run writes its adapter (in `lora_formats`) and, with `merge`, beside it the pipeline
    folder whose denoiser is the base with the adapter merged in."""
    ckpt_dir = run_dir / "checkpoints"
    tag = checkpoint.tag_for(step) if step is not None else checkpoint.latest_tag(ckpt_dir)
    if tag is None or not checkpoint.is_complete(ckpt_dir, tag):
        raise FileNotFoundError(f"{ckpt_dir}: no complete checkpoint" + (f" for step {step}" if step is not None else ""))
    meta = json.loads((ckpt_dir / tag / "meta.json").read_text())
    cfg: TrainJobConfig = from_dict(TrainJobConfig, upgrade_resolved_config(meta["config"]))
    task = cfg.objective.task
    names = TASKS[task].components
    # The pixel clip size the run trained on: `lvd sample`'s default height and width.
    sample_size = {"frames": cfg.data.frames, "height": cfg.data.height, "width": cfg.data.width}
    entries: dict[str, Any] = {"source": str(ckpt_dir / tag), "step": meta["step"], "ema": ema, "sample_size": sample_size}
    components: dict[str, str] = {}
    with replacing_folder(out) as folder:
        for engine_name in meta["engines"]:
            state = consolidated_state_dict(ckpt_dir / tag, engine_name)
            if ema and engine_name == "model":
                state = {**state, **_ema_weights(ckpt_dir, tag, meta["world_size"])}
            if cfg.train.lora.enabled and engine_name == "model":
                adapter = adapter_of(state, cfg.train.lora, meta.get("lora_base") or {})
                save_adapter(adapter, folder, formats=lora_formats)
                if not merge:
                    return out
                state = merged_state(rebuilt_base(cfg, meta, where=f"lvd export of {run_dir}").state_dict(), adapter)
            name = names.get(engine_name, engine_name)
            stats = latent_scale_clips if task == "autoencoder" and engine_name == "model" else 0
            components[name], latent_stats = _write_component(run_dir, cfg, engine_name, state, folder / name, stats)
            if latent_stats is not None:
                entries["latent_stats"] = latent_stats
        for frozen in sorted((run_dir / "frozen").glob("*/config.json")):
            shutil.copytree(frozen.parent, folder / frozen.parent.name)
            components[frozen.parent.name] = json.loads(frozen.read_text())["_family"]
        if isinstance(cfg.objective, LVDMPredictionObjective | LVDMInterpolationObjective):
            entries["uncond_level"] = no_condition_level(cfg.objective.conditioning)  # the ε_u encoding training used
            entries["frame_stride"] = list(cfg.data.stride_bounds())  # the hierarchical sampler's keyframe stride
        if isinstance(cfg.objective, DiffusionObjective) and cfg.objective.image_rate > 0:
            entries["image_conditioning"] = {"kind": "first_frame_concat", "rate": cfg.objective.image_rate}
        diffusion = not isinstance(cfg.objective, AutoencoderObjective | CMDAutoencoderObjective | TemporalDecoderObjective)
        scheduler = None
        if isinstance(cfg.objective, DiffusionObjective) and cfg.objective.name == "flow_matching":
            scheduler = flow_scheduler_spec(cfg.objective)
        elif diffusion:
            scheduler = scheduler_spec(cfg.objective.diffusion)
        write_index(folder, task=task, components=components, scheduler=scheduler, entries=entries)
    return out


def _write_component(
    run_dir: Path, cfg: TrainJobConfig, engine_name: str, state: dict[str, torch.Tensor], out: Path, scale_clips: int
) -> tuple[str, dict[str, float] | None]:
    """Rebuild the trained module from the config the run recorded and save it with its weights
    (a VAE with its latent scale and shift fitted on `scale_clips` training clips, when > 0)."""
    structure = run_dir / "trained" / engine_name
    if structure.is_dir():
        module = model_zoo.build_from_config(model_zoo.load_config(structure))
    else:  # a run from before trained/ was recorded: rebuild the whole task
        from trainer.tasks import build_task

        module = build_task(cfg, torch.device("cpu")).trained[engine_name]
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{run_dir}: checkpoint of {engine_name!r} does not match the model: missing={missing[:5]} unexpected={unexpected[:5]}")
    latent_stats = None
    if scale_clips > 0:
        latent_stats = fit_latent_scale(module, cfg, scale_clips)
        module.config = dataclasses.replace(
            module.config, scale_factor=latent_stats["scale_factor"], shift_factor=latent_stats["shift_factor"]
        )
    model_zoo.save_pretrained(module, out)
    return module.family, latent_stats


@torch.no_grad()
def fit_latent_scale(vae: torch.nn.Module, cfg: TrainJobConfig, num_clips: int) -> dict[str, float]:
    """Shift and scale that give the VAE's posterior samples of `num_clips` training clips zero
    mean and unit variance, so that the diffusion latents match the N(0, I) the samplers start
    from (the scale-by-std rule of latent diffusion, with a shift as in later VAEs)."""
    from data_pipeline.loader import build_loader

    data = dataclasses.replace(cfg.data, workers=0)  # a few batches: no worker processes
    loader = build_loader(data, rank=0, world_size=1, batch_size=cfg.train.micro_batch_size, seed=cfg.train.seed, tokenizer=None)
    generator = torch.Generator().manual_seed(cfg.train.seed)
    vae.eval()
    latents, seen = [], 0
    while seen < num_clips:
        video = next(loader)["video"]
        latents.append(vae.encode(video).sample(generator).flatten())
        seen += video.shape[0]
    values = torch.cat(latents).double()
    std = float(values.std())
    if not std > 0:
        raise ValueError(f"latent scale: the VAE's latents of {seen} clips have std {std}; is the VAE trained?")
    return {"scale_factor": 1.0 / std, "shift_factor": float(values.mean()), "clips": seen}


def _ema_weights(ckpt_dir: Path, tag: str, world_size: int) -> dict[str, torch.Tensor]:
    states = [checkpoint.read_rank_state(ckpt_dir, tag, rank).ema for rank in range(world_size)]
    if states[0] is None:
        raise ValueError(f"{ckpt_dir / tag}: the run kept no EMA (train.ema_decay was 0)")
    return assemble(states)


def scheduler_spec(obj: DiffusionConfig) -> SchedulerSpec:
    """The DDIM schedule a sampler uses with the networks trained under `obj`."""
    return SchedulerSpec(
        schedule=obj.schedule,
        parameterization=obj.parameterization,
        num_train_timesteps=obj.num_timesteps,
        beta_start=obj.beta_start,
        beta_end=obj.beta_end,
    )


def flow_scheduler_spec(obj: DiffusionObjective) -> FlowSchedulerSpec:
    """The flow-matching schedule (time scale and shift) a sampler uses with a network trained under `obj`."""
    flow = obj.flow
    return FlowSchedulerSpec(
        num_train_timesteps=obj.diffusion.num_timesteps,
        shift=flow.shift,
        shift_from_tokens=flow.shift_from_tokens,
        base_tokens=flow.base_tokens,
        max_tokens=flow.max_tokens,
        base_log_shift=flow.base_log_shift,
        max_log_shift=flow.max_log_shift,
    )
