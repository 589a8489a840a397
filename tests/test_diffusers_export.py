"""An lvd pipeline folder written as diffusers loads in TextToVideoSDPipeline, and its DDIM sampling
with classifier-free guidance equals `lvd sample --strategy ddim`'s window on the same seed's
noise, prompt and schedule (real-format random checkpoints)."""

from __future__ import annotations

import json

import pytest
import torch
from hf_checkpoints import write_pipeline
from test_diffusers_unet import UNET3D_CONFIG, _randomise

from common.pipeline_folder import SchedulerSpec, write_index
from model_zoo.importers import diffusers_export
from model_zoo.importers.folders import load
from sampler.denoisers import text_denoiser
from sampler.pipeline import load_pipeline
from sampler.strategies.common import clip_noise, pipeline_setup
from sampler.strategies.ddim import sample_window
from sampler.strategies.seeding import unit_generator
from trainer.export_diffusers import lvd_to_diffusers


@pytest.fixture(scope="module")
def networks(tmp_path_factory):
    from diffusers import UNet3DConditionModel

    root = write_pipeline(tmp_path_factory.mktemp("sd"))
    torch.manual_seed(1)
    unet = UNet3DConditionModel.from_config({**UNET3D_CONFIG, "cross_attention_dim": 32})
    _randomise(unet)
    unet.save_pretrained(root / "unet3d")
    return {
        "denoiser": load(root / "unet3d", "denoiser")[0].eval(),
        "vae": load(root, "vae")[0],
        "text_encoder": load(root, "text_encoder")[0],
    }


def _lvd_export(networks, folder):
    import model_zoo

    for name, module in networks.items():
        model_zoo.save_pretrained(module, folder / name)
    spec = SchedulerSpec(schedule="sqrt_linear", parameterization="eps", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012)
    components = {name: module.family for name, module in networks.items()}
    write_index(folder, task="diffusion", components=components, scheduler=spec)
    return folder


def test_text_to_video_pipeline_equals_lvd_sample_ddim(networks, tmp_path) -> None:
    from diffusers import TextToVideoSDPipeline

    lvd = _lvd_export(networks, tmp_path / "lvd")
    assert lvd_to_diffusers(lvd, tmp_path / "pipe") == "wrote a diffusers TextToVideoSDPipeline folder"
    pipe = TextToVideoSDPipeline.from_pretrained(tmp_path / "pipe")

    # lvd sample --strategy ddim: one window from the job seed's noise, CFG against the empty prompt.
    pipeline = load_pipeline(lvd)
    setup = pipeline_setup(pipeline, height=16, width=16, steps=3, eta=0.0, device="cpu")
    denoise = text_denoiser(pipeline, "a cat", 3.0)
    with torch.no_grad():
        ours = sample_window(denoise, 0, 2, setup=setup, seed=11)
        video = pipeline.vae.from_latents(ours)  # (B, 3, T, H, W) in [-1, 1]
    x_T = clip_noise(setup, 2, unit_generator(11, "ddim-window", 0))
    kwargs = dict(num_frames=2, height=16, width=16, num_inference_steps=3, guidance_scale=3.0)
    theirs = pipe("a cat", output_type="latent", latents=x_T.clone(), **kwargs).frames
    assert torch.allclose(torch.as_tensor(theirs), ours, atol=1e-4), (torch.as_tensor(theirs) - ours).abs().max()
    frames = pipe("a cat", output_type="pt", latents=x_T.clone(), **kwargs).frames  # (B, T, 3, H, W) in [0, 1]
    expected = (video / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)
    assert torch.allclose(torch.as_tensor(frames), expected, atol=1e-4)


def test_other_runs_are_written_in_lvd_layout_with_the_reason(networks, tmp_path) -> None:
    import model_zoo

    lvd = _lvd_export({**networks, "denoiser": model_zoo.build_model("unet3d", "tiny", context_dim=32)}, tmp_path / "lvd")
    message = lvd_to_diffusers(lvd, tmp_path / "out")
    assert message.startswith("diffusers has no pipeline class for this run (unet3d options outside the ModelScope layout")
    assert json.loads((tmp_path / "out" / "model_index.json").read_text())["_class_name"] == "LVDPipeline"


def test_layouts_without_a_diffusers_class_are_refused_by_name(networks) -> None:
    import model_zoo

    with pytest.raises(ValueError, match="a dit denoiser"):
        diffusers_export.write_unet(model_zoo.build_model("dit", "tiny"), None)
    with pytest.raises(ValueError, match="outside the ModelScope layout: .*additive_time_embedding"):
        diffusers_export.write_unet(model_zoo.build_model("unet3d", "tiny", head_dim=16), None)
