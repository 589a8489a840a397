"""LVDM autoregressive and hierarchical strategies on tiny random denoisers."""

from __future__ import annotations

import torch

from model_zoo.diffusion.schedules import alphas_cumprod, ddim_timesteps, make_betas
from sampler.strategies.common import SamplingSetup
from sampler.strategies.lvdm_autoregressive import autoregressive, autoregressive_clips
from sampler.strategies.lvdm_hierarchical import (
    HierarchicalConfig,
    HierarchicalPlan,
    assemble_hierarchical,
    fill_gap,
    hierarchical,
)

SCHEDULE = alphas_cumprod(make_betas("sqrt_linear", 1000, 0.0015, 0.0155))
CONFIG = HierarchicalConfig(clip_frames=4, cond_frames=1, keyframe_stride=3, perturb_level=100, uncond_weight=0.1)


def make_setup(frame_shape=(1, 2, 3, 3)) -> SamplingSetup:
    return SamplingSetup(
        timesteps=ddim_timesteps(1000, 5), alphas_cumprod=SCHEDULE, frame_shape=frame_shape, eta=1.0
    )


class RecordingModel:
    """A random masked-input denoiser ε(net_input, t, s) that records every call."""

    def __init__(self, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(3, 2, generator=gen) / 2
        self.calls: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def __call__(self, net_input, t, perturb_level):
        self.calls.append((net_input.clone(), None if perturb_level is None else perturb_level.clone()))
        level = 0.0 if perturb_level is None else float(perturb_level[0]) / 1000
        mixed = torch.einsum("bchwf,cd->bdhwf", net_input.movedim(2, -1), self.weight).movedim(-1, 2)
        return torch.tanh(mixed + t.float().view(-1, 1, 1, 1, 1) / 1000 + level)


def test_autoregressive_frame_counts_conditioning_and_guidance():
    model = RecordingModel(0)
    video = autoregressive(model, num_frames=10, setup=make_setup(), config=CONFIG, seed=1)
    assert video.shape == (1, 2, 10, 3, 3)
    # clip 0: 5 steps, unconditional only; clips 1 and 2: 5 steps x (cond + uncond)
    assert len(model.calls) == 5 + 2 * 5 * 2
    for net_input, level in model.calls[:5]:
        assert level is None and not net_input[:, 2].any()
    clip1_calls = model.calls[5:15]
    cond_calls = [c for c in clip1_calls if c[1] is not None]
    uncond_calls = [c for c in clip1_calls if c[1] is None]
    assert len(cond_calls) == len(uncond_calls) == 5
    for net_input, level in cond_calls:
        assert level.tolist() == [100]
        assert net_input[0, 2, :, 0, 0].tolist() == [1.0, 0.0, 0.0, 0.0]
        # the conditioning frame stays fixed through the clip's steps
        torch.testing.assert_close(net_input[:, :2, :1], cond_calls[0][0][:, :2, :1])
    for net_input, _ in uncond_calls:
        assert not net_input[:, 2].any()


def test_conditioning_is_the_previous_latent_perturbed_to_level_s():
    setup = make_setup(frame_shape=(1, 4, 24, 24))
    model = RecordingModel(1)
    model.weight = torch.randn(5, 4, generator=torch.Generator().manual_seed(5)) / 2
    clips = autoregressive_clips(model, setup=setup, config=CONFIG, seed=2)
    first = next(clips)
    model.calls.clear()
    next(clips)
    z_cond = next(c[0] for c in model.calls if c[1] is not None)[:, :4, :1]
    a = SCHEDULE[100].float()
    implied_noise = (z_cond - a.sqrt() * first[:, :, -1:]) / (1 - a).sqrt()
    assert abs(float(implied_noise.mean())) < 0.1
    assert abs(float(implied_noise.std()) - 1.0) < 0.08


def test_autoregressive_resumes_from_its_context():
    model = RecordingModel(2)
    setup = make_setup()
    video = autoregressive(model, num_frames=13, setup=setup, config=CONFIG, seed=3)
    resumed = autoregressive_clips(
        model, setup=setup, config=CONFIG, seed=3, context=video[:, :, :7], start_clip=2
    )
    torch.testing.assert_close(next(resumed), video[:, :, 7:10])


def test_hierarchical_plan():
    plan = HierarchicalPlan(num_frames=10, keyframe_stride=3)
    assert plan.num_keyframes == 4 and plan.gaps == [(0, 1), (1, 2), (2, 3)]
    assert HierarchicalPlan(num_frames=11, keyframe_stride=3).num_keyframes == 5


def test_hierarchical_gaps_are_independent_units():
    predict, interpolate = RecordingModel(3), RecordingModel(4)
    setup = make_setup()
    video = hierarchical(predict, interpolate, num_frames=10, setup=setup, config=CONFIG, seed=4)
    assert video.shape == (1, 2, 10, 3, 3)
    interp_masks = {tuple(c[0][0, 2, :, 0, 0].tolist()) for c in interpolate.calls}
    assert interp_masks == {(1.0, 0.0, 0.0, 1.0), (0.0, 0.0, 0.0, 0.0)}
    keyframes = video[:, :, ::3]
    # gaps computed in another order, each from its two keyframes only, as two ranks would
    fills = {}
    for index in (2, 0, 1):
        fills[index] = fill_gap(
            interpolate,
            keyframes[:, :, index : index + 1],
            keyframes[:, :, index + 1 : index + 2],
            gap_index=index,
            setup=setup,
            config=CONFIG,
            seed=4,
        )
    plan = HierarchicalPlan(num_frames=10, keyframe_stride=3)
    reassembled = assemble_hierarchical(keyframes, [fills[i] for i in range(3)], plan)
    torch.testing.assert_close(reassembled, video)
    torch.testing.assert_close(
        keyframes, autoregressive(RecordingModel(3), num_frames=4, setup=setup, config=CONFIG, seed=4)
    )
