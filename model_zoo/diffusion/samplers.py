"""DDPM and DDIM samplers as plain functions (k-diffusion style; no scheduler state).

- `ddpm_step` is the ancestral step of DDPM (Ho et al. 2020) eq. 6-7: the posterior
  q(x_{t'} | x_t, x̂_0) with variance β̃ ("fixed_small"), generalised to any t' < t by using
  β'_t = 1 - ᾱ_t/ᾱ_{t'} (what diffusers' DDPMScheduler does for a sub-sampled schedule).
- `ddim_step` is DDIM (Song et al. 2021) eq. 12 with σ_t(η) of eq. 16: η = 0 is the
  deterministic DDIM, η = 1 the DDPM posterior variance.

Notation map: t is the current timestep, t_prev the next one on the (descending) schedule,
t_prev = -1 after the last step, where ᾱ_{-1} = `final_alpha_cumprod` (1.0, diffusers'
`set_alpha_to_one=True`; LDM/LVDM's DDIM uses ᾱ_0 instead). The model output is ε, v or x_0
(`parameterization`), converted by `objectives.predict_x0_eps`.

`denoise_fn(x_t, t)` receives t as an int64 tensor of shape (B,); conditioning and guidance are
bound beforehand (`functools.partial`, `guidance.cfg`). Strategies for long videos call the step
functions; they never re-implement a step. See docs/methods.md, 'Samplers: DDIM and DDPM'.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from model_zoo.diffusion.objectives import Parameterization, predict_x0_eps

DenoiseFn = Callable[[Tensor, Tensor], Tensor]
"""`denoise_fn(x_t, t) -> model output`, with t an int64 tensor of shape (B,)."""
StepCallback = Callable[[int, int, Tensor], None]
"""`callback(step_index, t, x_t_prev)`, called after every step."""


def alpha_bar_at(alphas_cumprod: Tensor, t: int, final_alpha_cumprod: float = 1.0) -> Tensor:
    """ᾱ_t as a 0-dim float64 tensor; `final_alpha_cumprod` for t < 0 (after the last step)."""
    if t < 0:
        return torch.tensor(final_alpha_cumprod, dtype=torch.float64)
    return alphas_cumprod[t].to(torch.float64)


def previous_timesteps(timesteps: Tensor) -> list[int]:
    """t_prev for each t of a descending schedule: the next element, -1 after the last."""
    return [int(t) for t in timesteps[1:]] + [-1]


def ddim_step(
    x_t: Tensor,
    model_output: Tensor,
    *,
    t: int,
    t_prev: int,
    alphas_cumprod: Tensor,
    parameterization: Parameterization = "eps",
    eta: float = 0.0,
    noise: Tensor | None = None,
    final_alpha_cumprod: float = 1.0,
) -> Tensor:
    """x_{t_prev} = √ᾱ' x̂_0 + √(1-ᾱ'-σ²) ε̂ + σ noise (DDIM eq. 12), σ = σ_t(η) of eq. 16."""
    x0_hat, eps_hat = predict_x0_eps(
        model_output, x_t, t, alphas_cumprod=alphas_cumprod, parameterization=parameterization
    )
    alpha_bar = alpha_bar_at(alphas_cumprod, t)
    alpha_bar_prev = alpha_bar_at(alphas_cumprod, t_prev, final_alpha_cumprod)
    sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)).sqrt()
    x_prev = alpha_bar_prev.sqrt() * x0_hat + (1 - alpha_bar_prev - sigma**2).sqrt() * eps_hat
    if eta > 0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs `noise`")
        x_prev = x_prev + sigma * noise
    return x_prev.to(x_t.dtype)


def ddpm_step(
    x_t: Tensor,
    model_output: Tensor,
    *,
    t: int,
    t_prev: int,
    alphas_cumprod: Tensor,
    parameterization: Parameterization = "eps",
    noise: Tensor | None = None,
) -> Tensor:
    """A sample of q(x_{t_prev} | x_t, x̂_0) (DDPM eq. 6-7, variance β̃); no noise at the last step."""
    x0_hat, _ = predict_x0_eps(
        model_output, x_t, t, alphas_cumprod=alphas_cumprod, parameterization=parameterization
    )
    alpha_bar = alpha_bar_at(alphas_cumprod, t)
    alpha_bar_prev = alpha_bar_at(alphas_cumprod, t_prev)
    alpha_step = alpha_bar / alpha_bar_prev
    beta_step = 1 - alpha_step
    mean = (alpha_bar_prev.sqrt() * beta_step * x0_hat + alpha_step.sqrt() * (1 - alpha_bar_prev) * x_t) / (
        1 - alpha_bar
    )
    if t_prev < 0:
        return mean.to(x_t.dtype)
    if noise is None:
        raise ValueError("ddpm_step before the last step needs `noise`")
    variance = (beta_step * (1 - alpha_bar_prev) / (1 - alpha_bar)).clamp_min(1e-20)
    return (mean + variance.sqrt() * noise).to(x_t.dtype)


def _timestep_batch(t: int, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), t, dtype=torch.int64, device=x.device)


def standard_normal_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """N(0, I) of x's shape and dtype, drawn on the generator's device and moved to x's."""
    if generator is None:
        raise ValueError("a stochastic sampler needs a `generator` (no global RNG is used)")
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=generator.device).to(x.device)


