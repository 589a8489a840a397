"""Property tests, one per paper mechanism of the model zoo (part B families)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from einops import rearrange

import model_zoo
from model_zoo.cmd import (
    content_condition,
    content_model_config,
    motion_model_config,
    pack_motion,
    patchify_content,
    unpack_motion,
    unpatchify_content,
)
from model_zoo.layers.time_padded_conv import Conv3d
from model_zoo.temporal_decoder_vae import TemporalDecoderVAE
from model_zoo.videofusion import DecomposedNoise


def _seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- LVDM video VAE ----------------------------------------------------------------------


def test_video_vae_encoder_is_temporally_shift_equivariant_away_from_borders() -> None:
    torch.manual_seed(0)
    vae = model_zoo.build_model("video_vae", "tiny").eval()
    factor = vae.config.downsample[0]
    # Encoder receptive field of the tiny flavour: 24 input frames each side = 12 latent frames.
    margin, frames = 13, 64
    video = torch.randn(1, 3, frames + factor, 16, 16, generator=_seeded())
    with torch.no_grad():
        base = vae.encode(video[:, :, :frames]).mode()
        shifted = vae.encode(video[:, :, factor:]).mode()
    interior = slice(margin, base.shape[2] - margin)
    assert interior.stop - interior.start >= 4
    expected = base[:, :, margin + 1 : base.shape[2] - margin + 1]
    torch.testing.assert_close(shifted[:, :, interior], expected, atol=1e-5, rtol=1e-5)
    # Not trivially constant in time, and the borders do see the padding.
    assert (base[:, :, 1:] - base[:, :, :-1]).abs().amax() > 1e-2
    assert not torch.allclose(shifted[:, :, -1], base[:, :, -1], atol=1e-3)


@pytest.mark.parametrize("stride", [(1, 1, 1), (2, 2, 2)])
def test_onednn_conv3d_matches_pytorch_conv3d_and_runs_on_onednn_at_batch_one(
    stride: tuple[int, int, int],
) -> None:
    """`Conv3d` takes oneDNN where PyTorch's heuristic would run slow_conv3d (batch 1, small),
    with nn.Conv3d's values and gradients to float32 rounding."""
    torch.manual_seed(0)
    ours = Conv3d(8, 6, 3, stride=stride, padding=1)
    plain = torch.nn.Conv3d(8, 6, 3, stride=stride, padding=1)
    plain.load_state_dict(ours.state_dict())
    x = torch.randn(1, 8, 6, 10, 10, requires_grad=True)
    with torch.profiler.profile() as prof:
        y = ours(x)
    ops = {event.key for event in prof.key_averages()}
    assert "aten::mkldnn_convolution" in ops and "aten::slow_conv3d_forward" not in ops
    x_plain = x.detach().clone().requires_grad_(True)
    y_plain = plain(x_plain)
    torch.testing.assert_close(y, y_plain, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    y_plain.square().sum().backward()
    torch.testing.assert_close(x.grad, x_plain.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.weight.grad, plain.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.bias.grad, plain.bias.grad, rtol=1e-4, atol=1e-4)
    assert torch.equal(ours(x), y)  # deterministic
    with torch.device("meta"):  # other devices keep nn.Conv3d's path
        assert ours.to("meta")(torch.empty(1, 8, 6, 10, 10)).shape == y.shape
    with pytest.raises(ValueError, match="groups=1"):
        Conv3d(8, 8, 3, groups=2)


def test_video_vae_latent_shapes_scaling_and_kl() -> None:
    vae = model_zoo.build_model("video_vae", "tiny", scale_factor=0.5, shift_factor=1.0)
    video = torch.randn(2, 3, 8, 32, 32, generator=_seeded())
    posterior = vae.encode(video)
    assert posterior.mean.shape == (2, 4, 4, 8, 8)
    assert posterior.kl().shape == (2,) and bool((posterior.kl() >= 0).all())
    z = posterior.sample(_seeded(3))
    torch.testing.assert_close(z, posterior.sample(_seeded(3)))
    latents = vae.to_latents(video, generator=_seeded(3))
    torch.testing.assert_close(latents, (z - 1.0) * 0.5)
    torch.testing.assert_close(vae.from_latents(latents), vae.decode(z), atol=1e-5, rtol=1e-5)
    recon, _ = vae(video)
    assert recon.shape == video.shape


def test_video_vae_paper_flavour_on_meta() -> None:
    vae = model_zoo.build_model("video_vae", "lvdm", device="meta")
    posterior = vae.encode(torch.empty(1, 3, 16, 256, 256, device="meta"))
    assert posterior.mean.shape == (1, 4, 4, 32, 32)


def test_video_vae_rejects_downsampling_it_cannot_do() -> None:
    with pytest.raises(ValueError, match="powers of two"):
        model_zoo.build_model("video_vae", "tiny", downsample=(3, 4, 4))
    with pytest.raises(ValueError, match="halvings"):
        model_zoo.build_model("video_vae", "tiny", downsample=(2, 8, 8))


def test_video_discriminator_gives_patch_logits() -> None:
    disc = model_zoo.build_model("video_discriminator", "tiny")
    logits = disc(torch.randn(2, 3, 8, 32, 32, generator=_seeded()))
    assert logits.shape == (2, 1, 2, 6, 6)
    paper = model_zoo.build_model("video_discriminator", "paper", device="meta")
    assert paper(torch.empty(1, 3, 16, 256, 256, device="meta")).shape == (1, 1, 2, 30, 30)


# ---- VidRD temporal-aware decoder --------------------------------------------------------


def test_temporal_decoder_at_init_equals_the_image_decoder_exactly() -> None:
    torch.manual_seed(0)
    model = model_zoo.build_model("temporal_decoder_vae", "tiny")
    z = torch.randn(2, 4, 5, 4, 4, generator=_seeded())
    with torch.no_grad():
        video = model.decode(z)
        image = model.vae.decode(rearrange(z, "b c t h w -> (b t) c h w")).sample
    assert torch.equal(video, rearrange(image, "(b t) c h w -> b c t h w", t=5))


def test_temporal_decoder_trains_only_temporal_layers_and_they_mix_frames() -> None:
    torch.manual_seed(0)
    model = model_zoo.build_model("temporal_decoder_vae", "tiny")
    names = model.trainable_parameter_names()
    assert names and all(n.startswith(("mid_temporal.", "up_temporal.")) for n in names)
    assert not any(p.requires_grad for p in model.vae.parameters())
    with torch.no_grad():
        for temporal in model.up_temporal[0]:
            temporal.conv.weight.normal_(0, 0.1)
    z = torch.randn(1, 4, 4, 4, 4, generator=_seeded())
    edited = z.clone()
    edited[:, :, 0] += 1.0
    with torch.no_grad():
        change = (model.decode(edited) - model.decode(z)).abs().amax(dim=(0, 1, 3, 4))
    assert change[1] > 0  # frame 1 now sees frame 0 through the temporal convolution
    video = torch.randn(1, 3, 4, 32, 32, generator=_seeded(1))
    recon, posterior = model(video)
    assert recon.shape == video.shape and posterior.mean.shape == (1, 4, 4, 4, 4)


def test_temporal_decoder_loads_image_vae_weights_from_a_local_diffusers_folder(tmp_path: Path) -> None:
    torch.manual_seed(1)
    reference = model_zoo.build_model("temporal_decoder_vae", "tiny")
    image_vae = AutoencoderKL.from_config(reference.vae.config)
    image_vae.save_pretrained(tmp_path / "sd-vae")
    torch.manual_seed(2)
    model = model_zoo.build_model("temporal_decoder_vae", "tiny", pretrained_path=str(tmp_path / "sd-vae"))
    for key, value in image_vae.state_dict().items():
        assert torch.equal(model.vae.state_dict()[key], value), key
    assert model.config.pretrained_path is None  # the saved model is self-contained
    frames = torch.randn(3, 3, 32, 32, generator=_seeded())
    with torch.no_grad():
        expected = image_vae.encode(frames).latent_dist.mean
        got = model.encode(rearrange(frames, "(b t) c h w -> b c t h w", b=1)).mode()
    assert torch.equal(rearrange(got, "b c t h w -> (b t) c h w"), expected)


def test_temporal_decoder_rejects_a_mismatched_pretrained_folder(tmp_path: Path) -> None:
    other = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="does not fit"):
        model_zoo.build_model("temporal_decoder_vae", "tiny", pretrained_path=str(tmp_path / "other"))
    with pytest.raises(FileNotFoundError):
        TemporalDecoderVAE(
            model_zoo.make_config("temporal_decoder_vae", "tiny", pretrained_path=str(tmp_path))
        )


