"""Samplers against diffusers' schedulers (step for step) and against a closed-form Gaussian case."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from model_zoo.diffusion.guidance import cfg, unconditional_guidance
from model_zoo.diffusion.objectives import extract
from model_zoo.diffusion.samplers import ddim, ddim_step, ddpm
from model_zoo.diffusion.schedules import alphas_cumprod, ddim_timesteps, make_betas

SHAPE = (2, 4, 3, 5, 5)
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def fixed_random_model(seed: int = 0):
    """A fixed, smooth, nonlinear random function of (x, t): the same outputs for both samplers."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(SHAPE[1:], generator=gen, dtype=torch.float64)
    bias = torch.randn(SHAPE[1:], generator=gen, dtype=torch.float64)

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        phase = (t.to(torch.float64) / 97.0).view(-1, 1, 1, 1, 1)
        return torch.tanh(weight * x) * 0.8 + torch.sin(phase + bias) * 0.3

    return denoise


def diffusers_reference(cls, prediction_type: str, schedule: torch.Tensor, **config):
    scheduler = cls(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        prediction_type=prediction_type,
        **config,
    )
    # Same ᾱ in float64 on both sides, so the step arithmetic itself is compared.
    scheduler.alphas_cumprod = schedule.clone()
    return scheduler


@pytest.fixture(scope="module")
def schedule() -> torch.Tensor:
    return alphas_cumprod(make_betas("scaled_linear", 1000, 0.00085, 0.012))


