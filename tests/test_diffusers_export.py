"""Networks written by the diffusers export load in diffusers' TextToVideoSDPipeline, and its DDIM
sampling with classifier-free guidance equals lvd's DDIM sampler on the same initial noise,
prompt and schedule (real-format random checkpoints)."""

from __future__ import annotations

import json

import pytest
import torch
from hf_checkpoints import write_pipeline
from test_diffusers_unet import UNET3D_CONFIG, _randomise

from common.pipeline_folder import SchedulerSpec, scheduler_config
from model_zoo.diffusion.guidance import cfg
from model_zoo.diffusion.samplers import ddim
from model_zoo.diffusion.schedules import alphas_cumprod, ddim_timesteps, make_betas
from model_zoo.importers import diffusers_export
from model_zoo.importers.folders import load


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


def test_text_to_video_pipeline_equals_lvd_ddim(networks, tmp_path) -> None:
    from diffusers import TextToVideoSDPipeline

    spec = SchedulerSpec(schedule="sqrt_linear", parameterization="eps", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012)
    out = tmp_path / "pipe"
    diffusers_export.write_unet(networks["denoiser"], out / "unet")
    diffusers_export.write_vae(networks["vae"], out / "vae")
    tokenizer = diffusers_export.write_text_encoder(networks["text_encoder"], out)
    (out / "scheduler").mkdir()
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config(spec)))
    index = {
        "_class_name": "TextToVideoSDPipeline",
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", tokenizer],
        "unet": ["diffusers", "UNet3DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out / "model_index.json").write_text(json.dumps(index))
    pipe = TextToVideoSDPipeline.from_pretrained(out)
    x_T = torch.randn(1, 4, 2, 8, 8, generator=torch.Generator().manual_seed(5))
    kwargs = dict(num_frames=2, height=16, width=16, num_inference_steps=3, guidance_scale=3.0, latents=x_T.clone())
    theirs = pipe("a cat", output_type="latent", **kwargs).frames

    unet, text = networks["denoiser"], networks["text_encoder"]
    with torch.no_grad():
        cond, uncond = text(text.tokenize(["a cat"])), text(text.tokenize([""]))
        guided = cfg(lambda x, t: unet(x, t, context=cond), lambda x, t: unet(x, t, context=uncond), 3.0)
        schedule = alphas_cumprod(make_betas("sqrt_linear", 1000, 0.00085, 0.012))
        final = 1.0 if spec.set_alpha_to_one else float(schedule[0])
        timesteps = ddim_timesteps(1000, 3, steps_offset=spec.steps_offset)
        ours = ddim(guided, x_T, timesteps, alphas_cumprod=schedule, final_alpha_cumprod=final)
    assert torch.allclose(torch.as_tensor(theirs), ours, atol=1e-4), (torch.as_tensor(theirs) - ours).abs().max()
    frames = pipe("a cat", output_type="pt", **kwargs).frames  # (B, T, 3, H, W) in [0, 1]
    with torch.no_grad():
        video = networks["vae"].from_latents(ours)  # (B, 3, T, H, W) in [-1, 1]
    expected = (video / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)
    assert torch.allclose(torch.as_tensor(frames), expected, atol=1e-4)


def test_layouts_without_a_diffusers_class_are_refused_by_name(networks) -> None:
    import model_zoo

    with pytest.raises(ValueError, match="a dit denoiser"):
        diffusers_export.write_unet(model_zoo.build_model("dit", "tiny"), None)
    with pytest.raises(ValueError, match="outside the ModelScope layout: .*additive_time_embedding"):
        diffusers_export.write_unet(model_zoo.build_model("unet3d", "tiny", head_dim=16), None)
