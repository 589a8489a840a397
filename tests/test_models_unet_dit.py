"""Behaviour of the U-Net and DiT families, their shared layers and the CLIP towers."""

from __future__ import annotations

import functools
from pathlib import Path

import open_clip
import pytest
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from model_zoo import build_model
from model_zoo.diffusion.objectives import apply_mask_conditioning, build_mask
from model_zoo.layers import DiTBlock, RelativePositionBias, frames_to_video, video_to_frames


def _perturbed(model: nn.Module, seed: int = 1) -> nn.Module:
    """Make zero-initialised branches non-zero so that every path of the network is exercised."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model.eval()


def _unet(**overrides: object) -> nn.Module:
    torch.manual_seed(0)
    return _perturbed(build_model("unet3d", "tiny", **overrides))


def test_video_frame_layout_round_trip() -> None:
    video = torch.randn(2, 3, 5, 4, 6)
    frames = video_to_frames(video)
    assert frames.shape == (10, 3, 4, 6) and frames.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(frames[7], video[1, :, 2])
    assert torch.equal(frames_to_video(frames, 5), video)


def test_dit_blocks_are_identities_at_init() -> None:
    torch.manual_seed(0)
    block = DiTBlock(64, 4, context_dim=32)
    x, cond, context = torch.randn(2, 24, 64), torch.randn(2, 64), torch.randn(2, 7, 32)
    assert torch.equal(block(x, cond, context), x)
    model = build_model("dit", "tiny")
    for block in model.blocks:
        assert torch.equal(block(x, cond, context), x)
    clip = model.example_input(2)
    assert torch.equal(model(clip, **model.example_inputs(clip)), torch.zeros_like(clip))


def test_all_zero_mask_makes_conditioning_latents_irrelevant() -> None:
    """LVDM mask conditioning (docs/methods.md, 'LVDM: mask conditioning'): z~ = [z_t (1-m) + z_cond m, m]; with m = 0 the conditioning frames cannot matter."""
    model = _unet(in_channels=5, out_channels=4)
    z_t, t = torch.randn(2, 4, 4, 16, 16), torch.tensor([10, 500])
    level = torch.tensor([0, 100])
    mask = build_mask("none", 4)
    with torch.no_grad():
        outs = [
            model(apply_mask_conditioning(z_t, torch.randn_like(z_t), mask), t, level=level) for _ in range(2)
        ]
        assert torch.equal(outs[0], outs[1])
        # With the first frame marked as a condition, the conditioning latents do change the output.
        pred_mask = build_mask("prediction", 4)
        a = model(apply_mask_conditioning(z_t, torch.randn_like(z_t), pred_mask), t, level=level)
        b = model(apply_mask_conditioning(z_t, torch.randn_like(z_t), pred_mask), t, level=level)
    assert (a - b).abs().max() > 1e-4


def _frame_influence(model: nn.Module) -> Tensor:
    """|d out[:, :, 0] / d x[:, :, t]| summed per input frame t."""
    x = model.example_input(1).requires_grad_()
    model(x, **model.example_inputs(x))[:, :, 0].sum().backward()
    return x.grad.abs().sum(dim=(0, 1, 3, 4))


@pytest.mark.parametrize("position", ["bias", "rope"])
def test_temporal_layers_mix_frames(position: str) -> None:
    influence = _frame_influence(_unet(temporal_position=position))
    assert (influence[1:] > 0).all()


def test_without_temporal_layers_frames_are_independent() -> None:
    model = _unet(temporal_conv=False, temporal_attention=False)
    influence = _frame_influence(model)
    assert influence[0] > 0 and torch.equal(influence[1:], torch.zeros(3))


def test_unet_conditioning_inputs() -> None:
    model = _unet()
    x = model.example_input(2)
    kwargs = model.example_inputs(x)
    with torch.no_grad():
        base = model(x, **kwargs)
        assert (model(x, **{**kwargs, "level": kwargs["level"] + 7}) - base).abs().max() > 1e-4
        unconditional = model(x, kwargs["t"], level=kwargs["level"])
        assert unconditional.shape == base.shape and (unconditional - base).abs().max() > 1e-4
        # A per-frame embedding equal for all frames is the per-sample embedding.
        emb = model.time_embedding(kwargs["t"], kwargs["level"])
        h, skips = model.encode(x, emb[:, None].expand(-1, x.shape[2], -1), kwargs["context"])
        torch.testing.assert_close(model.decode(h, skips, emb, kwargs["context"]), base)
    with pytest.raises(ValueError, match="num_levels"):
        _unet(num_levels=0)(x, kwargs["t"], level=kwargs["level"])


def test_unet_odd_spatial_size_and_skip_structure() -> None:
    model = _unet()
    x = torch.randn(1, 4, 3, 10, 14)
    with torch.no_grad():
        emb = model.time_embedding(torch.tensor([3]))
        h, skips = model.encode(x, emb)
        assert [s.shape[0] for s in skips] == [3] * len(skips)
        assert skips[0].shape[-2:] == (10, 14) and h.shape[-2:] == (5, 7)
        assert model.decode(h, skips, emb).shape == (1, 4, 3, 10, 14)


def test_checkpoint_wrapping_from_outside_keeps_outputs_and_grads() -> None:
    """The trainer wraps `checkpoint_modules()` from outside; results must not change."""
    for family in ("unet3d", "dit"):
        torch.manual_seed(0)
        model = _perturbed(build_model(family, "tiny")).train()
        x = model.example_input(2)
        kwargs = model.example_inputs(x)
        model(x, **kwargs).square().mean().backward()
        reference = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        for module in model.checkpoint_modules():
            module.forward = functools.partial(checkpoint, module.forward, use_reentrant=False)
        model(x, **kwargs).square().mean().backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, reference[name], msg=f"{family}: {name}")


def test_dit_condition_frame_and_text_change_the_output() -> None:
    torch.manual_seed(0)
    model = _perturbed(build_model("dit", "tiny"))
    x = model.example_input(2)
    kwargs = model.example_inputs(x)
    with torch.no_grad():
        base = model(x, **kwargs)
        for key in ("cond_frame", "context"):
            assert (model(x, **{**kwargs, key: torch.randn_like(kwargs[key])}) - base).abs().max() > 1e-4
        assert model(x, kwargs["t"]).shape == x.shape
    with pytest.raises(ValueError, match="cond_channels"):
        build_model("dit", "tiny", cond_channels=0)(x, kwargs["t"], cond_frame=kwargs["cond_frame"])


def test_dit_patch_sizes_round_trip_shapes() -> None:
    torch.manual_seed(0)
    model = build_model("dit", "tiny", patch_size=(2, 4, 2), out_channels=8, cond_channels=0)
    x = torch.randn(1, 4, 4, 8, 12)
    assert model(x, torch.tensor([1])).shape == (1, 8, 4, 8, 12)


def test_relative_position_bias_depends_on_clipped_distance_only() -> None:
    bias = RelativePositionBias(heads=2, max_distance=3)
    with torch.no_grad():
        bias.table.copy_(torch.arange(14.0).view(2, 7))
    table = bias(6)[0]
    assert table.shape == (2, 6, 6)
    assert torch.equal(table[:, 1, 3], table[:, 2, 4])  # same distance +2
    assert torch.equal(table[:, 0, 5], table[:, 0, 4])  # clipped at +3
    assert not torch.equal(table[:, 3, 1], table[:, 1, 3])  # direction matters


def test_clip_towers_load_local_open_clip_weights(tmp_path: Path) -> None:
    """A full open_clip CLIP state dict on disk initialises both frozen towers exactly."""
    from safetensors.torch import save_file

    text = build_model("text_encoder", "tiny")
    image = build_model("image_encoder", "tiny")
    vision_cfg = dict(layers=2, width=32, head_width=16, patch_size=8, image_size=32)
    torch.manual_seed(5)
    clip = open_clip.CLIP(
        embed_dim=32, vision_cfg=vision_cfg, text_cfg=dict(width=32, heads=2, layers=2)
    ).eval()
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(tmp_path / "clip.safetensors"))

    loaded_text = build_model("text_encoder", "tiny", pretrained_path=str(tmp_path / "clip.safetensors"))
    loaded_image = build_model("image_encoder", "tiny", pretrained_path=str(tmp_path / "clip.safetensors"))
    assert loaded_text.config.pretrained_path is None  # consumed: saved weights now hold the tower
    tokens = text.tokenize(["a red bicycle", ""])
    pixels = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded_text.tower(tokens), clip.encode_text(tokens))
        torch.testing.assert_close(loaded_image.tower(pixels), clip.encode_image(pixels))
        assert not torch.allclose(text.tower(tokens), clip.encode_text(tokens))
        assert not torch.allclose(image.tower(pixels), clip.encode_image(pixels))
        features = loaded_text(tokens)
    assert features.shape == (2, 77, 32)
    assert not any(p.requires_grad for p in [*loaded_text.parameters(), *loaded_image.parameters()])


def test_text_encoder_layers_and_prompts() -> None:
    torch.manual_seed(0)
    penultimate = build_model("text_encoder", "tiny")
    torch.manual_seed(0)
    last = build_model("text_encoder", "tiny", layer="last")
    tokens = penultimate.tokenize(["a dog", "a cat"])
    assert tokens.shape == (2, 77) and tokens.dtype == torch.long
    with torch.no_grad():
        a, b = penultimate(tokens), last(tokens)
    assert not torch.allclose(a, b)
    assert not torch.allclose(a[0], a[1])  # different prompts, different context
    torch.testing.assert_close(penultimate.encode_prompts(["a dog", "a cat"]), a)
    with pytest.raises(ValueError, match="context_dim"):
        build_model("text_encoder", "vit-l-14", context_dim=1024, device="meta")
