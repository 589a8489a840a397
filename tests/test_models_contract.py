"""The contract every model family's `tiny` flavour meets.

For each `family/tiny` in `model_zoo.list_models()`: output shape, determinism under a seed,
gradients reaching every trainable parameter, and a save_pretrained / from_pretrained round
trip with equal outputs. Plus: the billion-parameter flavours counted on `meta`.

Conventions a family follows to be tested here (all optional except the first):
- `example_inputs(x) -> dict`: forward keyword arguments for a sample input x;
- `example_input(batch_size) -> Tensor`: the sample input x (default: a random
  (B, config.in_channels, 4, 16, 16) clip);
- `contract_output(x, **kwargs) -> Tensor`: called instead of `forward` when forward does
  not return a tensor;
- output shape: x's shape with `config.out_channels` (or `in_channels`) channels, unless the
  family is listed in `OUTPUT_SHAPES`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import model_zoo
from model_zoo import build_model, count_parameters, estimate_flops, from_pretrained, list_models

BATCH = 2
TINY = [name for name in list_models() if name.endswith("/tiny")]

# Families whose output is not "x's shape with C_out channels": expected shape from (model, x).
OUTPUT_SHAPES: dict[str, Callable[[nn.Module, Tensor], tuple[int, ...] | None]] = {
    # A patch discriminator's logit map: only the batch size is fixed.
    "video_discriminator": lambda model, x: None,
    "text_encoder": lambda model, x: (x.shape[0], x.shape[1], model.config.context_dim),
    "image_encoder": lambda model, x: (x.shape[0], 1, model.config.context_dim),
}


def _build(name: str) -> nn.Module:
    family, flavor = name.split("/")
    torch.manual_seed(0)
    model = build_model(family, flavor)
    _perturb(model)
    return model.eval()


def _perturb(model: nn.Module) -> None:
    # Zero-initialised branches (adaLN-Zero, zero output convs) make outputs and most gradients
    # exactly zero at init; a small seeded perturbation makes every path observable.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.add_(0.05 * torch.randn(p.shape, generator=generator).to(p))


def _inputs(model: nn.Module) -> tuple[Tensor, dict[str, Any]]:
    torch.manual_seed(2)
    if hasattr(model, "example_input"):
        x = model.example_input(BATCH)
    else:
        x = torch.randn(BATCH, model.config.in_channels, 4, 16, 16)
    kwargs = model.example_inputs(x) if hasattr(model, "example_inputs") else {}
    return x, kwargs


def _output(model: nn.Module, x: Tensor, kwargs: dict[str, Any]) -> Tensor:
    run = getattr(model, "contract_output", None) or model
    out = run(x, **kwargs)
    assert isinstance(out, Tensor), (
        f"{type(model).__name__} needs contract_output() (forward returned {type(out)})"
    )
    return out


def _expected_shape(model: nn.Module, x: Tensor) -> tuple[int, ...] | None:
    if model.family in OUTPUT_SHAPES:
        return OUTPUT_SHAPES[model.family](model, x)
    channels = getattr(model.config, "out_channels", None) or model.config.in_channels
    return (x.shape[0], channels, *x.shape[2:])


@pytest.mark.parametrize("name", TINY)
def test_tiny_contract(name: str, tmp_path: Path) -> None:
    model = _build(name)
    assert count_parameters(model) < 6_000_000, "tiny flavours must stay CPU-test sized"
    x, kwargs = _inputs(model)
    with torch.no_grad():
        out = _output(model, x, kwargs)
        again = _output(model, x, kwargs)

    # 1. Output shape (and finiteness).
    expected = _expected_shape(model, x)
    assert out.shape[0] == x.shape[0]
    if expected is not None:
        assert tuple(out.shape) == expected
    assert torch.isfinite(out).all()

    # 2. Determinism: same seed -> same weights and same output; repeated calls agree.
    assert torch.equal(out, again)
    twin = _build(name)
    for (key, a), b in zip(model.state_dict().items(), twin.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    with torch.no_grad():
        assert torch.equal(_output(twin, x, kwargs), out)

    # 3. Gradients reach every trainable parameter (non-zero, finite); frozen encoders have none.
    # Every module holding trainable parameters runs its own forward: ZeRO-3 gathers a
    # partitioned parameter only in its module's hooks, so a weight read from outside (say
    # `self.fc.weight` in a parent's forward) would be an empty shard at scale.
    trainable = {pname: p for pname, p in model.named_parameters() if p.requires_grad}
    if trainable:
        model.train()
        called: set[int] = set()
        hooks = [m.register_forward_pre_hook(lambda m, _: called.add(id(m))) for m in model.modules()]
        out = _output(model, x, kwargs)
        for hook in hooks:
            hook.remove()
        owners = [
            mname
            for mname, m in model.named_modules()
            if any(p.requires_grad for p in m.parameters(recurse=False)) and id(m) not in called
        ]
        assert not owners, f"{name}: parameters used outside their module's forward: {owners}"
        out.float().square().mean().backward()
        for pname, p in trainable.items():
            assert p.grad is not None, f"{name}: no gradient reaches {pname}"
            assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, (
                f"{name}: zero gradient at {pname}"
            )
        model.eval()

    # 4. save_pretrained / from_pretrained round trip (safetensors, no pickle) gives equal outputs.
    model.save_pretrained(tmp_path / "export")
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["config.json", "model.safetensors"]
    loaded = from_pretrained(tmp_path / "export")
    assert type(loaded) is type(model) and loaded.config == model.config
    with torch.no_grad():
        torch.testing.assert_close(_output(loaded, x, kwargs), out, rtol=1e-5, atol=1e-5)


def test_every_family_has_a_tiny_flavour() -> None:
    families = {name.split("/")[0] for name in list_models()}
    assert {"unet3d", "dit"} <= families
    assert families == {name.split("/")[0] for name in TINY}


@pytest.mark.parametrize("name", ["unet3d/1b", "dit/1b"])
def test_billion_parameter_flavours_on_meta(name: str) -> None:
    family, flavor = name.split("/")
    model = build_model(family, flavor, device="meta")
    params = count_parameters(model)
    assert next(model.parameters()).is_meta
    assert params >= 1.0e9
    flops = estimate_flops(model, (1, 4, 16, 32, 32))
    print(
        f"{name}: {params / 1e9:.3f}e9 parameters, {flops / 1e12:.2f} TFLOPs forward on a 1x4x16x32x32 latent"
    )
    assert flops > 2 * params  # every parameter is used at least once per token or pixel


def test_unknown_names_list_the_valid_ones() -> None:
    with pytest.raises(KeyError, match="tiny"):
        model_zoo.build_model("unet3d", "huge")
    with pytest.raises(KeyError, match="dit"):
        model_zoo.build_model("no-such-family")


def test_fused_cpu_attention_counts_the_flops_of_the_unfused_path() -> None:
    """PyTorch's counter counts 0 for the CPU flash kernel; ours counts what the matmuls do."""
    from model_zoo.counting import flop_counter

    def counted(attention: Callable[[Tensor], Tensor], device: str) -> int:
        q = torch.randn(2, 4, 64, 16, requires_grad=True, device=device)
        with flop_counter() as counter:
            attention(q).sum().backward()
        return counter.get_total_flops()

    fused = counted(lambda q: torch.nn.functional.scaled_dot_product_attention(q, q, q), "cpu")
    unfused = counted(lambda q: (q @ q.transpose(-1, -2)).softmax(-1) @ q, "cpu")
    assert fused == unfused == 3 * 2 * 2 * (2 * 4 * 64 * 64 * 16)  # fwd + bwd of two matmuls
    assert counted(lambda q: torch.nn.functional.scaled_dot_product_attention(q, q, q), "meta") == unfused
