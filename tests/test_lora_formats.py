"""The adapter key formats (docs/methods.md, 'LoRA') against the real readers: an adapter put on a
small diffusers `UNet2DConditionModel` with peft, written by `model_zoo.lora.save_adapter`, loads
into a fresh copy of that U-Net through diffusers' own loaders (its peft-key path for the diffusers
format, its kohya converter for the ComfyUI format) and gives the same output.

diffusers 0.42.1 has no LoRA loader for `UNet3DConditionModel` (no `load_lora_adapter`; the
pipeline's `load_lora_weights` ends there), so for the ModelScope U-Net the diffusers-format file is
read the way diffusers reads these keys (strip `unet.`, alpha = r) with peft, and must give the same
output."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model_zoo.lora import COMFYUI_WEIGHTS, DIFFUSERS_WEIGHTS, adapter_from_state, save_adapter

RANK, ALPHA = 4, 8.0
"""alpha != rank, so that a writer that dropped alpha / r would be caught."""


def _unet(kind: str) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel, UNet3DConditionModel

    torch.manual_seed(0)
    common = {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
    }
    common |= {"cross_attention_dim": 32, "attention_head_dim": 8, "norm_num_groups": 8}
    if kind == "2d":
        blocks = {
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        }
        return UNet2DConditionModel(**common, **blocks).eval()
    blocks = {
        "down_block_types": ("CrossAttnDownBlock3D", "DownBlock3D"),
        "up_block_types": ("UpBlock3D", "CrossAttnUpBlock3D"),
    }
    return UNet3DConditionModel(**common, **blocks).eval()


def _inputs(kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    shape = (1, 4, 8, 8) if kind == "2d" else (1, 4, 3, 8, 8)
    return (
        torch.randn(shape, generator=generator),
        torch.tensor([10]),
        torch.randn(1, 5, 32, generator=generator),
    )


TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
"""The attention projections diffusers' own LoRA trainers adapt."""


def _adapted(kind: str, out: Path) -> torch.Tensor:
    """Put a random adapter on the U-Net with peft, write it in every format into `out`; the
    adapted U-Net's output."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    adapted = _unet(kind)
    x, t, context = _inputs(kind)
    with torch.no_grad():
        base_out = adapted(x, t, context).sample
    inject_adapter_in_model(
        LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=False), adapted
    )
    with torch.no_grad():
        want = adapted(x, t, context).sample
    assert not torch.allclose(want, base_out, atol=1e-3)
    adapter = adapter_from_state(get_peft_model_state_dict(adapted), rank=RANK, alpha=ALPHA, base={})
    save_adapter(adapter, out, formats=("peft", "diffusers", "comfyui"))
    return want


def test_diffusers_and_comfyui_keys_load_into_diffusers_with_the_same_output(tmp_path: Path):
    from diffusers import StableDiffusionPipeline

    kind, out = "2d", tmp_path / "adapter"
    want = _adapted(kind, out)
    x, t, context = _inputs(kind)

    by_diffusers_keys = _unet(kind)
    by_diffusers_keys.load_lora_adapter(str(out), weight_name=DIFFUSERS_WEIGHTS, prefix="unet")
    state, alphas = StableDiffusionPipeline.lora_state_dict(str(out), weight_name=COMFYUI_WEIGHTS)
    by_comfyui_keys = _unet(kind)
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet=by_comfyui_keys)
    with torch.no_grad():
        torch.testing.assert_close(by_diffusers_keys(x, t, context).sample, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(by_comfyui_keys(x, t, context).sample, want, rtol=1e-5, atol=1e-5)


def test_diffusers_keys_name_the_modules_of_the_modelscope_unet(tmp_path: Path):
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    kind, out = "3d", tmp_path / "adapter"
    want = _adapted(kind, out)
    x, t, context = _inputs(kind)
    state = load_file(str(out / DIFFUSERS_WEIGHTS))
    assert all(key.startswith("unet.") for key in state)
    fresh = _unet(kind)
    inject_adapter_in_model(
        LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS), fresh
    )  # diffusers: alpha = r
    result = set_peft_model_state_dict(
        fresh, {key.removeprefix("unet."): value for key, value in state.items()}
    )
    assert not result.unexpected_keys
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, t, context).sample, want, rtol=1e-5, atol=1e-5)


def test_an_unknown_format_is_refused_by_name(tmp_path: Path):
    adapter = adapter_from_state(
        {"a.lora_A.weight": torch.zeros(2, 3), "a.lora_B.weight": torch.zeros(3, 2)},
        rank=2,
        alpha=2.0,
        base={},
    )
    with pytest.raises(ValueError, match="LoRA format 'kohya'"):
        save_adapter(adapter, tmp_path, formats=("kohya",))