def ddim(
    denoise_fn: DenoiseFn,
    x_T: Tensor,
    timesteps: Tensor,
    *,
    alphas_cumprod: Tensor,
    parameterization: Parameterization = "eps",
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    final_alpha_cumprod: float = 1.0,
    step_noise: Callable[[int, Tensor], Tensor] | None = None,
) -> Tensor:
    """DDIM sampling (Song et al. 2021, eq. 12) from x_T down the descending `timesteps`.

    With η > 0 one standard-normal draw of x's shape is taken from `generator` per step, in the
    order diffusers' DDIMScheduler takes it; `step_noise(step_index, x)` replaces that draw when
    the noise has another covariance (VideoFusion's decomposed noise).
    """
    x = x_T
    for index, (t, t_prev) in enumerate(zip(timesteps.tolist(), previous_timesteps(timesteps))):
        model_output = denoise_fn(x, _timestep_batch(t, x))
        noise = None
        if eta > 0:
            noise = standard_normal_like(x, generator) if step_noise is None else step_noise(index, x)
        x = ddim_step(
            x,
            model_output,
            t=t,
            t_prev=t_prev,
            alphas_cumprod=alphas_cumprod,
            parameterization=parameterization,
            eta=eta,
            noise=noise,
            final_alpha_cumprod=final_alpha_cumprod,
        )
        if callback is not None:
            callback(index, t, x)
    return x


def ddpm(
    denoise_fn: DenoiseFn,
    x_T: Tensor,
    timesteps: Tensor,
    *,
    alphas_cumprod: Tensor,
    parameterization: Parameterization = "eps",
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """Ancestral DDPM sampling (Ho et al. 2020, Algorithm 2) down the descending `timesteps`.

    One standard-normal draw per step except the last, as diffusers' DDPMScheduler does.
    """
    x = x_T
    for index, (t, t_prev) in enumerate(zip(timesteps.tolist(), previous_timesteps(timesteps))):
        model_output = denoise_fn(x, _timestep_batch(t, x))
        noise = standard_normal_like(x, generator) if t_prev >= 0 else None
        x = ddpm_step(
            x,
            model_output,
            t=t,
            t_prev=t_prev,
            alphas_cumprod=alphas_cumprod,
            parameterization=parameterization,
            noise=noise,
        )
        if callback is not None:
            callback(index, t, x)
    return x


def _log_snr_half(alpha_bar: Tensor) -> Tensor:
    """λ = log(α/σ) = ½ log(ᾱ / (1 - ᾱ)); +inf at ᾱ = 1 (the clean end)."""
    return 0.5 * (alpha_bar.log() - (1 - alpha_bar).log())


def dpm_solver_pp_2m(
    denoise_fn: DenoiseFn,
    x_T: Tensor,
    timesteps: Tensor,
    *,
    alphas_cumprod: Tensor,
    parameterization: Parameterization = "eps",
    callback: StepCallback | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2) down the descending `timesteps`.

    With α_t = √ᾱ_t, σ_t = √(1-ᾱ_t), λ_t = log(α_t/σ_t), h = λ_t' - λ_t and the data prediction
    D = x̂_0: the first step is first order, x' = (σ'/σ) x - α' (e^{-h} - 1) D; later steps use
    D + (h/(2 h_prev)) (D - D_prev) in its place (eq. 2M). The last step goes to σ = 0 (ᾱ = 1)
    and is first order, i.e. it returns x̂_0 (diffusers' `final_sigmas_type="zero"`).
    """
    x, previous_x0, previous_lambda = x_T, None, None
    for index, (t, t_prev) in enumerate(zip(timesteps.tolist(), previous_timesteps(timesteps))):
        model_output = denoise_fn(x, _timestep_batch(t, x))
        x0_hat, _ = predict_x0_eps(
            model_output.double(), x.double(), t, alphas_cumprod=alphas_cumprod.double(), parameterization=parameterization
        )
        alpha_bar, alpha_bar_next = alpha_bar_at(alphas_cumprod, t), alpha_bar_at(alphas_cumprod, t_prev)
        lam = _log_snr_half(alpha_bar)
        if t_prev < 0:
            x = x0_hat
        else:
            h = _log_snr_half(alpha_bar_next) - lam
            data = x0_hat
            if previous_x0 is not None:
                data = x0_hat + h / (2 * (lam - previous_lambda)) * (x0_hat - previous_x0)
            sigma_ratio = ((1 - alpha_bar_next) / (1 - alpha_bar)).sqrt()
            x = sigma_ratio * x.double() - alpha_bar_next.sqrt() * torch.expm1(-h) * data
        previous_x0, previous_lambda = x0_hat, lam
        x = x.to(x_T.dtype)
        if callback is not None:
            callback(index, t, x)
    return x
