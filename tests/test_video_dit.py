"""The current-generation video DiT (`video_dit`): 3-D RoPE, QK-norm, shared adaLN modulation,
masked text, joint attention; the family contract for its variants."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from model_zoo import build_model, count_parameters, from_pretrained
from model_zoo.layers import apply_rotary
from model_zoo.video_dit import MODULATIONS, Attention, attend, rope_3d

VARIANTS = [
    {},
    {"text_attention": "joint"},
    {"modulation": "per_block"},
    {"mlp": "gelu", "text_attention": "joint", "modulation": "per_block"},
]


def _perturbed(model: nn.Module) -> nn.Module:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model.eval()


def _model(**overrides: object) -> nn.Module:
    torch.manual_seed(0)
    return _perturbed(build_model("video_dit", "tiny", **overrides))


def test_rope_attention_scores_are_invariant_to_a_shift_of_all_positions() -> None:
    grid, head_dim = (3, 4, 5), 32
    torch.manual_seed(0)
    q, k = torch.randn(2, 2, 60, head_dim), torch.randn(2, 2, 60, head_dim)

    def scores(offset: tuple[int, int, int]) -> torch.Tensor:
        cos, sin = rope_3d(grid, head_dim, "cpu", offset=offset)
        return apply_rotary(q, cos, sin) @ apply_rotary(k, cos, sin).transpose(-1, -2)

    base = scores((0, 0, 0))
    torch.testing.assert_close(scores((7, 3, 11)), base, atol=1e-4, rtol=1e-4)
    # The positions do matter: the scores are not those of unrotated q, k.
    assert (base - q @ k.transpose(-1, -2)).abs().amax() > 1e-1
    # Each axis rotates: moving the keys alone along any one axis changes the scores.
    cos, sin = rope_3d(grid, head_dim, "cpu")
    for shifted in [(1, 0, 0), (0, 1, 0), (0, 0, 1)]:
        cos_s, sin_s = rope_3d(grid, head_dim, "cpu", offset=shifted)
        moved = apply_rotary(q, cos, sin) @ apply_rotary(k, cos_s, sin_s).transpose(-1, -2)
        assert (moved - base).abs().amax() > 1e-2, shifted
    # Through the model's attention: shifted rotary tables give the same output.
    attention = Attention(64, 2)
    x = torch.randn(2, 60, 64)
    outputs = [
        attend(*attention.project(x, x), rope_3d(grid, head_dim, "cpu", offset=o), None)
        for o in [(0, 0, 0), (5, 2, 9)]
    ]
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)


def test_qk_norm_makes_attention_independent_of_the_scale_of_queries_and_keys() -> None:
    torch.manual_seed(0)
    attention = Attention(64, 2)
    x = torch.randn(2, 10, 64)
    rotary = rope_3d((1, 2, 5), 32, "cpu")
    before = attend(*attention.project(x, x), rotary, None)
    with torch.no_grad():
        attention.q.weight.mul_(10.0)
        attention.q.bias.mul_(10.0)
        attention.kv.weight[:64].mul_(0.1)  # the key half of the fused key/value projection
        attention.kv.bias[:64].mul_(0.1)
    torch.testing.assert_close(attend(*attention.project(x, x), rotary, None), before, atol=1e-4, rtol=1e-4)


def _modulation_parameters(model: nn.Module) -> int:
    return sum(
        p.numel()
        for name, p in model.named_parameters()
        if "modulation" in name or name.startswith("shared.")
    )


@pytest.mark.parametrize("flavor", ["tiny", "1.3b"])
def test_shared_modulation_saves_the_per_block_adaln_parameters(flavor: str) -> None:
    shared = build_model("video_dit", flavor, device="meta")
    per_block = build_model("video_dit", flavor, device="meta", modulation="per_block")
    dim, depth = shared.config.hidden_size, shared.config.depth
    one_mlp = MODULATIONS * dim * (dim + 1)  # Linear(D, 6D)
    assert _modulation_parameters(per_block) == depth * one_mlp
    assert _modulation_parameters(shared) == one_mlp + depth * MODULATIONS * dim  # one MLP + offsets
    saved = count_parameters(per_block) - count_parameters(shared)
    assert saved == (depth - 1) * one_mlp - depth * MODULATIONS * dim
    print(
        f"video_dit/{flavor}: per-block adaLN {count_parameters(per_block):,} parameters "
        f"({_modulation_parameters(per_block) / count_parameters(per_block):.1%} modulation), shared "
        f"{count_parameters(shared):,} ({_modulation_parameters(shared) / count_parameters(shared):.2%}): "
        f"{saved:,} saved"
    )


@pytest.mark.parametrize("overrides", VARIANTS, ids=str)
def test_padded_text_tokens_do_not_change_the_output(overrides: dict) -> None:
    model = _model(**overrides)
    x = torch.randn(2, 16, 2, 8, 8)
    t = torch.tensor([10, 900])
    context = torch.randn(2, 5, 32)
    padded = torch.cat([context, 100 * torch.randn(2, 4, 32)], dim=1)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[:, :5] = True
    with torch.no_grad():
        plain = model(x, t, context=context)
        masked = model(x, t, context=padded, context_mask=mask)
        unmasked = model(x, t, context=padded)
    torch.testing.assert_close(masked, plain, atol=1e-5, rtol=1e-5)
    assert (unmasked - plain).abs().amax() > 1e-3  # the padding would matter without the mask


@pytest.mark.parametrize("overrides", VARIANTS, ids=str)
def test_at_init_every_block_is_the_identity_and_the_prediction_is_zero(overrides: dict) -> None:
    torch.manual_seed(0)
    model = build_model("video_dit", "tiny", **overrides).eval()
    x = model.example_input(2)
    inputs = model.example_inputs(x)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = [
        b.register_forward_hook(lambda _m, args, out: seen.append((args[0], out[0]))) for b in model.blocks
    ]
    with torch.no_grad():
        out = model(x, **inputs)
    for hook in hooks:
        hook.remove()
    assert torch.equal(out, torch.zeros_like(out))
    assert len(seen) == model.config.depth and all(torch.equal(a, b) for a, b in seen)


@pytest.mark.parametrize("overrides", VARIANTS[1:], ids=str)
def test_variants_keep_the_contract_gradients_determinism_and_save_load(
    overrides: dict, tmp_path: Path
) -> None:
    model = _model(**overrides)
    x = model.example_input(2)
    inputs = model.example_inputs(x)
    with torch.no_grad():
        out = model(x, **inputs)
        assert torch.equal(model(x, **inputs), out)
        assert torch.equal(_model(**overrides)(x, **inputs), out)
    model.train()
    model(x, **inputs).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    model.eval().save_pretrained(tmp_path)
    loaded = from_pretrained(tmp_path)
    assert loaded.config == model.config
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, **inputs), out, rtol=1e-5, atol=1e-5)


def test_patches_of_16_channel_latents_and_clear_errors() -> None:
    model = build_model("video_dit", "1.3b", device="meta")
    assert model.config.patch_size == (1, 2, 2) and model.config.in_channels == 16
    assert model.patch_embed.in_features == 1 * 2 * 2 * 16
    tiny = _model()
    x = torch.randn(1, 16, 3, 10, 9)
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        tiny(x, torch.tensor([1]), context=torch.randn(1, 3, 32))
    with pytest.raises(ValueError, match="head width"):
        build_model("video_dit", "tiny", hidden_size=64, num_heads=32)
