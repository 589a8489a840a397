"""The pipeline folder: what `lvd export` writes and `lvd sample` reads, laid out like diffusers'.

    DIR/model_index.json                 {"_class_name": "LVDPipeline", "task": ..., entries...,
                                          "<component>": ["model_zoo", family], ...,
                                          "scheduler": ["diffusers", "DDIMScheduler"]}
    DIR/<component>/                     config.json + model.safetensors (model_zoo.save_pretrained)
    DIR/scheduler/scheduler_config.json  a diffusers DDIMScheduler config, or for a flow-matching
                                         denoiser a FlowMatchEulerDiscreteScheduler config
    DIR/<name>/scheduler_config.json     more schedules of a bundle (CMD's content_scheduler)

The entries besides the components describe the export (source checkpoint, step, EMA, the clip
size trained on, the VAE's fitted latent statistics, LVDM's no-condition level). The scheduler
config uses diffusers' names; `SchedulerSpec` holds ours (model_zoo.diffusion.schedules: diffusers'
"scaled_linear" is our `sqrt_linear`, "squaredcos_cap_v2" our `cosine`; "epsilon", "v_prediction"
and "sample" are the `eps`, `v` and `x0` parameterizations; a flow-matching schedule is a
`FlowSchedulerSpec`, its shift as diffusers records it). This module writes and reads the JSON; the component folders are written and loaded by model_zoo.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.files import atomic_write_json

INDEX_FILE = "model_index.json"
SCHEDULER = "scheduler"
SCHEDULER_FILE = "scheduler_config.json"
DDIM_SCHEDULER = ["diffusers", "DDIMScheduler"]
"""The index value of a scheduler folder."""
FLOW_SCHEDULER = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
"""The index value of a flow-matching scheduler folder."""
NETWORK_COMPONENTS = ("denoiser", "vae", "text_encoder", "image_encoder", "content_denoiser", "content_vae")
"""The networks a sampler loads, when the folder has them."""

BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "sqrt_linear", "squaredcos_cap_v2": "cosine"}
"""diffusers' beta_schedule -> our schedule kind."""
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
"""diffusers' prediction_type -> our parameterization."""
SCHEDULE_ALIASES = {"scaled_linear": "sqrt_linear"}
"""Our schedule kinds that are another name of one in BETA_SCHEDULES."""
DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "set_alpha_to_one": True,
    "steps_offset": 0,
}
"""What diffusers' DDIMScheduler assumes for a key its config leaves out."""
FLOW_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
"""What diffusers' FlowMatchEulerDiscreteScheduler assumes for a key its config leaves out."""


@dataclass(frozen=True, kw_only=True)
class SchedulerSpec:
    """A DDIM schedule, in our names."""

    schedule: str
    """Beta schedule kind: linear | sqrt_linear | scaled_linear (= sqrt_linear) | cosine."""
    parameterization: str
    """What the denoiser predicts: eps | v | x0."""
    num_train_timesteps: int
    """T, the number of training timesteps."""
    beta_start: float
    """β at t = 0."""
    beta_end: float
    """β at t = T - 1."""
    set_alpha_to_one: bool = False
    """Whether ᾱ after the last DDIM step is 1 (else ᾱ_0), as diffusers names it."""
    steps_offset: int = 1
    """Offset of the leading DDIM timestep spacing."""


@dataclass(frozen=True, kw_only=True)
class FlowSchedulerSpec:
    """A flow-matching schedule (docs/methods.md, 'Flow matching'), in our names."""

    num_train_timesteps: int
    """T: the network sees time t' · T."""
    shift: float
    """SD3's timestep shift s (used unless `shift_from_tokens`)."""
    shift_from_tokens: bool
    """s = exp(log s), log s linear in the latent positions n between the two points below."""
    base_tokens: int
    """n at which log s = base_log_shift."""
    max_tokens: int
    """n at which log s = max_log_shift."""
    base_log_shift: float
    """log s at `base_tokens`."""
    max_log_shift: float
    """log s at `max_tokens`."""


@dataclass(frozen=True, kw_only=True)
class PipelineIndex:
    """What model_index.json and the scheduler config of a pipeline folder say."""

    path: Path
    """The pipeline folder."""
    task: str | None
    """The task the networks were trained for (None in a folder that does not say)."""
    components: dict[str, str]
    """Component name -> model_zoo family, in the index's order."""
    scheduler: SchedulerSpec | FlowSchedulerSpec | None
    """The DDIM (or flow-matching) schedule; None for a folder without one (an exported autoencoder)."""
    extra_schedulers: dict[str, SchedulerSpec]
    """More DDIM schedules by folder name, for networks of a bundle that trained under their own
    (CMD's `content_scheduler`, the content-frame model's)."""
    entries: dict[str, Any]
    """Every other key of model_index.json (source, step, ema, sample_size, latent_stats, ...)."""

    @property
    def index_file(self) -> Path:
        return self.path / INDEX_FILE


def is_pipeline_folder(folder: str | Path) -> bool:
    return (Path(folder) / INDEX_FILE).is_file()


