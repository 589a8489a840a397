"""Forward process, targets, losses, LVDM mask conditioning and conditional latent perturbation."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from model_zoo.diffusion.objectives import (
    apply_mask_conditioning,
    build_mask,
    diffusion_loss,
    draw_mask_kind,
    draw_masks,
    draw_perturbation_levels,
    perturb_condition,
    predict_x0_eps,
    q_sample,
    target,
)
from model_zoo.diffusion.schedules import alphas_cumprod, make_betas

SCHEDULE = alphas_cumprod(make_betas("sqrt_linear", 1000, 0.0015, 0.0155))


def latents(seed: int, shape=(3, 4, 6, 5, 5)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_q_sample_and_v_target_match_diffusers():
    reference = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0155)
    reference.alphas_cumprod = SCHEDULE.clone()
    x0, noise, t = latents(0), latents(1), torch.tensor([0, 417, 999])
    torch.testing.assert_close(q_sample(x0, t, noise, SCHEDULE), reference.add_noise(x0, noise, t))
    torch.testing.assert_close(
        target("v", x0=x0, noise=noise, t=t, alphas_cumprod=SCHEDULE), reference.get_velocity(x0, noise, t)
    )


@pytest.mark.parametrize("kind", ["eps", "v", "x0"])
def test_predict_x0_eps_inverts_every_target(kind):
    x0, noise, t = latents(2), latents(3), torch.tensor([5, 500, 990])
    x_t = q_sample(x0, t, noise, SCHEDULE)
    output = target(kind, x0=x0, noise=noise, t=t, alphas_cumprod=SCHEDULE)
    x0_hat, eps_hat = predict_x0_eps(output, x_t, t, alphas_cumprod=SCHEDULE, parameterization=kind)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, noise)


@pytest.mark.parametrize("kind", ["eps", "v", "x0"])
def test_loss_is_zero_for_the_exact_denoiser_and_positive_otherwise(kind):
    x0, noise, t = latents(4), latents(5), torch.tensor([10, 300, 700])
    exact = target(kind, x0=x0, noise=noise, t=t, alphas_cumprod=SCHEDULE)
    kwargs = dict(t=t, noise=noise, alphas_cumprod=SCHEDULE, parameterization=kind)
    assert diffusion_loss(lambda x, t: exact, x0, **kwargs).tolist() == [0.0, 0.0, 0.0]
    per_sample = diffusion_loss(lambda x, t: exact + 0.5, x0, **kwargs, loss_type="l2")
    assert per_sample.shape == (3,) and per_sample.tolist() == pytest.approx([0.25] * 3)
    assert diffusion_loss(lambda x, t: exact + 0.5, x0, **kwargs, loss_type="l1").tolist() == pytest.approx([0.5] * 3)


def test_the_denoiser_sees_the_forward_process_and_the_condition():
    x0, noise, t = latents(4), latents(5), torch.tensor([10, 300, 700])
    seen = {}

    def denoise(x, t, *, context):
        seen["x_t"], seen["context"] = x, context
        return noise

    loss = diffusion_loss(denoise, x0, cond={"context": "text"}, t=t, noise=noise, alphas_cumprod=SCHEDULE)
    assert seen["context"] == "text" and loss.tolist() == [0.0, 0.0, 0.0]
    torch.testing.assert_close(seen["x_t"], q_sample(x0, t, noise, SCHEDULE))


def test_the_error_is_computed_in_float32_for_a_bf16_network():
    x0, noise, t = latents(4).float(), latents(5).float(), torch.tensor([10, 300, 700])
    loss = diffusion_loss(lambda x, t: (noise + 1e-3).bfloat16(), x0, t=t, noise=noise, alphas_cumprod=SCHEDULE)
    assert loss.dtype == torch.float32


def test_frame_weight_restricts_each_samples_loss_to_its_predicted_frames():
    """An error confined to the given (masked) frames costs nothing; on predicted frames it does.
    Each sample's loss is the mean over its own counted frames (0 when none count)."""
    x0, noise, t = latents(6), latents(7), torch.tensor([100, 200, 300])
    mask = build_mask("prediction", 6, 2)
    wrong_on_given = noise.clone()
    wrong_on_given[:, :, :2] += 3.0
    wrong_on_predicted = noise.clone()
    wrong_on_predicted[:, :, 4] += 3.0
    kwargs = dict(t=t, noise=noise, alphas_cumprod=SCHEDULE, frame_weight=1 - mask)
    assert diffusion_loss(lambda x, t: wrong_on_given, x0, **kwargs).tolist() == [0.0, 0.0, 0.0]
    # one wrong frame among the four predicted ones: 9 / 4
    assert diffusion_loss(lambda x, t: wrong_on_predicted, x0, **kwargs).tolist() == pytest.approx([9.0 / 4] * 3)
    per_sample = torch.stack([1 - mask, torch.ones(6), torch.zeros(6)])
    loss = diffusion_loss(lambda x, t: wrong_on_given, x0, **{**kwargs, "frame_weight": per_sample})
    assert loss.tolist() == pytest.approx([0.0, 9.0 * 2 / 6, 0.0])


