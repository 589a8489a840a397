"""VideoFusion windows: one base noise shared across windows, residual noise per window."""

from __future__ import annotations

import pytest
import torch
from einops import rearrange

from model_zoo.diffusion.schedules import alphas_cumprod, ddim_timesteps, make_betas
from sampler.pipeline import load_pipeline
from sampler.strategies.common import SamplingSetup
from sampler.strategies.videofusion import (
    VideoFusionConfig,
    base_noise,
    sample_window,
    videofusion,
    videofusion_denoiser,
    window_initial_noise,
    window_residual_noise,
    window_step_noise,
    with_model_lam,
)
from sampler.tiny import tiny_pipeline

SCHEDULE = alphas_cumprod(make_betas("scaled_linear"))


def make_setup(frame_shape=(1, 2, 3, 3)) -> SamplingSetup:
    return SamplingSetup(timesteps=ddim_timesteps(1000, 4), alphas_cumprod=SCHEDULE, frame_shape=frame_shape)


def denoiser(x, t):
    return torch.tanh(0.5 * x + 0.3 * x.mean(dim=2, keepdim=True) + t.float().view(-1, 1, 1, 1, 1) / 1000)


@pytest.mark.parametrize("lam", [0.0, 0.5, 0.8])
def test_windows_share_the_base_noise(lam):
    """Frames of *different* windows have noise correlation λ: only the base noise is shared."""
    setup, config = (
        make_setup(frame_shape=(1, 8, 64, 64)),
        VideoFusionConfig(clip_frames=4, lam=lam),
    )
    base = base_noise(setup, seed=0)
    first, _ = window_initial_noise(base, 0, setup=setup, config=config, seed=0)
    second, _ = window_initial_noise(base, 1, setup=setup, config=config, seed=0)
    correlation = torch.corrcoef(torch.stack([first[:, :, 0].flatten(), second[:, :, 3].flatten()]))[0, 1]
    assert float(correlation) == pytest.approx(lam, abs=0.03)
    assert float(first.std()) == pytest.approx(1.0, abs=0.03)


def test_long_video_is_windows_computed_independently():
    setup, config = make_setup(), VideoFusionConfig(clip_frames=4, lam=0.5)
    video = videofusion(denoiser, num_frames=10, setup=setup, config=config, seed=5)
    assert video.shape == (1, 2, 10, 3, 3)
    base = base_noise(setup, seed=5)
    third = sample_window(denoiser, base, 2, setup=setup, config=config, seed=5)
    torch.testing.assert_close(third[:, :, :2], video[:, :, 8:])
    assert not torch.allclose(video[:, :, :4], video[:, :, 4:8])


def test_windows_of_a_real_videofusion_model_share_b_and_redraw_only_the_residual(tmp_path):
    """On a tiny VideoFusion network (random init) and its own λ: the first model call of every
    window sees z_T = √λ·b + √(1-λ)·r_w with one b for the whole video and r_w the window's own
    draw; the network's base generator then removes √(1-ᾱ_T)·√λ·b̂ of that window."""
    pipeline = load_pipeline(tiny_pipeline(tmp_path / "videofusion", "videofusion", seed=1))
    model = pipeline.denoiser
    setup = make_setup(frame_shape=(1, 4, 4, 4))
    config = with_model_lam(VideoFusionConfig(clip_frames=4), model.config.lam)
    first_inputs, residual_inputs = [], []
    model.register_forward_pre_hook(lambda _m, args, kwargs: first_inputs.append(args[0]), with_kwargs=True)
    model.residual.input_conv.register_forward_pre_hook(lambda _m, args: residual_inputs.append(args[0]))
    with torch.no_grad():
        denoise = videofusion_denoiser(pipeline, "a red bicycle", 1.0, setup.alphas_cumprod)
        videofusion(denoise, num_frames=12, setup=setup, config=config, seed=7)
    steps = setup.num_steps
    window_inputs = first_inputs[::steps]  # the model's input at the first step of windows 0, 1, 2
    assert len(window_inputs) == 3
    base = base_noise(setup, seed=7)
    lam = model.config.lam
    shared = []
    for index, z_T in enumerate(window_inputs):
        residual, _ = window_residual_noise(index, setup=setup, config=config, seed=7)
        torch.testing.assert_close(z_T, model.noise.combine(base, residual), rtol=0, atol=0)
        shared.append(z_T - (1 - lam) ** 0.5 * residual)
    for other in shared[1:]:
        torch.testing.assert_close(other, shared[0], rtol=0, atol=1e-6)  # the same √λ·b in every window
    assert not torch.allclose(window_inputs[0], window_inputs[1], atol=1e-3)
    alpha_bar = setup.alphas_cumprod[int(setup.timesteps[0])]
    with torch.no_grad():
        context = pipeline.text_context("a red bicycle")
        b_hat = model.predict_base(window_inputs[1], setup.timesteps[:1], context=context)
    seen = rearrange(residual_inputs[steps], "(b t) c h w -> b c t h w", t=4)
    expected = window_inputs[1] - float((1 - alpha_bar).sqrt()) * lam**0.5 * b_hat
    torch.testing.assert_close(seen, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("lam", [0.3, 0.7])
def test_stochastic_steps_draw_decomposed_noise_whose_base_the_windows_share(lam):
    """η > 0: DDIM step k's fresh noise is √λ·b_k + √(1-λ)·r_k: standard normal per frame, frames
    of one window and frames of two windows correlated λ (b_k is the video's)."""
    setup = make_setup(frame_shape=(1, 8, 64, 64))
    first = window_step_noise(lam, torch.Generator().manual_seed(1), setup=setup, seed=4)
    second = window_step_noise(lam, torch.Generator().manual_seed(2), setup=setup, seed=4)
    like = torch.zeros(1, 8, 4, 64, 64)
    a, b = first(3, like), second(3, like)
    assert float(a.std()) == pytest.approx(1.0, abs=0.03)
    within = torch.corrcoef(torch.stack([a[:, :, 0].flatten(), a[:, :, 2].flatten()]))[0, 1]
    across = torch.corrcoef(torch.stack([a[:, :, 1].flatten(), b[:, :, 3].flatten()]))[0, 1]
    assert float(within) == pytest.approx(lam, abs=0.03) and float(across) == pytest.approx(lam, abs=0.03)
    other_step = first(4, like)
    assert float(torch.corrcoef(torch.stack([a.flatten(), other_step.flatten()]))[0, 1]) == pytest.approx(
        0, abs=0.03
    )


def test_at_lambda_one_a_real_model_gives_identical_windows_even_with_stochastic_steps(tmp_path):
    """λ = 1 puts all of the initial and of every step's noise in the shared base: the windows of
    a real (tiny, random-init) VideoFusion network coincide at η = 1."""
    pipeline = load_pipeline(tiny_pipeline(tmp_path / "videofusion", "videofusion", seed=2))
    setup = SamplingSetup(
        timesteps=ddim_timesteps(1000, 3), alphas_cumprod=SCHEDULE, frame_shape=(1, 4, 4, 4), eta=1.0
    )
    denoise = videofusion_denoiser(pipeline, "a red bicycle", 1.0, setup.alphas_cumprod)
    with torch.no_grad():
        video = videofusion(
            denoise, num_frames=8, setup=setup, config=VideoFusionConfig(clip_frames=4, lam=1.0), seed=3
        )
    torch.testing.assert_close(video[:, :, :4], video[:, :, 4:], rtol=0, atol=1e-6)
    assert video[:, :, :4].std() > 0
