"""The flow Euler and Heun samplers and DPM-Solver++(2M) agree step for step with diffusers'
schedulers given the same model outputs (a fixed deterministic fake model), with and without CFG."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from model_zoo.diffusion.flow import flow_sample, flow_sigmas, shift_time, token_shift
from model_zoo.diffusion.guidance import cfg
from model_zoo.diffusion.samplers import dpm_solver_pp_2m
from model_zoo.diffusion.schedules import ddim_timesteps

diffusers = pytest.importorskip("diffusers")

SHAPE = (1, 4, 3, 4, 4)
STEPS = 8
TOLERANCE = 1e-6
"""Largest step-for-step difference, relative to the largest |x| of the step."""
DPM_TOLERANCE = 5e-6
"""DPMSolverMultistepScheduler steps in float32 (it upcasts the sample to float32 and keeps its
sigmas in float32), and DPM-Solver's second-order difference amplifies that rounding: measured
up to 2.6e-6 relative with CFG scale 4 and ε-prediction, 2.6e-7 without CFG."""


def fake_model(scale: float) -> object:
    """A deterministic nonlinear 'network' of x and the time input."""

    def model(x: Tensor, t: Tensor) -> Tensor:
        time = t.to(torch.float64).view(-1, 1, 1, 1, 1) / 1000
        return (scale * torch.tanh(x.double()) * (1 + time) + 0.3 * torch.cos(3 * time + x.double())).to(x.dtype)

    return model


def guided_model() -> object:
    return cfg(fake_model(0.8), fake_model(-0.5), 4.0)


def initial_noise() -> Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def assert_agree(ours: list[Tensor], reference: list[Tensor], tolerance: float = TOLERANCE) -> None:
    assert len(ours) == len(reference) == STEPS
    for step, (mine, theirs) in enumerate(zip(ours, reference)):
        scale = max(1.0, float(theirs.abs().max()))
        error = float((mine - theirs.double()).abs().max())
        assert error <= tolerance * scale, f"step {step}: differs by {error:.3g} (|x| up to {scale:.3g})"


def run_diffusers(scheduler: object, model: object, x: Tensor, timesteps: Tensor) -> list[Tensor]:
    trajectory = []
    for t in timesteps:
        output = model(x, t.expand(x.shape[0]))
        x = scheduler.step(output, t, x).prev_sample
        trajectory.append(x)
    return trajectory


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("model", [fake_model(0.8), guided_model()], ids=["plain", "cfg"])
def test_flow_euler_matches_diffusers_step_for_step(shift: float, model: object) -> None:
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    unshifted = torch.linspace(1.0, 0.0, STEPS + 1, dtype=torch.float64)[:-1]
    scheduler.set_timesteps(sigmas=unshifted.numpy())
    sigmas = flow_sigmas(STEPS, shift)
    torch.testing.assert_close(sigmas, scheduler.sigmas.double(), atol=1e-6, rtol=0)
    x = initial_noise()
    reference = run_diffusers(scheduler, model, x, scheduler.timesteps.double())
    ours: list[Tensor] = []
    flow_sample(model, x, scheduler.sigmas.double(), method="euler", callback=lambda i, t, x_next: ours.append(x_next))
    assert_agree(ours, reference)


@pytest.mark.parametrize("model", [fake_model(0.8), guided_model()], ids=["plain", "cfg"])
def test_flow_heun_matches_diffusers_step_for_step(model: object) -> None:
    scheduler = diffusers.FlowMatchHeunDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    scheduler.set_timesteps(STEPS)
    x = initial_noise()
    states = run_diffusers(scheduler, model, x, scheduler.timesteps.double())
    # diffusers interleaves the Heun corrector calls: its state after step 2k is x at sigma k + 1
    # (its first step and the last, Euler, step are single calls).
    reference = states[1::2] + states[-1:]
    distinct = torch.cat([scheduler.sigmas[:1], scheduler.sigmas[1:-1:2], scheduler.sigmas[-1:]]).double()
    ours: list[Tensor] = []
    flow_sample(model, x, distinct, method="heun", callback=lambda i, t, x_next: ours.append(x_next))
    assert_agree(ours, reference)


@pytest.mark.parametrize("prediction", [("eps", "epsilon"), ("v", "v_prediction")], ids=["eps", "v"])
@pytest.mark.parametrize("model", [fake_model(0.8), guided_model()], ids=["plain", "cfg"])
def test_dpm_solver_pp_2m_matches_diffusers_step_for_step(prediction: tuple[str, str], model: object) -> None:
    ours_name, theirs_name = prediction
    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        algorithm_type="dpmsolver++", solver_order=2, prediction_type=theirs_name,
    )
    timesteps = ddim_timesteps(1000, STEPS, steps_offset=1)
    scheduler.set_timesteps(timesteps=timesteps.tolist())
    assert scheduler.timesteps.tolist() == timesteps.tolist()
    x = initial_noise()
    reference = run_diffusers(scheduler, model, x, scheduler.timesteps)
    ours: list[Tensor] = []
    dpm_solver_pp_2m(
        model, x, timesteps, alphas_cumprod=scheduler.alphas_cumprod.double(), parameterization=ours_name,
        callback=lambda i, t, x_next: ours.append(x_next),
    )
    assert_agree(ours, reference, DPM_TOLERANCE)


def test_token_shift_matches_diffusers_dynamic_shifting() -> None:
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    for tokens in (256, 1024, 4096, 30000):
        mu = calculate_shift(tokens, 256, 4096, 0.5, 1.15)
        shift = token_shift(tokens, base_tokens=256, max_tokens=4096, base_shift=0.5, max_shift=1.15)
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
        scheduler.set_timesteps(sigmas=torch.linspace(1.0, 0.0, STEPS + 1)[:-1].numpy(), mu=mu)
        torch.testing.assert_close(flow_sigmas(STEPS, shift), scheduler.sigmas.double(), atol=1e-6, rtol=0)


def test_shift_moves_time_towards_noise() -> None:
    t = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    assert torch.equal(shift_time(t, 1.0), t)
    shifted = shift_time(t, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1 and bool((shifted[1:3] > t[1:3]).all())
    torch.testing.assert_close(shifted[2], torch.tensor(0.75, dtype=torch.float64))
