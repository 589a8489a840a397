"""unet3d <-> diffusers U-Nets on real-format random checkpoints (`from_config` + `save_pretrained`):
the ModelScope layout maps 1:1 onto UNet3DConditionModel, and a Stable Diffusion
UNet2DConditionModel inflates into a unet3d that equals it per frame at initialisation."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet3DConditionModel

from model_zoo.importers.diffusers_unet import load_unet

UNET3D_CONFIG = dict(
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
    up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
    layers_per_block=1,
    norm_num_groups=8,
    cross_attention_dim=24,
    attention_head_dim=4,
)
UNET2D_CONFIG = dict(
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    norm_num_groups=8,
    cross_attention_dim=24,
    attention_head_dim=(2, 4),
    use_linear_projection=True,
)


def _randomise(model: torch.nn.Module) -> None:
    # Every tensor random, zero-initialised output layers included, so no term hides behind a zero.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)


def _saved(model: torch.nn.Module, folder) -> str:
    model.save_pretrained(folder)
    return folder


def test_modelscope_unet3d_equals_diffusers(tmp_path) -> None:
    torch.manual_seed(0)
    theirs = UNet3DConditionModel.from_config(UNET3D_CONFIG).eval()
    _randomise(theirs)
    ours = load_unet(
        _saved(theirs, tmp_path / "unet"), json.loads((tmp_path / "unet" / "config.json").read_text())
    ).eval()
    assert ours.config.input_temporal == (8, 4) and ours.config.temporal_conv_layers == 4
    x = torch.randn(2, 4, 3, 16, 16)
    t = torch.tensor([10, 700])
    context = torch.randn(2, 5, 24)
    with torch.no_grad():
        expected = theirs(x, t, encoder_hidden_states=context).sample
        got = ours(x, t, context=context)
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()


def test_inflated_sd_unet_equals_2d_per_frame(tmp_path) -> None:
    torch.manual_seed(0)
    image = UNet2DConditionModel.from_config(UNET2D_CONFIG).eval()
    _randomise(image)
    video = load_unet(
        _saved(image, tmp_path / "unet"), json.loads((tmp_path / "unet" / "config.json").read_text())
    ).eval()
    assert video.config.head_dim == 16
    frames = 3
    x = torch.randn(2, 4, frames, 16, 16)
    t = torch.tensor([10, 700])
    context = torch.randn(2, 5, 24)
    with torch.no_grad():
        got = video(x, t, context=context)
        flat = x.permute(0, 2, 1, 3, 4).reshape(2 * frames, 4, 16, 16)
        per_frame = image(
            flat, t.repeat_interleave(frames), encoder_hidden_states=context.repeat_interleave(frames, 0)
        ).sample
    expected = per_frame.reshape(2, frames, 4, 16, 16).permute(0, 2, 1, 3, 4)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    temporal = [k for k in video.state_dict() if ".temporal." in k and k.endswith("proj_out.weight")]
    assert temporal and all(video.state_dict()[k].abs().max() == 0 for k in temporal)


def test_unknown_and_mismatched_keys_are_named(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    model = UNet3DConditionModel.from_config(UNET3D_CONFIG)
    folder = _saved(model, tmp_path / "unet")
    config = json.loads((folder / "config.json").read_text())
    weights = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    save_file({**state, "extra.weight": torch.zeros(1)}, str(weights))
    with pytest.raises(ValueError, match="extra.weight"):
        load_unet(folder, config)
    state["conv_in.weight"] = torch.zeros(32, 4, 5, 5)
    save_file(state, str(weights))
    with pytest.raises(
        ValueError, match=r"conv_in.weight \(32, 4, 5, 5\).*input_conv.weight \(32, 4, 3, 3\)"
    ):
        load_unet(folder, config)


def test_modelscope_flavour_is_diffusers_default_unet3d_config() -> None:
    """The `modelscope` flavour is what a ModelScope / zeroscope unet/config.json (diffusers'
    UNet3DConditionModel defaults) translates to, with the same 1.41e9 parameters."""
    from model_zoo import build_model
    from model_zoo.importers.diffusers_unet import unet3d_config

    with torch.device("meta"):
        theirs = UNet3DConditionModel()
    ours = build_model("unet3d", "modelscope", device="meta")
    translated = unet3d_config({**theirs.config, "_class_name": "UNet3DConditionModel"}, "config.json")
    assert translated == dataclasses.replace(ours.config, num_heads=64)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()) == 1_411_233_860
