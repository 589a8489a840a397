"""The flow-matching objective: forward process and velocity target, time draws, the SD3 shift
(fixed or from the token count), loss weighting, the config and the export's record of it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor

from common.config import ConfigError, load_config
from model_zoo.diffusion.flow import (
    draw_flow_time,
    flow_forward,
    flow_loss,
    flow_target,
    loss_weight,
    token_shift,
)
from trainer.config import DiffusionObjective, FlowMatchingConfig, TrainJobConfig
from trainer.tasks.denoising import Denoising, FlowMatching, build_process

REPO = Path(__file__).resolve().parent.parent


def test_the_path_runs_from_data_to_noise_with_velocity_noise_minus_data() -> None:
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 3, 2, 2, 2, generator=generator), torch.randn(2, 3, 2, 2, 2, generator=generator)
    torch.testing.assert_close(flow_forward(x0, 0.0, noise), x0)
    torch.testing.assert_close(flow_forward(x0, 1.0, noise), noise)
    t, dt = torch.tensor([0.3, 0.7]), 1e-3
    derivative = (flow_forward(x0.double(), t.double() + dt, noise.double()) - flow_forward(x0.double(), t.double(), noise.double())) / dt
    torch.testing.assert_close(derivative, flow_target(x0, noise).double())


def test_logit_normal_times_have_the_configured_logit_mean_and_spread() -> None:
    t = draw_flow_time(torch.Generator().manual_seed(0), 20000, "logit_normal", mean=0.5, std=0.8)
    logits = torch.log(t / (1 - t))
    assert abs(float(logits.mean()) - 0.5) < 0.02 and abs(float(logits.std()) - 0.8) < 0.02
    uniform = draw_flow_time(torch.Generator().manual_seed(0), 20000, "uniform")
    assert abs(float(uniform.mean()) - 0.5) < 0.01 and float(uniform.min()) >= 0 and float(uniform.max()) < 1


def test_the_loss_regresses_the_velocity_at_time_t_times_T_with_its_weight() -> None:
    generator = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 2, 2, 2, 2, generator=generator), torch.randn(3, 2, 2, 2, 2, generator=generator)
    t = torch.tensor([0.1, 0.5, 0.9])
    seen: list[Tensor] = []

    def model(x: Tensor, time: Tensor, *, scale: float) -> Tensor:
        seen.append(time)
        return scale * x

    loss = flow_loss(model, x0, cond={"scale": 0.5}, t=t, noise=noise, num_train_timesteps=1000, weighting="cosmap")
    torch.testing.assert_close(seen[0], t * 1000)
    x_t = (1 - t.view(-1, 1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1, 1) * noise
    plain = ((0.5 * x_t - (noise - x0)) ** 2).mean(dim=(1, 2, 3, 4))
    torch.testing.assert_close(loss, plain * 2 / (math.pi * (1 - 2 * t + 2 * t**2)))
    torch.testing.assert_close(loss_weight(t, "none"), torch.ones(3))


def test_the_token_shift_grows_with_the_latent_positions() -> None:
    shift = FlowMatching(FlowMatchingConfig(shift_from_tokens=True), 1000, "l2").shift
    small, large = shift(torch.zeros(1, 4, 2, 8, 8)), shift(torch.zeros(1, 4, 8, 32, 32))
    assert small == pytest.approx(math.exp(0.5 + 0.65 / 3840 * (128 - 256)))
    assert large == pytest.approx(token_shift(8192, base_tokens=256, max_tokens=4096, base_shift=0.5, max_shift=1.15))
    assert large > small
    assert FlowMatching(FlowMatchingConfig(shift=3.0), 1000, "l2").shift(torch.zeros(1, 4, 8, 32, 32)) == 3.0


def test_the_shifted_draw_moves_mass_to_noise() -> None:
    latents = torch.zeros(4000, 1, 1, 1, 1)
    plain, _ = FlowMatching(FlowMatchingConfig(), 1000, "l2").draw(latents, torch.Generator().manual_seed(0))
    shifted, _ = FlowMatching(FlowMatchingConfig(shift=3.0), 1000, "l2").draw(latents, torch.Generator().manual_seed(0))
    torch.testing.assert_close(shifted, 3 * plain / (1 + 2 * plain))
    assert float(shifted.median()) > 0.7


def test_objective_name_picks_the_process_and_bad_values_name_the_key(tmp_path: Path) -> None:
    cfg = load_config(TrainJobConfig, REPO / "configs/tiny/dit_flow.yaml", [])
    assert isinstance(cfg.objective, DiffusionObjective) and cfg.objective.name == "flow_matching"
    assert isinstance(build_process(cfg.objective, torch.device("cpu")), FlowMatching)
    assert isinstance(build_process(DiffusionObjective(), torch.device("cpu")), Denoising)
    with pytest.raises(ConfigError, match="objective.name: must be one of 'diffusion', 'flow_matching'"):
        load_config(TrainJobConfig, REPO / "configs/tiny/dit.yaml", ["objective.name=rectified"])
    with pytest.raises((ConfigError, ValueError), match="shift: must be > 0"):
        load_config(TrainJobConfig, REPO / "configs/tiny/dit_flow.yaml", ["objective.flow.shift=0"])


def test_lvd_export_writes_a_flow_match_scheduler_with_the_shift(tmp_path: Path, video_shards: str) -> None:
    from trainer.export import export
    from trainer.loop import train

    overrides = [
        f"data.shards={video_shards}", f"run.dir={tmp_path / 'run'}", "train.steps=1", "train.checkpoint_every=0",
        "data.height=32", "data.width=32", "data.frames=4", "train.micro_batch_size=1",
        "objective.flow.shift_from_tokens=true", "objective.flow.base_tokens=64",
    ]
    assert train(load_config(TrainJobConfig, REPO / "configs/tiny/dit_flow.yaml", overrides)) == 0
    folder = export(tmp_path / "run", tmp_path / "export")
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert (config["shift"], config["use_dynamic_shifting"], config["base_image_seq_len"]) == (2.0, True, 64)
    assert json.loads((folder / "model_index.json").read_text())["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    diffusers = pytest.importorskip("diffusers")
    assert diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler").config.shift == 2.0
