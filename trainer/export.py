"""`lvd export`: a run's checkpoint (any ZeRO stage) -> a pipeline folder laid out like diffusers'.

    OUT/model_index.json              which component is which, the task, the source checkpoint
    OUT/<component>/config.json       + model.safetensors, for each network (denoiser, vae, ...)
    OUT/scheduler/scheduler_config.json   a diffusers DDIMScheduler config (loads with from_pretrained)

Every network folder loads with `model_zoo.from_pretrained(OUT/<component>)`, without deepspeed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

import model_zoo
from lvd.config import from_dict
from trainer import checkpoint
from trainer.config import ObjectiveConfig, TrainJobConfig
from trainer.ema import assemble
from trainer.engine import consolidated_state_dict
from trainer.tasks import TASKS

BETA_SCHEDULES = {"linear": "linear", "sqrt_linear": "scaled_linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def export(run_dir: Path, out: Path, *, step: int | None = None, ema: bool = False) -> Path:
    ckpt_dir = run_dir / "checkpoints"
    tag = checkpoint.tag_for(step) if step is not None else checkpoint.latest_tag(ckpt_dir)
    if tag is None or not checkpoint.is_complete(ckpt_dir, tag):
        raise FileNotFoundError(f"{ckpt_dir}: no complete checkpoint" + (f" for step {step}" if step is not None else ""))
    meta = json.loads((ckpt_dir / tag / "meta.json").read_text())
    cfg: TrainJobConfig = from_dict(TrainJobConfig, meta["config"])
    components = TASKS[cfg.train.task].components
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    index: dict[str, Any] = {"_class_name": "LVDPipeline", "task": cfg.train.task, "source": str(ckpt_dir / tag), "step": meta["step"], "ema": ema}
    # The pixel clip size the run trained on: `lvd sample`'s default height and width.
    index["sample_size"] = {"frames": cfg.data.frames, "height": cfg.data.height, "width": cfg.data.width}
    for engine_name in meta["engines"]:
        state = consolidated_state_dict(ckpt_dir / tag, engine_name)
        if ema and engine_name == "model":
            state = {**state, **_ema_weights(ckpt_dir, tag, meta["world_size"])}
        name = components.get(engine_name, engine_name)
        index[name] = ["model_zoo", _write_component(run_dir, cfg, engine_name, state, tmp / name)]
    for frozen in sorted((run_dir / "frozen").glob("*/config.json")):
        shutil.copytree(frozen.parent, tmp / frozen.parent.name)
        index[frozen.parent.name] = ["model_zoo", json.loads(frozen.read_text())["_family"]]
    if cfg.train.task not in ("autoencoder", "temporal_decoder"):
        _write_scheduler(cfg.objective, tmp / "scheduler")
        index["scheduler"] = ["diffusers", "DDIMScheduler"]
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _write_component(run_dir: Path, cfg: TrainJobConfig, engine_name: str, state: dict[str, torch.Tensor], out: Path) -> str:
    """Rebuild the trained module from the config the run recorded and save it with its weights."""
    structure = run_dir / "trained" / engine_name
    if structure.is_dir():
        module = model_zoo.build_from_config(model_zoo.load_config(structure))
    else:  # a run from before trained/ was recorded: rebuild the whole task
        from trainer.tasks import build_task

        module = build_task(cfg, torch.device("cpu")).trained[engine_name]
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{run_dir}: checkpoint of {engine_name!r} does not match the model: missing={missing[:5]} unexpected={unexpected[:5]}")
    model_zoo.save_pretrained(module, out)
    return module.family


def _ema_weights(ckpt_dir: Path, tag: str, world_size: int) -> dict[str, torch.Tensor]:
    states = [checkpoint.read_rank_state(ckpt_dir, tag, rank)["ema"] for rank in range(world_size)]
    if states[0] is None:
        raise ValueError(f"{ckpt_dir / tag}: the run kept no EMA (train.ema_decay was 0)")
    return assemble(states)


def _write_scheduler(obj: ObjectiveConfig, out: Path) -> None:
    out.mkdir(parents=True)
    config = {
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": obj.num_timesteps,
        "beta_start": obj.beta_start,
        "beta_end": obj.beta_end,
        "beta_schedule": BETA_SCHEDULES[obj.schedule],
        "prediction_type": PREDICTION_TYPES[obj.parameterization],
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "timestep_spacing": "leading",
    }
    (out / "scheduler_config.json").write_text(json.dumps(config, indent=2) + "\n")
