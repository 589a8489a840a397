"""CMD trains in the paper's stages (docs/methods.md, 'CMD: training in stages'): the content-frame
model and the motion DiT train on a frozen autoencoder, whose weights the stages never change."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import model_zoo
from common.config import load_config
from trainer.config import TrainJobConfig
from trainer.export import export
from trainer.loop import train
from trainer.tasks import build_task

REPO = Path(__file__).resolve().parent.parent
SMALL = ["data.height=32", "data.width=32", "train.micro_batch_size=2", "train.warmup_steps=1", "train.checkpoint_every=0"]


def _trained_autoencoder(directory: Path) -> Path:
    """A tiny CMD autoencoder with non-initial weights everywhere, as a stage-1 export stands in."""
    autoencoder = model_zoo.build_model("cmd", "tiny")
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for param in autoencoder.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.02)
    return model_zoo.save_pretrained(autoencoder, directory)


def _config(name: str, run_dir: Path, shards: str, *extra: str) -> TrainJobConfig:
    overrides = [*SMALL, f"data.shards={shards}", f"run.dir={run_dir}", *extra]
    return load_config(TrainJobConfig, REPO / "configs" / "tiny" / name, overrides)


@pytest.mark.parametrize("name", ["cmd_content.yaml", "cmd_motion.yaml"])
def test_stages_leave_the_autoencoder_unchanged(name, tmp_path, video_shards):
    """A few steps of stage 2 or 3 on real shards: the trained network moves, the autoencoder it
    was given (`model.vae`) is frozen in the task, saved with the run and exported bit for bit."""
    source = _trained_autoencoder(tmp_path / "autoencoder")
    cfg = _config(name, tmp_path / "run", video_shards, "train.steps=3", f"model.vae={source}")
    task = build_task(cfg, torch.device("cpu"))
    frozen = task.frozen["vae"]
    assert frozen.family == "cmd" and not any(p.requires_grad for p in frozen.parameters())
    assert "vae" not in task.trained
    before = {name: tensor.clone() for name, tensor in frozen.state_dict().items()}

    assert train(cfg) == 0
    folder = export(tmp_path / "run", tmp_path / "export")
    given = load_file(str(source / "model.safetensors"))
    for saved in (tmp_path / "run" / "frozen" / "vae", folder / "vae"):
        weights = load_file(str(saved / "model.safetensors"))
        assert weights.keys() == given.keys() == before.keys()
        assert all(torch.equal(weights[key], given[key]) and torch.equal(given[key], before[key]) for key in given)
    trained_name = {"cmd_content.yaml": "content_denoiser", "cmd_motion.yaml": "denoiser"}[name]
    trained = load_file(str(folder / trained_name / "model.safetensors"))
    initial = task.trained["model"].state_dict()
    assert any(not torch.equal(trained[key], initial[key]) for key in trained)


def test_stages_refuse_an_autoencoder_of_another_family(tmp_path):
    cfg = _config("cmd_motion.yaml", tmp_path, "unused", "model.vae=video_vae/tiny")
    with pytest.raises(ValueError, match="model.vae=video_vae/tiny: the CMD stages need the CMD autoencoder"):
        build_task(cfg, torch.device("cpu"))
    cfg = _config("cmd_content.yaml", tmp_path, "unused", "model.family=unet3d")
    with pytest.raises(ValueError, match="the cmd_content task trains a 'dit' network, not 'unet3d'"):
        build_task(cfg, torch.device("cpu"))


def test_content_model_is_an_image_model_of_content_frames(tmp_path):
    """Stage 2's network is an image DiT of the content frame's space-to-depth (3p² channels) as a
    1-frame clip, with no dense condition; stage 3's DiT takes the packed motion latent and the
    content frame as its dense condition."""
    autoencoder = model_zoo.build_model("cmd", "tiny").config
    content = build_task(_config("cmd_content.yaml", tmp_path, "unused"), torch.device("cpu")).trained["model"]
    assert (content.family, content.config.patch_size[0], content.config.cond_channels) == ("dit", 1, 0)
    assert content.config.in_channels == 3 * autoencoder.patch_size**2
    motion = build_task(_config("cmd_motion.yaml", tmp_path, "unused"), torch.device("cpu")).trained["model"]
    assert motion.config.in_channels == autoencoder.motion_dim
    assert motion.config.cond_channels == 3 * autoencoder.patch_size**2


def test_plan_measures_each_stage_on_its_own_input(tmp_path):
    """`lvd plan` counts the content DiT on one space-to-depth frame and the motion DiT on the
    packed motion latent: (H/p / 2)(W/p / 2) and T·(H/p + W/p)/2 tokens (p = 4, DiT patches of 2)."""
    from trainer.plan import measure

    content = measure(_config("cmd_content.yaml", tmp_path, "unused"), dtype=torch.float32)
    motion = measure(_config("cmd_motion.yaml", tmp_path, "unused"), dtype=torch.float32)
    assert content.tokens_per_sample == (32 // 4 // 2) ** 2
    assert motion.tokens_per_sample == 8 * (32 // 4 + 32 // 4) // 2
    assert content.train_flops_per_sample > 0 and motion.train_flops_per_sample > 0
