"""`lvd train` fine-tunes from weights a user has: a Stable Diffusion U-Net inflated into unet3d,
an AutoencoderKL and a CLIP text encoder (real-format random checkpoints), then resumes and exports."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_lvd
from hf_checkpoints import write_pipeline

from model_zoo import from_pretrained


@pytest.mark.slow
def test_train_from_diffusers_folders_resumes_and_exports(tmp_path, video_shards) -> None:
    sd = write_pipeline(tmp_path / "sd")
    run = tmp_path / "run"
    args = [
        "train",
        "--config",
        "configs/tiny/unet3d.yaml",
        f"data.shards={video_shards}",
        "data.height=32",
        "data.width=32",
        "train.micro_batch_size=2",
        "train.checkpoint_every=1",
        f"run.dir={run}",
        f"model.init_from={sd / 'unet'}",
        f"model.vae={sd / 'vae'}",
        f"model.text_encoder={sd / 'text_encoder'}",
    ]
    first = run_lvd(*args, "train.steps=1")
    assert first.returncode == 0, first.stderr[-3000:]
    log = first.stdout + first.stderr
    assert f"denoiser: unet3d inflated from diffusers UNet2DConditionModel {sd / 'unet'}" in log
    assert "the YAML's model sizes give way to it" in log
    assert f"vae: diffusers AutoencoderKL {sd / 'vae'}" in log
    assert f"text_encoder: transformers CLIPTextModel {sd / 'text_encoder'}" in log
    second = run_lvd(*args, "train.steps=2")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout + second.stderr
    exported = run_lvd("export", "--run", str(run), "--out", str(tmp_path / "export"))
    assert exported.returncode == 0, exported.stderr[-3000:]
    denoiser = from_pretrained(tmp_path / "export" / "denoiser")
    assert denoiser.config.input_temporal == (8, 8) and denoiser.config.context_dim == 32
    index = json.loads((tmp_path / "export" / "model_index.json").read_text())
    assert index["vae"][1] == "temporal_decoder_vae" and index["text_encoder"][1] == "hf_text_encoder"
    text = from_pretrained(tmp_path / "export" / "text_encoder")
    assert text.tokenize(["a cat"]).shape == (1, 77)
    assert any(p.abs().max() > 0 for n, p in denoiser.named_parameters() if ".temporal." in n and "proj_out" in n)
    assert torch.isfinite(next(denoiser.parameters())).all()
    as_diffusers = run_lvd("export", "--run", str(run), "--out", str(tmp_path / "diffusers"), "--format", "diffusers")
    assert as_diffusers.returncode == 0, as_diffusers.stderr[-3000:]
    assert "wrote a diffusers TextToVideoSDPipeline folder" in as_diffusers.stdout
    from diffusers import TextToVideoSDPipeline

    pipe = TextToVideoSDPipeline.from_pretrained(tmp_path / "diffusers")
    frames = pipe("a cat", num_frames=2, height=32, width=32, num_inference_steps=2, output_type="pt").frames
    assert frames.shape == (1, 2, 3, 32, 32) and torch.isfinite(frames).all()
