"""VidRD's temporal-aware decoder fine-tune: the paper's reconstruction + regularisation (KL) +
discriminator losses, only the new temporal layers train, and at initialisation the decoder is
the image decoder frame by frame."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from einops import rearrange

from common.config import load_config
from trainer.config import TrainJobConfig
from trainer.tasks.interface import Batch

REPO = Path(__file__).resolve().parent.parent


def _task(tmp_path: Path, *extra: str):
    from trainer.tasks import build_task

    overrides = ["data.height=32", "data.width=32", f"run.dir={tmp_path}", "data.shards=unused", *extra]
    cfg = load_config(TrainJobConfig, REPO / "configs" / "tiny" / "temporal_decoder.yaml", overrides)
    return build_task(cfg, torch.device("cpu"))


def _batch() -> Batch:
    video = torch.rand(2, 3, 4, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return Batch(captions=["", ""], video=video)


def _temporal_names(vae: torch.nn.Module) -> set[str]:
    return {name for name, _ in vae.named_parameters() if name.startswith(("mid_temporal.", "up_temporal."))}


def test_fine_tune_loss_is_reconstruction_plus_kl_plus_discriminator_after_disc_start(tmp_path):
    """Before `disc_start`: rec + kl_weight·KL on the VAE only. From it on: + the adaptive-weighted
    generator GAN term, and the discriminator's hinge loss as a second engine's loss."""
    task = _task(tmp_path, "objective.disc_start=2", "objective.kl_weight=0.01")
    engines = dict(task.trained)
    before = task.losses(engines, _batch(), torch.Generator().manual_seed(1), step=1)
    assert [name for name, _ in before.losses] == ["model"]
    metrics = before.metrics
    assert metrics["kl"] > 0
    torch.testing.assert_close(
        before.losses[0][1].item(), metrics["rec"] + 0.01 * metrics["kl"], rtol=1e-5, atol=0
    )
    after = task.losses(engines, _batch(), torch.Generator().manual_seed(1), step=2)
    assert [name for name, _ in after.losses] == ["model", "disc"]
    metrics = after.metrics
    assert metrics["adv_weight"] > 0 and metrics["d_loss"] > 0
    expected = metrics["rec"] + 0.01 * metrics["kl"] + metrics["adv_weight"] * metrics["g_adv"]
    torch.testing.assert_close(after.losses[0][1].item(), expected, rtol=1e-5, atol=0)
    # The VAE's loss reaches its temporal layers and nothing else (the discriminator is held fixed).
    task.trained["model"].zero_grad()
    task.trained["disc"].zero_grad()
    after.losses[0][1].backward()
    vae = task.trained["model"]
    with_grad = {name for name, p in vae.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad and with_grad <= _temporal_names(vae)
    assert all(p.grad is None for p in task.trained["disc"].parameters())


def test_only_the_temporal_layers_train_and_the_discriminator_is_a_second_network(tmp_path):
    task = _task(tmp_path)
    vae = task.trained["model"]
    trainable = {name for name, p in vae.named_parameters() if p.requires_grad}
    assert trainable == _temporal_names(vae) and trainable
    assert set(task.trained) == {"model", "disc"}
    assert all(p.requires_grad for p in task.trained["disc"].parameters())


def test_the_vae_engine_optimizer_holds_exactly_the_temporal_layers(tmp_path, video_shards, monkeypatch):
    """Through `lvd train`'s own engine building (ZeRO-0): the VAE engine's optimizer holds the
    temporal branches and nothing of the image VAE; the discriminator has its own engine."""
    import trainer.session as session_mod
    from trainer.loop import train

    engines, build_engine = [], session_mod.build_engine

    def spy(*args, **kwargs):
        engines.append(build_engine(*args, **kwargs))
        return engines[-1]

    monkeypatch.setattr(session_mod, "build_engine", spy)
    overrides = ["data.height=32", "data.width=32", "train.micro_batch_size=2", f"run.dir={tmp_path}"]
    overrides += [f"data.shards={video_shards}", "train.steps=1", "train.checkpoint_every=0"]
    cfg = load_config(TrainJobConfig, REPO / "configs" / "tiny" / "temporal_decoder.yaml", overrides)
    assert cfg.train.zero_stage == 0 and train(cfg) == 0
    vae_engine, disc_engine = engines
    names = {id(p): name for name, p in vae_engine.module.named_parameters()}
    in_optimizer = {names[id(p)] for group in vae_engine.optimizer.param_groups for p in group["params"]}
    assert in_optimizer == _temporal_names(vae_engine.module)
    disc_params = {id(p) for group in disc_engine.optimizer.param_groups for p in group["params"]}
    assert disc_params == {id(p) for p in disc_engine.module.parameters()}


def test_the_task_decoder_at_initialisation_is_the_image_decoder_frame_by_frame(tmp_path):
    vae = _task(tmp_path).trained["model"]
    z = torch.randn(2, 4, 5, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        video = vae.decode(z)
        frames = vae.vae.decode(rearrange(z, "b c t h w -> (b t) c h w")).sample
    torch.testing.assert_close(video, rearrange(frames, "(b t) c h w -> b c t h w", t=5), rtol=0, atol=1e-6)


@pytest.mark.parametrize("key", ["kl_weight", "adv_weight", "disc_start", "perceptual_weight"])
def test_the_fine_tune_weights_default_to_the_autoencoder_task(key):
    from trainer.config import AutoencoderObjective, TemporalDecoderObjective

    assert getattr(TemporalDecoderObjective(), key) == getattr(AutoencoderObjective(), key)
