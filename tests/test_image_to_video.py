"""Image-to-video by first-frame concatenation (docs/methods.md, 'Image-to-video'): the condition
channels, the `diffusion` task's `objective.image_rate`, the export's record and `lvd sample --image`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import model_zoo
from common.config import ConfigError, load_config
from model_zoo.diffusion.image_condition import image_condition, with_image_condition
from sampler.cli import main
from sampler.tiny import tiny_pipeline, wake_zero_parameters

REPO = Path(__file__).resolve().parent.parent
SAMPLE = ["--prompt", "x", "--frames", "4", "--steps", "2", "--height", "32", "--width", "32", "--device", "cpu", "--no-progress"]


def test_condition_channels_hold_the_first_latent_and_a_frame0_mask():
    like = torch.randn(3, 4, 5, 2, 2)
    first = torch.randn(3, 4, 2, 2)
    keep = torch.tensor([True, False, True])
    cond = image_condition(first, like, keep)
    assert cond.shape == (3, 5, 5, 2, 2)
    torch.testing.assert_close(cond[[0, 2], :4, 0], first[[0, 2]])
    assert (cond[[0, 2], 4, 0] == 1).all() and (cond[1] == 0).all()
    assert (cond[:, :, 1:] == 0).all()  # only frame 0 carries the image and the mask
    assert (image_condition(None, like) == 0).all()
    seen = {}
    with_image_condition(lambda x, t, **kw: seen.setdefault("x", x), first, keep)(like, torch.zeros(3))
    torch.testing.assert_close(seen["x"], torch.cat([like, cond], dim=1))


def test_image_rate_grows_the_dit_input_and_feeds_the_first_latent(tmp_path):
    from trainer.config import TrainJobConfig
    from trainer.tasks import build_task
    from trainer.tasks.interface import Batch

    overrides = ["data.latent=true", "data.shards=unused", f"run.dir={tmp_path}", "objective.image_rate=1.0"]
    cfg = load_config(TrainJobConfig, REPO / "configs/tiny/dit.yaml", overrides)
    task = build_task(cfg, torch.device("cpu"))
    model = task.trained["model"]
    assert (model.config.in_channels, model.out_channels) == (9, 4)
    latents = torch.randn(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    batch = Batch(captions=["a", "b"], latents=latents, tokens=task.tokenizer()(["a", "b"]))
    inputs = []

    def spy(x, t, **cond):
        inputs.append(x)
        return model(x, t, **cond)

    task.losses({"model": spy}, batch, torch.Generator().manual_seed(1), 0)
    torch.testing.assert_close(inputs[0][:, 4:8, 0], latents[:, :, 0])
    assert (inputs[0][:, 8, 0] == 1).all() and (inputs[0][:, 4:, 1:] == 0).all()
    with pytest.raises(ConfigError, match=r"objective.image_rate: must be in \[0, 1\], got 1.5"):
        load_config(TrainJobConfig, REPO / "configs/tiny/dit.yaml", [*overrides[:-1], "objective.image_rate=1.5"])


def write_image(path: Path) -> Path:
    pixels = np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def image_pipeline(folder: Path) -> Path:
    """A tiny DiT export recorded as image-conditioned (latent 4 + image 4 + mask 1 channels in)."""
    from sampler.pipeline import save_pipeline

    text = model_zoo.build_model("text_encoder", "tiny")
    dit = model_zoo.build_model("dit", "tiny", in_channels=9, out_channels=4, cond_channels=0, context_dim=text.config.context_dim)
    networks = {"denoiser": wake_zero_parameters(dit, 0), "vae": model_zoo.build_model("video_vae", "tiny"), "text_encoder": text}
    entries = {"image_conditioning": {"kind": "first_frame_concat", "rate": 1.0}}
    return save_pipeline(folder, "diffusion", networks, entries=entries)


def test_image_on_an_unconditioned_export_is_one_clear_error(tmp_path, capsys):
    model = tiny_pipeline(tmp_path / "t2v", "diffusion")
    image = write_image(tmp_path / "cat.png")
    assert main(["--model", str(model), "--image", str(image), "--out", str(tmp_path / "v.mp4"), *SAMPLE]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"the model {model}" in err[0] and "--image" in err[0] and "image_rate" in err[0], err
    assert not (tmp_path / "v.mp4").exists()


def test_sample_image_feeds_the_image_latent_at_every_step(tmp_path, monkeypatch):
    """`lvd sample --image` on an image-conditioned export: every denoiser call sees the image's
    latent (resized and center-cropped to 32x32) in frame 0 with mask 1; a bad image file is refused."""
    from sampler.image_input import image_latent, read_image
    from sampler.pipeline import load_pipeline

    model = image_pipeline(tmp_path / "i2v")
    image = write_image(tmp_path / "cat.png")
    pipeline = load_pipeline(model)
    assert pipeline.image_conditioning
    want = image_latent(pipeline, read_image(image, 32, 32))
    assert read_image(image, 32, 32).shape == (1, 3, 32, 32) and want.shape == (1, 4, 8, 8)
    seen = []
    forward = type(pipeline.denoiser).forward

    def spy(self, x, t, **kw):
        seen.append(x)
        return forward(self, x, t, **kw)

    monkeypatch.setattr(type(pipeline.denoiser), "forward", spy)
    assert main(["--model", str(model), "--image", str(image), "--out", str(tmp_path / "v.mp4"), *SAMPLE]) == 0
    assert len(seen) == 4 and all(x.shape[1] == 9 for x in seen)  # 2 steps x (prompt, empty prompt) of CFG
    for x in seen:
        torch.testing.assert_close(x[:, 4:8, 0], want)
        assert (x[:, 8, 0] == 1).all() and (x[:, 4:, 1:] == 0).all()
    assert json.loads((tmp_path / "v.json").read_text())["params"]["image"] == str(image)
    (tmp_path / "bad.png").write_text("not an image")
    assert main(["--model", str(model), "--image", str(tmp_path / "bad.png"), "--out", str(tmp_path / "w.mp4"), *SAMPLE]) == 1


def test_lvdm_autoregressive_conditions_its_first_clip_on_the_image(tmp_path, monkeypatch):
    """`--strategy lvdm-autoregressive --image`: the first clip is conditioned (mask 1) on the image's
    latent in its first k frames instead of being generated unconditionally, and the video starts
    with those given frames; without --image no call of the first clip sees a mask."""
    from sampler.image_input import image_latent, read_image
    from sampler.pipeline import load_pipeline

    model = tiny_pipeline(tmp_path / "lvdm", "lvdm_prediction")
    image = write_image(tmp_path / "cat.png")
    want = image_latent(load_pipeline(model), read_image(image, 32, 32))
    seen = []
    unet = type(model_zoo.build_model("unet3d", "tiny"))
    forward = unet.forward

    def spy(self, x, t, **kw):
        seen.append(x)
        return forward(self, x, t, **kw)

    monkeypatch.setattr(unet, "forward", spy)
    lvdm = ["--model", str(model), "--strategy", "lvdm-autoregressive", "--k", "2", "--s", "0", "--frames", "8"]
    assert main([*lvdm, "--image", str(image), "--out", str(tmp_path / "v.mp4"), *SAMPLE[:2], *SAMPLE[4:]]) == 0
    conditioned = [x for x in seen if (x[:, 4, :2] == 1).all()]
    assert conditioned and all((x[:, 4, 2:] == 0).all() for x in conditioned)
    for x in conditioned:  # level s = 0: the given frames are the image latent (up to √ᾱ_0 and noise of std √β_0)
        for frame in (0, 1):
            assert float(((x[:, :4, frame] - want) ** 2).mean() / (want**2).mean()) < 0.05
    first_chunk = load_file(str(tmp_path / "v.parts" / "chunk-00000.safetensors"))["latents"]
    assert first_chunk.shape[2] == 4  # l: the k = 2 given frames, then l - k new ones
    for frame in (0, 1):
        torch.testing.assert_close(first_chunk[:, :, frame], want)
    seen.clear()
    assert main([*lvdm, "--out", str(tmp_path / "w.mp4"), *SAMPLE[:2], *SAMPLE[4:]]) == 0
    assert seen and all((x[:, 4] == 0).all() for x in seen)


def test_the_preview_of_an_image_conditioned_task_runs_text_to_video(tmp_path):
    """The TensorBoard preview samples with the zero condition (no image): the network's 2C + 1 input
    channels are filled and a decoded video comes back."""
    from trainer.config import TrainJobConfig
    from trainer.tasks import build_task
    from trainer.tasks.interface import Batch

    overrides = ["data.shards=unused", f"run.dir={tmp_path}", "objective.image_rate=0.5", "data.height=32", "data.width=32"]
    task = build_task(load_config(TrainJobConfig, REPO / "configs/tiny/dit.yaml", overrides), torch.device("cpu"))
    video = torch.rand(1, 3, 4, 32, 32) * 2 - 1
    batch = Batch(captions=["a"], video=video, tokens=task.tokenizer()(["a"]))
    preview = task.preview(task.trained, batch, torch.Generator().manual_seed(0))
    assert preview.shape == video.shape