@pytest.mark.parametrize("parameterization", ["eps", "v", "x0"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_matches_diffusers_step_for_step(schedule, parameterization, eta):
    reference = diffusers_reference(
        DDIMScheduler,
        PREDICTION_TYPES[parameterization],
        schedule,
        steps_offset=1,
        set_alpha_to_one=False,
    )
    reference.final_alpha_cumprod = schedule[0].clone()
    reference.set_timesteps(25)
    timesteps = ddim_timesteps(1000, 25, steps_offset=1)
    assert torch.equal(reference.timesteps, timesteps)

    model = fixed_random_model()
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours: list[torch.Tensor] = []
    ddim(
        model,
        x_T,
        timesteps,
        alphas_cumprod=schedule,
        parameterization=parameterization,
        eta=eta,
        generator=torch.Generator().manual_seed(7),
        callback=lambda i, t, x: ours.append(x),
        final_alpha_cumprod=float(schedule[0]),
    )
    x, gen = x_T, torch.Generator().manual_seed(7)
    for i, t in enumerate(reference.timesteps):
        x = reference.step(model(x, t.repeat(SHAPE[0])), t, x, eta=eta, generator=gen).prev_sample
        torch.testing.assert_close(ours[i], x, atol=1e-6, rtol=1e-6)
    assert len(ours) == 25


@pytest.mark.parametrize("parameterization", ["eps", "v"])
@pytest.mark.parametrize("num_steps", [1000, 40])
def test_ddpm_matches_diffusers_step_for_step(schedule, parameterization, num_steps):
    reference = diffusers_reference(DDPMScheduler, PREDICTION_TYPES[parameterization], schedule)
    reference.set_timesteps(num_steps)
    timesteps = ddim_timesteps(1000, num_steps, steps_offset=0)
    assert torch.equal(reference.timesteps, timesteps)

    model = fixed_random_model(3)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ours: list[torch.Tensor] = []
    ddpm(
        model,
        x_T,
        timesteps,
        alphas_cumprod=schedule,
        parameterization=parameterization,
        generator=torch.Generator().manual_seed(11),
        callback=lambda i, t, x: ours.append(x),
    )
    x, gen = x_T, torch.Generator().manual_seed(11)
    for i, t in enumerate(reference.timesteps):
        x = reference.step(model(x, t.repeat(SHAPE[0])), t, x, generator=gen).prev_sample
        torch.testing.assert_close(ours[i], x, atol=1e-6, rtol=1e-6)


def test_schedules_match_diffusers():
    for ours, theirs in [
        ("linear", "linear"),
        ("sqrt_linear", "scaled_linear"),
        ("scaled_linear", "scaled_linear"),
        ("cosine", "squaredcos_cap_v2"),
    ]:
        reference = DDPMScheduler(
            num_train_timesteps=1000, beta_schedule=theirs, beta_start=0.0015, beta_end=0.0155
        )
        betas = make_betas(ours, 1000, 0.0015, 0.0155)
        assert betas.dtype == torch.float64
        torch.testing.assert_close(betas, reference.betas.double(), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(
            alphas_cumprod(betas), reference.alphas_cumprod.double(), atol=1e-6, rtol=1e-4
        )
    # LDM's "linear" (LVDM): betas are the squares of a linear ramp of √β.
    betas = make_betas("sqrt_linear", 1000, 0.0015, 0.0155)
    assert torch.allclose(betas.sqrt().diff(), betas.sqrt().diff()[0].expand(999), atol=1e-12)
    assert math.isclose(float(betas[0]), 0.0015) and math.isclose(float(betas[-1]), 0.0155)


def test_ddim_timesteps_leading_spacing():
    assert ddim_timesteps(1000, 50).tolist() == list(range(981, 0, -20))
    assert ddim_timesteps(1000, 1000, steps_offset=0).tolist() == list(range(999, -1, -1))
    with pytest.raises(ValueError):
        ddim_timesteps(1000, 1000, steps_offset=1)


def gaussian_denoiser(mu: float, std: float, schedule: torch.Tensor):
    """The exact ε-prediction E[ε | x_t] for data x_0 ~ N(mu, std²)."""

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = extract(schedule, t, x)
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * std**2 + 1 - a)

    return denoise


def exact_marginal_sample(mu: float, std: float, a_T: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    z = torch.randn(n, 1, 1, 1, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return a_T.sqrt() * mu + (a_T * std**2 + 1 - a_T).sqrt() * z


def sample_gaussian(
    schedule, sampler: str, eta: float, num_steps: int, mu: float, std: float
) -> torch.Tensor:
    offset = 0 if sampler == "ddpm" else 1
    timesteps = ddim_timesteps(1000, num_steps, steps_offset=offset)
    x_T = exact_marginal_sample(mu, std, schedule[timesteps[0]], 40000, seed=5)
    gen = torch.Generator().manual_seed(6)
    denoiser = gaussian_denoiser(mu, std, schedule)
    if sampler == "ddim":
        return ddim(denoiser, x_T, timesteps, alphas_cumprod=schedule, eta=eta, generator=gen)
    return ddpm(denoiser, x_T, timesteps, alphas_cumprod=schedule, generator=gen)


@pytest.mark.parametrize(
    ("sampler", "eta", "std_tol"), [("ddim", 0.0, 0.01), ("ddim", 1.0, 0.02), ("ddpm", 0.0, 0.02)]
)
def test_gaussian_data_is_recovered(schedule, sampler, eta, std_tol):
    """Exact denoiser of N(1.5, 0.5²): the sampled mean/std match; the std bias shrinks with steps.

    Standard errors at n = 40000 are 0.0025 (mean) and 0.0018 (std); the rest of the tolerance is
    the discretisation bias of plugging E[x_0 | x_t] into the step (measured: DDIM η=0 std 0.475 at
    50 steps, 0.493 at 250; η=1 and DDPM 0.449 at 50, 0.488 at 250).
    """
    mu, std = 1.5, 0.5
    coarse = sample_gaussian(schedule, sampler, eta, 50, mu, std)
    fine = sample_gaussian(schedule, sampler, eta, 250, mu, std)
    assert abs(float(fine.mean()) - mu) < 0.01
    assert abs(float(fine.std()) - std) < std_tol
    assert abs(float(fine.std()) - std) < 0.5 * abs(float(coarse.std()) - std)


def test_parameterizations_give_the_same_sample(schedule):
    """An ε-denoiser re-expressed as v and x_0 predictions samples identically."""
    mu, std = -0.7, 0.8
    eps_fn = gaussian_denoiser(mu, std, schedule)

    def v_fn(x, t):
        a = extract(schedule, t, x)
        eps = eps_fn(x, t)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        return a.sqrt() * eps - (1 - a).sqrt() * x0

    def x0_fn(x, t):
        a = extract(schedule, t, x)
        return (x - (1 - a).sqrt() * eps_fn(x, t)) / a.sqrt()

    timesteps = ddim_timesteps(1000, 20)
    x_T = torch.randn(64, 1, 2, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    samples = [
        ddim(fn, x_T, timesteps, alphas_cumprod=schedule, parameterization=kind)
        for fn, kind in [(eps_fn, "eps"), (v_fn, "v"), (x0_fn, "x0")]
    ]
    torch.testing.assert_close(samples[1], samples[0])
    torch.testing.assert_close(samples[2], samples[0])


def test_ddim_step_needs_noise_when_stochastic(schedule):
    x = torch.zeros(1, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="noise"):
        ddim_step(x, x, t=500, t_prev=480, alphas_cumprod=schedule, eta=0.5)
    with pytest.raises(ValueError, match="generator"):
        ddim(lambda x, t: x, x, ddim_timesteps(1000, 5), alphas_cumprod=schedule, eta=1.0)


def test_guidance_wrappers():
    x, t = torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64)

    def cond_fn(x, t):
        return x + 2.0

    def uncond_fn(x, t):
        return x + 0.5

    torch.testing.assert_close(cfg(cond_fn, uncond_fn, 7.5)(x, t), torch.full((2, 3), 0.5 + 7.5 * 1.5))
    torch.testing.assert_close(
        unconditional_guidance(cond_fn, uncond_fn, 0.1)(x, t), torch.full((2, 3), 2.0 + 0.1 * 1.5)
    )
    torch.testing.assert_close(cfg(cond_fn, uncond_fn, 1.0)(x, t), cond_fn(x, t))