def scheduler_config(spec: SchedulerSpec) -> dict[str, Any]:
    """`spec` as a diffusers DDIMScheduler config (loads with DDIMScheduler.from_pretrained)."""
    beta_schedules = {ours: theirs for theirs, ours in BETA_SCHEDULES.items()}
    prediction_types = {ours: theirs for theirs, ours in PREDICTION_TYPES.items()}
    return {
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": spec.num_train_timesteps,
        "beta_start": spec.beta_start,
        "beta_end": spec.beta_end,
        "beta_schedule": beta_schedules[SCHEDULE_ALIASES.get(spec.schedule, spec.schedule)],
        "prediction_type": prediction_types[spec.parameterization],
        "clip_sample": False,
        "set_alpha_to_one": spec.set_alpha_to_one,
        "steps_offset": spec.steps_offset,
        "timestep_spacing": "leading",
    }


def flow_scheduler_config(spec: FlowSchedulerSpec) -> dict[str, Any]:
    """`spec` as a diffusers FlowMatchEulerDiscreteScheduler config."""
    return {
        "_class_name": FLOW_SCHEDULER[1],
        "num_train_timesteps": spec.num_train_timesteps,
        "shift": spec.shift,
        "use_dynamic_shifting": spec.shift_from_tokens,
        "base_shift": spec.base_log_shift,
        "max_shift": spec.max_log_shift,
        "base_image_seq_len": spec.base_tokens,
        "max_image_seq_len": spec.max_tokens,
    }


def read_flow_scheduler(raw: dict[str, Any]) -> FlowSchedulerSpec:
    """The flow-matching schedule of a FlowMatchEulerDiscreteScheduler config."""
    config = {**FLOW_DIFFUSERS_DEFAULTS, **raw}
    return FlowSchedulerSpec(
        num_train_timesteps=config["num_train_timesteps"],
        shift=config["shift"],
        shift_from_tokens=config["use_dynamic_shifting"],
        base_tokens=config["base_image_seq_len"],
        max_tokens=config["max_image_seq_len"],
        base_log_shift=config["base_shift"],
        max_log_shift=config["max_shift"],
    )


def write_index(
    folder: Path,
    *,
    task: str,
    components: dict[str, str],
    scheduler: SchedulerSpec | FlowSchedulerSpec | None,
    entries: dict[str, Any] | None = None,
    extra_schedulers: dict[str, SchedulerSpec] | None = None,
) -> None:
    """Write model_index.json (and the scheduler configs) into `folder`, whose component
    folders (name -> model_zoo family in `components`) are already written."""
    index: dict[str, Any] = {"_class_name": "LVDPipeline", "task": task, **(entries or {})}
    index.update((name, ["model_zoo", family]) for name, family in components.items())
    schedulers = ({} if scheduler is None else {SCHEDULER: scheduler}) | (extra_schedulers or {})
    for name, spec in schedulers.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        flow = isinstance(spec, FlowSchedulerSpec)
        atomic_write_json(folder / name / SCHEDULER_FILE, flow_scheduler_config(spec) if flow else scheduler_config(spec))
        index[name] = FLOW_SCHEDULER if flow else DDIM_SCHEDULER
    atomic_write_json(folder / INDEX_FILE, index)


def read_scheduler(folder: Path) -> SchedulerSpec | FlowSchedulerSpec:
    """The schedule of a DDIMScheduler (or FlowMatchEulerDiscreteScheduler) config folder (keys it
    leaves out take diffusers' defaults)."""
    raw = json.loads((folder / SCHEDULER_FILE).read_text())
    if raw.get("_class_name") == FLOW_SCHEDULER[1]:
        return read_flow_scheduler(raw)
    config = {**DIFFUSERS_DEFAULTS, **raw}
    kind, prediction = config["beta_schedule"], config["prediction_type"]
    if kind not in BETA_SCHEDULES:
        raise ValueError(f"{folder}: unsupported beta_schedule {kind!r}; valid: {', '.join(BETA_SCHEDULES)}")
    if prediction not in PREDICTION_TYPES:
        raise ValueError(f"{folder}: unsupported prediction_type {prediction!r}")
    return SchedulerSpec(
        schedule=BETA_SCHEDULES[kind],
        parameterization=PREDICTION_TYPES[prediction],
        num_train_timesteps=config["num_train_timesteps"],
        beta_start=config["beta_start"],
        beta_end=config["beta_end"],
        set_alpha_to_one=config["set_alpha_to_one"],
        steps_offset=config["steps_offset"],
    )


def read_index(folder: str | Path) -> PipelineIndex:
    """model_index.json of `folder`, its components and its schedule."""
    path = Path(folder)
    if not is_pipeline_folder(path):
        raise FileNotFoundError(f"{path}: no {INDEX_FILE} (expected a folder written by `lvd export`)")
    index = json.loads((path / INDEX_FILE).read_text())
    components = {
        name: value[1] for name, value in index.items() if isinstance(value, list) and value[:1] == ["model_zoo"]
    }
    schedulers = {name: read_scheduler(path / name) for name, value in index.items() if name == SCHEDULER or value in (DDIM_SCHEDULER, FLOW_SCHEDULER)}
    scheduler = schedulers.pop(SCHEDULER, None)
    entries = {
        k: v for k, v in index.items() if k not in components and k not in schedulers and k not in ("_class_name", "task", SCHEDULER)
    }
    return PipelineIndex(
        path=path, task=index.get("task"), components=components, scheduler=scheduler, extra_schedulers=schedulers, entries=entries
    )