# ---- VideoFusion decomposed noise --------------------------------------------------------


@pytest.mark.parametrize("lam", [0.25, 0.5, 0.8])
def test_decomposed_noise_has_standard_marginals_and_interframe_correlation_lam(lam: float) -> None:
    frames = 6
    eps, base, residual = DecomposedNoise(lam).sample((4000, 1, frames, 2, 2), _seeded())
    assert base.shape == (4000, 1, 1, 2, 2) and residual.shape == eps.shape
    per_frame = rearrange(eps, "b c t h w -> t (b c h w)")  # 16000 draws per frame
    assert per_frame.mean(dim=1).abs().amax() < 0.03
    assert (per_frame.std(dim=1) - 1).abs().amax() < 0.03
    kurtosis = (per_frame**4).mean(dim=1) / per_frame.var(dim=1) ** 2
    assert (kurtosis - 3).abs().amax() < 0.15
    corr = torch.corrcoef(per_frame)
    off_diagonal = corr[~torch.eye(frames, dtype=torch.bool)]
    assert (off_diagonal - lam).abs().amax() < 0.03
    torch.testing.assert_close(eps - (1 - lam) ** 0.5 * residual, (lam**0.5 * base).expand_as(eps))


def test_decomposed_noise_keeps_a_given_base_and_redraws_residuals() -> None:
    noise = DecomposedNoise(0.5)
    _, base, first = noise.sample((1, 4, 8, 4, 4), _seeded(0))
    _, again, second = noise.sample((1, 4, 8, 4, 4), _seeded(1), base=base)
    assert again is base and not torch.allclose(first, second)
    with pytest.raises(ValueError):
        DecomposedNoise(1.5)


