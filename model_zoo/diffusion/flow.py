"""Flow matching (rectified flow) as pure functions: forward process, target, time draws, the
timestep shift, the loss, and the Euler and Heun samplers.

- Forward process and target (Lipman et al. 2023, "Flow Matching for Generative Modeling";
  Liu et al. 2023, "Flow Straight and Fast"; the rectified-flow form of Esser et al. 2024,
  "Scaling Rectified Flow Transformers", SD3, eq. 1-3): x_t = (1 - t) x_0 + t ε, t in [0, 1],
  and the network regresses the velocity v = dx_t/dt = ε - x_0 (SD3 eq. 20 with a_t = 1 - t).
- Time draws: logit-normal t = sigmoid(m + s·n), n ~ N(0, 1) (SD3 §3.1, eq. 19), or uniform.
- Timestep shift (SD3 §5.3.2, eq. 23): t' = s t / (1 + (s - 1) t), s > 1 moves mass to higher
  noise. A token-count-dependent s (the resolution/length-dependent shift of SD3, Open-Sora 2.0,
  Wan, and diffusers' dynamic shifting): log s interpolates linearly in the token count n between
  (n_base, log s_base) and (n_max, log s_max).
- Loss weighting: none, or SD3's "cosmap" w(t) = 2 / (π (1 - 2t + 2t²)) (SD3 eq. 21).
- Samplers integrate dx/dt = v from t = 1 (pure noise) to 0 over a descending `sigmas` schedule
  ending at 0 (k-diffusion's `sample_euler` / `sample_heun`, Karras et al. 2022 Algorithm 1 with
  σ(t) = t and no churn); the Heun step falls back to Euler on the last step into 0.

The network sees time as t' · T (`num_train_timesteps`, 1000), as diffusers' flow pipelines feed
it. See docs/methods.md, 'Flow matching'.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Literal

import torch
from torch import Tensor

from model_zoo.diffusion.objectives import LossType, frame_losses

TimeSampling = Literal["logit_normal", "uniform"]
LossWeighting = Literal["none", "cosmap"]
FlowDenoiseFn = Callable[[Tensor, Tensor], Tensor]
"""`denoise_fn(x_t, time) -> v`, time a float32 tensor (B,) of t' · T (float32 whatever the latents'
precision, so a bf16 run does not round the time input)."""
FlowCallback = Callable[[int, float, Tensor], None]
"""`callback(step_index, t, x_next)`, called after every step."""


def flow_forward(x0: Tensor, t: Tensor | float, noise: Tensor) -> Tensor:
    """x_t = (1 - t) x_0 + t ε, t a scalar or (B,) in [0, 1]."""
    t = torch.as_tensor(t, dtype=x0.dtype, device=x0.device)
    t = t.view(-1, *([1] * (x0.ndim - 1))) if t.ndim == 1 else t
    return (1 - t) * x0 + t * noise


def flow_target(x0: Tensor, noise: Tensor) -> Tensor:
    """The velocity v = ε - x_0 that a flow-matching network regresses."""
    return noise - x0


def shift_time(t: Tensor, shift: float) -> Tensor:
    """SD3's timestep shift t' = s t / (1 + (s - 1) t); s = 1 is the identity."""
    if shift <= 0:
        raise ValueError(f"shift: must be > 0, got {shift}")
    return shift * t / (1 + (shift - 1) * t)


def token_shift(num_tokens: int, *, base_tokens: int, max_tokens: int, base_shift: float, max_shift: float) -> float:
    """The resolution/length-dependent shift s = exp(μ), μ linear in the token count between
    (base_tokens, base_shift) and (max_tokens, max_shift) (diffusers' `calculate_shift`)."""
    if max_tokens <= base_tokens:
        raise ValueError(f"max_tokens must exceed base_tokens, got {max_tokens} <= {base_tokens}")
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    return math.exp(base_shift + slope * (num_tokens - base_tokens))


def draw_flow_time(
    generator: torch.Generator, batch_size: int, kind: TimeSampling, *, mean: float = 0.0, std: float = 1.0
) -> Tensor:
    """Training times t in (0, 1), float32 (B,): logit-normal(mean, std) or uniform."""
    if kind == "logit_normal":
        return torch.sigmoid(mean + std * torch.randn(batch_size, generator=generator))
    if kind == "uniform":
        return torch.rand(batch_size, generator=generator)
    raise ValueError(f"unknown time sampling {kind!r}; valid: logit_normal, uniform")


def loss_weight(t: Tensor, kind: LossWeighting) -> Tensor:
    """Per-sample loss weight w(t): 1, or SD3's cosmap 2 / (π (1 - 2t + 2t²))."""
    if kind == "none":
        return torch.ones_like(t)
    if kind == "cosmap":
        return 2 / (math.pi * (1 - 2 * t + 2 * t**2))
    raise ValueError(f"unknown loss weighting {kind!r}; valid: none, cosmap")


def flow_loss(
    denoise_fn: Callable[..., Tensor],
    x0: Tensor,
    *,
    cond: Mapping[str, object] | None = None,
    t: Tensor,
    noise: Tensor,
    num_train_timesteps: int,
    loss_type: LossType = "l2",
    weighting: LossWeighting = "none",
    frame_weight: Tensor | None = None,
) -> Tensor:
    """Per-sample flow-matching loss (B,) w(t) ‖(ε - x_0) - v_θ(x_t, t·T)‖, x_t = (1-t) x_0 + t ε.

    `t` (B,) is already shifted; the network sees t · `num_train_timesteps`. Frames are reduced as
    in `objectives.diffusion_loss` (mean over the counted frames, float32 error).
    """
    x_t = flow_forward(x0, t, noise)
    prediction = denoise_fn(x_t, t.float().to(x0.device) * num_train_timesteps, **(cond or {}))
    per_frame = frame_losses(prediction.float(), flow_target(x0, noise).float(), loss_type)  # (B, T)
    weight = torch.ones_like(per_frame) if frame_weight is None else frame_weight.to(per_frame).expand_as(per_frame)
    per_sample = (per_frame * weight).sum(1) / weight.sum(1).clamp_min(1.0)  # (B, T) -> (B,)
    return loss_weight(t.float().to(per_sample.device), weighting) * per_sample


def flow_sigmas(num_steps: int, shift: float) -> Tensor:
    """The descending sampling times (num_steps + 1,), float64: shift(linspace(1, 0, S + 1)),
    i.e. S uniform steps of t shifted by SD3's rule, ending at 0 (Wan's and SD3's reference
    schedule; diffusers' FlowMatchEuler gives the same with `set_timesteps(sigmas=...)`)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return shift_time(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64), shift)


def _time_batch(t: float, x: Tensor, num_train_timesteps: int) -> Tensor:
    return torch.full((x.shape[0],), t * num_train_timesteps, dtype=torch.float32, device=x.device)


def flow_euler_step(x: Tensor, velocity: Tensor, *, t: float, t_next: float) -> Tensor:
    """x_{t_next} = x_t + (t_next - t) v (explicit Euler on dx/dt = v)."""
    return (x.double() + (t_next - t) * velocity.double()).to(x.dtype)


def flow_heun_step(
    denoise_fn: FlowDenoiseFn, x: Tensor, velocity: Tensor, *, t: float, t_next: float, num_train_timesteps: int
) -> Tensor:
    """Heun's step (Karras et al. 2022, Algorithm 1 lines 5-8): an Euler predictor, then the mean of
    the velocities at both ends; a plain Euler step when t_next = 0."""
    predicted = flow_euler_step(x, velocity, t=t, t_next=t_next)
    if t_next == 0:
        return predicted
    velocity_next = denoise_fn(predicted, _time_batch(t_next, x, num_train_timesteps))
    return flow_euler_step(x, (velocity.double() + velocity_next.double()) / 2, t=t, t_next=t_next)


def flow_sample(
    denoise_fn: FlowDenoiseFn,
    x_1: Tensor,
    sigmas: Tensor,
    *,
    method: Literal["euler", "heun"] = "euler",
    num_train_timesteps: int = 1000,
    callback: FlowCallback | None = None,
) -> Tensor:
    """Integrate dx/dt = v_θ from x_1 (pure noise) down the descending `sigmas` (ending at 0)."""
    x = x_1
    times = [float(s) for s in sigmas]
    for index, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
        velocity = denoise_fn(x, _time_batch(t, x, num_train_timesteps))
        if method == "euler":
            x = flow_euler_step(x, velocity, t=t, t_next=t_next)
        elif method == "heun":
            x = flow_heun_step(denoise_fn, x, velocity, t=t, t_next=t_next, num_train_timesteps=num_train_timesteps)
        else:
            raise ValueError(f"unknown flow sampler {method!r}; valid: euler, heun")
        if callback is not None:
            callback(index, t, x)
    return x
