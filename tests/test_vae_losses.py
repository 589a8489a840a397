"""The video VAE's training losses as LVDM's: the adaptive GAN weight at the decoder's last layer
from `disc_start` on, and the LPIPS-style perceptual term loaded from a local folder."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_trainer_tasks import _config

from model_zoo.perceptual import TAP_CHANNELS, PerceptualDistance, load_perceptual
from trainer.loop import train
from trainer.monitor import read_metrics
from trainer.tasks import build_task
from trainer.tasks.autoencoder import FIXED_GAN_WEIGHT, NO_PERCEPTUAL
from trainer.tasks.interface import Batch
from trainer.tasks.losses import adaptive_gan_weight, perceptual_loss


@pytest.fixture(scope="module")
def perceptual_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random VGG16-shaped network saved in the documented layout: torchvision's `features`
    state dict as vgg16.pth, lpips' linear layers (non-negative, as trained ones are) as vgg.pth."""
    directory = tmp_path_factory.mktemp("lpips")
    torch.manual_seed(0)
    distance = PerceptualDistance()
    torch.save(distance.features.state_dict(), directory / "vgg16.pth")
    linear = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(TAP_CHANNELS)}
    torch.save(linear, directory / "vgg.pth")
    return directory


def _task(tmp_path: Path, *overrides: str):
    cfg = _config("autoencoder.yaml", tmp_path, "unused", *overrides)
    return cfg.objective, build_task(cfg, torch.device("cpu"))


