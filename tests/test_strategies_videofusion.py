"""VideoFusion windows: one base noise shared across windows, residual noise per window."""

from __future__ import annotations

import pytest
import torch

from model_zoo.diffusion.schedules import alphas_cumprod, ddim_timesteps, make_betas
from sampler.strategies.common import SamplingSetup
from sampler.strategies.videofusion import (
    VideoFusionConfig,
    base_noise,
    sample_window,
    videofusion,
    window_initial_noise,
)

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
