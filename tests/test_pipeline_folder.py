"""common.pipeline_folder: the one writer and reader of model_index.json and the scheduler config."""

from __future__ import annotations

import json

import pytest

from common.pipeline_folder import (
    SchedulerSpec,
    is_pipeline_folder,
    read_index,
    scheduler_config,
    write_index,
)

SPEC = SchedulerSpec(schedule="sqrt_linear", parameterization="v", num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0155)


def test_what_is_written_is_read_back(tmp_path):
    entries = {"source": "/runs/x/checkpoints/step_00000003", "step": 3, "uncond_level": 251}
    write_index(tmp_path, task="lvdm_prediction", components={"denoiser": "unet3d", "vae": "video_vae"}, scheduler=SPEC, entries=entries)
    index = read_index(tmp_path)
    assert is_pipeline_folder(tmp_path) and index.task == "lvdm_prediction"
    assert index.components == {"denoiser": "unet3d", "vae": "video_vae"}
    assert index.scheduler == SPEC and index.entries == entries
    written = json.loads((tmp_path / "model_index.json").read_text())
    assert written["_class_name"] == "LVDPipeline" and written["scheduler"] == ["diffusers", "DDIMScheduler"]


def test_the_scheduler_config_uses_diffusers_names_and_loads_in_diffusers(tmp_path):
    from diffusers import DDIMScheduler

    aliased = SchedulerSpec(schedule="scaled_linear", parameterization="eps", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012)
    assert scheduler_config(aliased)["beta_schedule"] == "scaled_linear"
    assert scheduler_config(aliased)["prediction_type"] == "epsilon"
    write_index(tmp_path, task="diffusion", components={}, scheduler=SPEC)
    loaded = DDIMScheduler.from_pretrained(tmp_path / "scheduler")
    assert loaded.config.prediction_type == "v_prediction" and loaded.config.beta_schedule == "scaled_linear"
    assert read_index(tmp_path).scheduler.schedule == "sqrt_linear"


def test_an_autoencoder_export_has_no_scheduler(tmp_path):
    write_index(tmp_path, task="autoencoder", components={"vae": "video_vae"}, scheduler=None, entries={"latent_stats": {"scale_factor": 2.0}})
    index = read_index(tmp_path)
    assert index.scheduler is None and not (tmp_path / "scheduler").exists()
    assert index.entries == {"latent_stats": {"scale_factor": 2.0}}


def test_a_foreign_scheduler_config_takes_diffusers_defaults_and_unknown_names_are_refused(tmp_path):
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps({"task": "diffusion", "scheduler": ["diffusers", "DDIMScheduler"]}))
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps({"beta_schedule": "squaredcos_cap_v2"}))
    spec = read_index(tmp_path).scheduler
    assert (spec.schedule, spec.parameterization, spec.set_alpha_to_one, spec.steps_offset) == ("cosine", "eps", True, 0)
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps({"beta_schedule": "exponential"}))
    with pytest.raises(ValueError, match="unsupported beta_schedule 'exponential'"):
        read_index(tmp_path)
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        read_index(tmp_path / "scheduler")