def _clips() -> Batch:
    video = torch.rand(2, 3, 8, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return Batch(captions=["", ""], video=video)


def test_adaptive_weight_is_the_ratio_of_gradient_norms_at_the_last_layer():
    torch.manual_seed(0)
    z, target, probe = torch.randn(6, 4), torch.randn(6, 3), torch.randn(3)
    hidden = torch.tanh(z @ torch.randn(4, 5))  # (N, 5): the last layer's input
    last = torch.randn(3, 5, requires_grad=True)
    recon = hidden @ last.T  # (N, 3)
    rec = F.mse_loss(recon, target)
    gan = -(recon @ probe).mean()  # a linear "discriminator"
    # By hand: d rec / dW = 2/(N·3) (x̂ - x)ᵀ h;  d gan / dW = -(1/N) probe ⊗ Σ_n h_n.
    rec_grad = 2 / recon.numel() * (recon - target).detach().T @ hidden
    gan_grad = -torch.outer(probe, hidden.sum(0)) / len(z)
    weight = adaptive_gan_weight(rec, gan, last)
    assert weight.item() == pytest.approx((rec_grad.norm() / (gan_grad.norm() + 1e-4)).item(), rel=1e-5)
    assert not weight.requires_grad
    (rec + weight * gan).backward()  # the graphs were kept for the real backward
    assert last.grad is not None
    tiny_gan = -(hidden @ last.T @ probe).mean() * 1e-12
    assert adaptive_gan_weight(1e3 * F.mse_loss(hidden @ last.T, target), tiny_gan, last).item() == 1e4


def test_adaptive_weight_applies_only_from_disc_start(tmp_path):
    objective, task = _task(tmp_path, "objective.disc_start=2")
    engines = dict(task.trained)
    before = task.losses(engines, _clips(), torch.Generator().manual_seed(5), step=1)
    assert [name for name, _ in before.losses] == ["model"] and "adv_weight" not in before.metrics
    out = task.losses(engines, _clips(), torch.Generator().manual_seed(5), step=2)
    assert [name for name, _ in out.losses] == ["model", "disc"]
    # The same step by hand: two separate backwards, reading the last weight's gradient.
    vae, disc = task.trained["model"], task.trained["disc"]
    video = _clips().video
    recon, posterior = vae(video, True, torch.Generator().manual_seed(5))
    rec, g_adv = F.l1_loss(recon, video), -disc(recon).mean()
    weight = vae.decoder_last_layer().conv.weight
    grads = []
    for term in (rec, g_adv):
        vae.zero_grad()
        term.backward(retain_graph=True)
        grads.append(weight.grad.clone())
    expected = objective.adv_weight * grads[0].norm() / (grads[1].norm() + 1e-4)
    assert out.metrics["adv_weight"] == pytest.approx(expected.item(), rel=1e-4)
    assert out.metrics["adv_weight"] != objective.adv_weight
    total = rec + objective.kl_weight * posterior.kl().mean() + expected * g_adv
    assert out.losses[0][1].item() == pytest.approx(total.item(), rel=1e-5)


def test_perceptual_distance_is_zero_for_identical_clips_and_positive_otherwise(perceptual_dir, tmp_path):
    distance = load_perceptual(perceptual_dir)
    saved = torch.load(perceptual_dir / "vgg.pth")
    assert torch.equal(distance.linear[2].weight, saved["lin2.model.1.weight"])
    assert torch.equal(distance.features[28].weight, torch.load(perceptual_dir / "vgg16.pth")["28.weight"])
    video = _clips().video
    assert perceptual_loss(distance, video, video).item() == 0.0
    noisy = video + 0.1 * torch.randn(video.shape, generator=torch.Generator().manual_seed(2))
    assert perceptual_loss(distance, noisy, video).item() > 0.0
    # torchvision's whole-model state dict (features.N.*, classifier.*) loads the same network.
    whole = tmp_path / "whole"
    whole.mkdir()
    features = torch.load(perceptual_dir / "vgg16.pth")
    torch.save({**{f"features.{k}": v for k, v in features.items()}, "classifier.0.weight": torch.zeros(2, 2)}, whole / "vgg16.pth")
    (whole / "vgg.pth").write_bytes((perceptual_dir / "vgg.pth").read_bytes())
    assert perceptual_loss(load_perceptual(whole), noisy, video).item() == perceptual_loss(distance, noisy, video).item()


def test_perceptual_weights_from_a_bad_path_fail_naming_the_path_and_the_file(perceptual_dir, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"{missing}.*vgg16.pth"):
        _task(tmp_path, f"objective.perceptual={missing}")
    half = tmp_path / "half"
    half.mkdir()
    (half / "vgg16.pth").write_bytes((perceptual_dir / "vgg16.pth").read_bytes())
    with pytest.raises(FileNotFoundError, match=f"{half}: no file vgg.pth"):
        load_perceptual(half)


def test_generator_loss_includes_the_weighted_perceptual_term(perceptual_dir, tmp_path):
    objective, task = _task(tmp_path, f"objective.perceptual={perceptual_dir}", "objective.perceptual_weight=2.0")
    out = task.losses(dict(task.trained), _clips(), torch.Generator().manual_seed(3), step=0)
    video = _clips().video
    recon, posterior = task.trained["model"](video, True, torch.Generator().manual_seed(3))
    perceptual = perceptual_loss(load_perceptual(perceptual_dir), recon, video)
    assert out.metrics["perceptual"] == pytest.approx(perceptual.item(), rel=1e-5) and perceptual.item() > 0
    total = F.l1_loss(recon, video) + 2.0 * perceptual + objective.kl_weight * posterior.kl().mean()
    assert out.losses[0][1].item() == pytest.approx(total.item(), rel=1e-5)


def test_zero0_run_trains_with_the_perceptual_term_and_the_adaptive_weight(perceptual_dir, tmp_path, video_shards, caplog):
    overrides = ["train.steps=2", "train.checkpoint_every=0", "objective.disc_start=1", f"objective.perceptual={perceptual_dir}"]
    with caplog.at_level(logging.WARNING):
        assert train(_config("autoencoder.yaml", tmp_path, video_shards, *overrides)) == 0
    records = read_metrics(tmp_path)
    assert all(records[step]["perceptual"] > 0 for step in (1, 2))
    weight = records[2]["adv_weight"]
    assert math.isfinite(weight) and weight > 0 and weight != 0.5
    assert NO_PERCEPTUAL not in caplog.messages and FIXED_GAN_WEIGHT not in caplog.messages


def test_run_without_perceptual_weights_says_so_once_and_zero3_falls_back_to_the_fixed_weight(tmp_path, video_shards, caplog):
    overrides = ["train.steps=3", "train.checkpoint_every=0", "objective.disc_start=1", "train.zero_stage=3"]
    with caplog.at_level(logging.WARNING):
        assert train(_config("autoencoder.yaml", tmp_path, video_shards, *overrides)) == 0
    assert caplog.messages.count(NO_PERCEPTUAL) == 1
    assert caplog.messages.count(FIXED_GAN_WEIGHT) == 1
    records = read_metrics(tmp_path)
    assert "perceptual" not in records[1]
    assert records[2]["adv_weight"] == records[3]["adv_weight"] == 0.5