def test_masks():
    assert build_mask("none", 5).tolist() == [0, 0, 0, 0, 0]
    assert build_mask("prediction", 5, 2).tolist() == [1, 1, 0, 0, 0]
    assert build_mask("interpolation", 5).tolist() == [1, 0, 0, 0, 1]
    with pytest.raises(ValueError):
        build_mask("middle", 5)  # type: ignore[arg-type]


def test_mask_kind_frequencies_follow_p_pred_and_p_interp():
    gen = torch.Generator().manual_seed(0)
    kinds = [draw_mask_kind(gen, 0.5, 0.3) for _ in range(4000)]
    assert kinds.count("prediction") / 4000 == pytest.approx(0.5, abs=0.03)
    assert kinds.count("interpolation") / 4000 == pytest.approx(0.3, abs=0.03)
    assert kinds.count("none") / 4000 == pytest.approx(0.2, abs=0.03)
    masks = draw_masks(torch.Generator().manual_seed(1), 64, 4, num_cond_frames=1, p_pred=0.0, p_interp=0.9)
    rows = {tuple(row.tolist()) for row in masks}
    assert rows == {(1.0, 0.0, 0.0, 1.0), (0.0, 0.0, 0.0, 0.0)}
    with pytest.raises(ValueError):
        draw_mask_kind(gen, 0.6, 0.6)


def test_apply_mask_conditioning():
    z_t, z_cond = latents(8), latents(9)
    mask = build_mask("interpolation", 6)
    net_input = apply_mask_conditioning(z_t, z_cond, mask)
    assert net_input.shape == (3, 5, 6, 5, 5)
    torch.testing.assert_close(net_input[:, :4, [0, 5]], z_cond[:, :, [0, 5]])
    torch.testing.assert_close(net_input[:, :4, 1:5], z_t[:, :, 1:5])
    assert net_input[:, 4].sum(dim=(0, 2, 3)).tolist() == [75.0, 0, 0, 0, 0, 75.0]
    per_sample = torch.stack([build_mask("prediction", 6, 3), build_mask("none", 6), mask])
    net_input = apply_mask_conditioning(z_t, z_cond, per_sample)
    torch.testing.assert_close(net_input[1, :4], z_t[1])
    torch.testing.assert_close(net_input[0, :4, :3], z_cond[0, :, :3])


def test_conditional_latent_perturbation():
    gen = torch.Generator().manual_seed(3)
    levels = draw_perturbation_levels(gen, 20000, s_max=250)
    assert int(levels.min()) == 0 and int(levels.max()) == 250
    assert float(levels.double().mean()) == pytest.approx(125, abs=2)
    z0, noise = latents(10), latents(11)
    s = torch.tensor([0, 100, 250])
    perturbed = perturb_condition(z0, s, noise, SCHEDULE)
    torch.testing.assert_close(perturbed, q_sample(z0, s, noise, SCHEDULE))
    # larger s, further from the clean latents
    distances = [(perturbed[i] - z0[i]).norm() / z0[i].norm() for i in range(3)]
    assert distances[0] < distances[1] < distances[2]