def _perturbed(model: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """Seeded perturbation of every weight, so zero-initialised paths become observable."""
    generator = _seeded(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return model


# ---- StreamingT2V CAM + APM --------------------------------------------------------------


def _streaming_with_random_base() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    model = model_zoo.build_model("streaming_t2v", "tiny")
    reference = _perturbed(model_zoo.build_from_config(model.config.base), scale=0.1)
    model.load_base_state_dict(reference.state_dict())
    return model, reference


def test_cam_and_apm_at_init_leave_the_base_unet_output_unchanged() -> None:
    model, reference = _streaming_with_random_base()
    x = model.example_input(2)
    inputs = model.example_inputs(x)
    with torch.no_grad():  # same attention kernels on both sides for a bitwise comparison
        out = model(x, **inputs)
        base = reference(x, inputs["t"], context=inputs["context"], level=inputs["level"])
    assert base.abs().amax() > 0.1
    assert torch.equal(out, base)


def test_cam_and_apm_train_alone_and_condition_once_trained() -> None:
    model, reference = _streaming_with_random_base()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        n for n, p in model.named_parameters() if any(p is q for q in model.trainable_parameters())
    }
    assert all(n.startswith(("cam.", "apm.")) or n.endswith(".alpha") for n in trainable)
    assert sum(n.endswith(".alpha") for n in trainable) > 0
    assert not any(p.requires_grad for n, p in model.base.named_parameters() if not n.endswith(".alpha"))
    x = model.example_input(1)
    inputs = model.example_inputs(x)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in trainable:
                p.add_(0.1 * torch.randn(p.shape, generator=_seeded(3)))
        out = model(x, **inputs)
        other_memory = model(x, **(inputs | {"cond_latents": torch.randn_like(inputs["cond_latents"])}))
        other_anchor = model(x, **(inputs | {"anchor": torch.randn_like(inputs["anchor"])}))
    assert (out - other_memory).abs().amax() > 1e-4
    assert (out - other_anchor).abs().amax() > 1e-4


# ---- CMD content-motion autoencoder ------------------------------------------------------


def test_cmd_content_frame_is_a_per_pixel_convex_combination_of_frames() -> None:
    torch.manual_seed(0)
    model = _perturbed(model_zoo.build_model("cmd", "tiny"), scale=0.2)
    image = torch.randn(2, 3, 1, 16, 16, generator=_seeded())
    with torch.no_grad():
        static_content, _ = model.encode(image.expand(-1, -1, 4, -1, -1))
        video = torch.randn(2, 3, 4, 16, 16, generator=_seeded(1))
        content, motion = model.encode(video)
        recon, _, _ = model(video)
    torch.testing.assert_close(static_content, image[:, :, 0], atol=1e-5, rtol=1e-5)
    assert bool((content <= video.amax(dim=2) + 1e-5).all() and (content >= video.amin(dim=2) - 1e-5).all())
    assert not torch.allclose(content, video.mean(dim=2), atol=1e-3)  # weights are predicted, not uniform
    assert motion.z_x.shape == (2, 8, 4, 4) and motion.z_y.shape == (2, 8, 4, 4)
    assert recon.shape == video.shape


def test_cmd_latents_feed_the_reused_dit_and_image_unet() -> None:
    torch.manual_seed(0)
    autoencoder = model_zoo.build_model("cmd", "tiny")
    video = torch.randn(2, 3, 4, 16, 16, generator=_seeded())
    with torch.no_grad():
        content, motion = autoencoder.encode(video)
    packed = pack_motion(motion)
    assert packed.shape == (2, 8, 4, 1, 8)  # (B, m, L, 1, h + w)
    restored = unpack_motion(packed, rows=4)
    assert torch.equal(restored.z_x, motion.z_x) and torch.equal(restored.z_y, motion.z_y)
    motion_model = model_zoo.build_from_config(motion_model_config(autoencoder.config, "tiny"))
    condition = content_condition(content, autoencoder.config.patch_size)
    assert condition.shape == (2, 48, 1, 8)
    prediction = motion_model(
        packed, torch.tensor([10, 900]), context=torch.randn(2, 5, 32), cond_frame=condition
    )
    assert prediction.shape == packed.shape
    patches = patchify_content(content, autoencoder.config.patch_size)
    assert patches.shape == (2, 48, 4, 4)
    assert torch.equal(unpatchify_content(patches, autoencoder.config.patch_size), content)
    content_model = model_zoo.build_from_config(content_model_config(autoencoder.config, "tiny"))
    assert content_model(patches[:, :, None], torch.tensor([1, 2])).shape == (2, 48, 1, 4, 4)
