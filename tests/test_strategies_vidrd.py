"""VidRD: FNR/PNS noise statistics, the DSG step schedule, and DSG copying during the guided steps."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from model_zoo.diffusion.schedules import alphas_cumprod, ddim_timesteps, make_betas
from sampler.strategies.common import SamplingSetup
from sampler.strategies.vidrd import VidRDConfig, dsg_schedule, reused_noise, vidrd, vidrd_clip

CONFIG = VidRDConfig(clip_frames=8, overlap=4, alpha=4.0, beta=0.4)


def make_setup(num_steps: int = 10, eta: float = 0.0) -> SamplingSetup:
    schedule = alphas_cumprod(make_betas("scaled_linear"))
    return SamplingSetup(
        timesteps=ddim_timesteps(1000, num_steps), alphas_cumprod=schedule, frame_shape=(1, 2, 3, 3), eta=eta
    )


def temporal_mixing_denoiser(seed: int = 0):
    """A tiny random denoiser whose output for each frame depends on all frames and on t."""
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(8, 8, generator=gen) / 3

    def denoise(x, t):
        phase = (t.float() / 1000).view(-1, 1, 1, 1, 1)
        return torch.tanh(torch.einsum("bcfhw,gf->bcghw", x, mixing) + phase)

    return denoise


def test_pns_keeps_unit_variance_and_fnr_copies_reversed_noise():
    gen = torch.Generator().manual_seed(0)
    previous = torch.randn(20000, 1, 8, 1, 1, generator=gen)
    z_T = reused_noise(previous, torch.randn(previous.shape, generator=gen), CONFIG)
    torch.testing.assert_close(z_T[:, :, :4], previous.flip(2)[:, :, :4])
    variances = z_T.var(dim=0).flatten()
    assert torch.allclose(variances, torch.ones(8), atol=0.03)
    for j in range(4, 8):
        correlation = torch.corrcoef(torch.stack([z_T[:, 0, j, 0, 0], previous[:, 0, 7 - j, 0, 0]]))[0, 1]
        assert float(correlation) == pytest.approx(4 / math.sqrt(17), abs=0.01)


def test_dsg_schedule_counts_match_the_paper():
    copy = dsg_schedule(50, CONFIG)
    assert copy.sum(dim=0).tolist() == [20, 15, 10, 5]
    # staged: frame j is copied during the *first* steps only
    assert copy[:20, 0].all() and not copy[20:, 0].any()
    assert not dsg_schedule(50, VidRDConfig(beta=0.0)).any()
    assert dsg_schedule(50, VidRDConfig(beta=1.0)).sum(dim=0).tolist() == [50, 38, 25, 13]


def test_dsg_overlap_frames_equal_reversed_previous_latents_during_guided_steps():
    setup, denoise = make_setup(num_steps=10), temporal_mixing_denoiser()
    first_steps: list[torch.Tensor] = []
    _, state = vidrd_clip(
        denoise, None, setup=setup, config=CONFIG, seed=3, callback=lambda k, x: first_steps.append(x)
    )
    second_steps: list[torch.Tensor] = []
    vidrd_clip(
        denoise, state, setup=setup, config=CONFIG, seed=3, callback=lambda k, x: second_steps.append(x)
    )
    copy = dsg_schedule(10, CONFIG)
    assert copy.sum(dim=0).tolist() == [4, 3, 2, 1]
    for k in range(10):
        for j in range(4):
            same = torch.equal(second_steps[k][:, :, j], first_steps[k][:, :, 7 - j])
            assert same == bool(copy[k, j]), (k, j)
    # the state carries clip 0's tail frames after each guided step
    torch.testing.assert_close(state.guide_trajectory[0], first_steps[0][:, :, 4:])


def test_vidrd_long_sequence_is_deterministic_and_resumable():
    setup, denoise = make_setup(num_steps=6, eta=1.0), temporal_mixing_denoiser(1)
    video = vidrd(denoise, num_frames=20, setup=setup, config=CONFIG, seed=9)
    assert video.shape == (1, 2, 20, 3, 3)
    torch.testing.assert_close(video, vidrd(denoise, num_frames=20, setup=setup, config=CONFIG, seed=9))
    assert not torch.allclose(video, vidrd(denoise, num_frames=20, setup=setup, config=CONFIG, seed=10))
    # resuming from the saved state of clip 0 reproduces clips 1 and 2
    clip0, state = vidrd_clip(denoise, None, setup=setup, config=CONFIG, seed=9)
    clip1, state = vidrd_clip(denoise, state, setup=setup, config=CONFIG, seed=9)
    torch.testing.assert_close(torch.cat([clip0, clip1], dim=2), video[:, :, :16])


def test_naive_chunking_flags_give_every_clip_fresh_noise_and_no_guidance():
    """--no-noise-reversion --alpha 0 --beta 0: no FNR, no PNS, no DSG, i.e. independent clips."""
    naive = VidRDConfig(clip_frames=8, overlap=4, alpha=0.0, beta=0.0, noise_reversion=False)
    gen = torch.Generator().manual_seed(0)
    previous, fresh = torch.randn(1, 2, 8, 3, 3, generator=gen), torch.randn(1, 2, 8, 3, 3, generator=gen)
    assert torch.equal(reused_noise(previous, fresh, naive), fresh)
    assert not dsg_schedule(10, naive).any()
    setup, denoise = make_setup(), temporal_mixing_denoiser()
    first, state = vidrd_clip(denoise, None, setup=setup, config=naive, seed=3)
    second, _ = vidrd_clip(denoise, state, setup=setup, config=naive, seed=3)
    # Clip 1 does not depend on clip 0: another previous clip gives the same clip 1.
    other = replace(state, initial_noise=torch.randn_like(state.initial_noise))
    other = replace(other, guide_trajectory=torch.randn_like(state.guide_trajectory))
    torch.testing.assert_close(vidrd_clip(denoise, other, setup=setup, config=naive, seed=3)[0], second)
    _, guided = vidrd_clip(denoise, None, setup=setup, config=CONFIG, seed=3)  # with FNR + PNS + DSG it does
    changed = replace(guided, initial_noise=torch.randn_like(guided.initial_noise))
    clips = [vidrd_clip(denoise, s, setup=setup, config=CONFIG, seed=3)[0] for s in (guided, changed)]
    assert not torch.allclose(*clips)
