"""StreamingT2V's CAM and APM as the paper builds them (docs/methods.md, 'StreamingT2V').

CAM: the encoder copy reads the noisy chunk; E_cond enters through a zero-initialised conv after
the copy's first temporal transformer block; at initialisation the model is the base. APM: every
cross-attention attends to SiLU(α_l)·x_mixed + x_text, x_mixed shaped like the text context.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import model_zoo
from model_zoo.unet3d import UNetBlock


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _model_over_random_base() -> tuple[nn.Module, nn.Module]:
    """A tiny StreamingT2V at its initialisation over a base U-Net with random weights everywhere."""
    torch.manual_seed(0)
    model = model_zoo.build_model("streaming_t2v", "tiny")
    base = model_zoo.build_from_config(model.config.base)
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=_seeded(1)))
    model.load_base_state_dict(base.state_dict())
    return model, base


def _inputs(model: nn.Module, seed: int = 2) -> tuple[Tensor, dict[str, Tensor]]:
    torch.manual_seed(seed)
    x = model.example_input(2)
    return x, model.example_inputs(x)


def _cam_features(model: nn.Module, x: Tensor, inputs: dict[str, Tensor]) -> list[Tensor]:
    """The CAM features (keys/values) each long-skip injection receives, in order."""
    seen: list[Tensor] = []
    hooks = [
        m.register_forward_pre_hook(lambda _, args: seen.append(args[1].detach().clone()))
        for m in model.cam.inject
    ]
    with torch.no_grad():
        model(x, **inputs)
    for hook in hooks:
        hook.remove()
    return seen


def _wake(module: nn.Module, seed: int, scale: float = 0.1) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=_seeded(seed)))


def test_cam_encoder_copy_reads_the_first_cond_frames_of_the_noisy_chunk() -> None:
    model, _ = _model_over_random_base()
    _wake(model.cam, seed=3)
    x, inputs = _inputs(model)
    f_cond = model.config.cond_frames
    assert x.shape[2] > f_cond
    features = _cam_features(model, x, inputs)
    in_cond_window, after_it = x.clone(), x.clone()
    in_cond_window[:, :, :f_cond] += torch.randn(in_cond_window[:, :, :f_cond].shape, generator=_seeded(4))
    after_it[:, :, f_cond:] += torch.randn(after_it[:, :, f_cond:].shape, generator=_seeded(5))
    changed = _cam_features(model, in_cond_window, inputs)
    unchanged = _cam_features(model, after_it, inputs)
    assert len(features) == len(model.cam.inject)
    for index, (a, b, c) in enumerate(zip(features, changed, unchanged, strict=True)):
        assert a.shape[0] == x.shape[0] * f_cond, index  # x_CAM has F_cond frames
        assert (a - b).abs().amax() > 1e-4, f"CAM feature {index} ignores the noisy input"
        assert torch.equal(a, c), f"CAM feature {index} reads frames past F_cond"


def test_cam_fuses_e_cond_through_a_zero_conv_after_the_first_temporal_block() -> None:
    model, base = _model_over_random_base()
    x, inputs = _inputs(model)
    other_cond = inputs | {"cond_latents": torch.randn(inputs["cond_latents"].shape, generator=_seeded(6))}

    # At initialisation: the base's output for random inputs, and x_CAM does not see E_cond yet.
    with torch.no_grad():
        out = model(x, **inputs)
        reference = base(x, inputs["t"], context=inputs["context"], level=inputs["level"])
    assert reference.abs().amax() > 0.1
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-6)
    for a, b in zip(_cam_features(model, x, inputs), _cam_features(model, x, other_cond), strict=True):
        assert torch.equal(a, b)

    # With a non-zero fusion conv: the first temporal block's output + conv(E_cond(cond)).
    copy = model.cam.encoder
    blocks = [*copy.encoder, *copy.middle]
    first = next(i for i, b in enumerate(blocks) if isinstance(b, UNetBlock) and b.temporal is not None)
    assert first < len(copy.encoder)  # the tiny base has temporal attention at its first level
    temporal_out: list[Tensor] = []
    blocks[first].temporal.register_forward_hook(lambda _, __, out: temporal_out.append(out.detach()))
    _wake(model.cam.fuse, seed=7)
    features = _cam_features(model, x, inputs)
    with torch.no_grad():
        fused = model.cam.fuse(model.cam.frame_encoder(inputs["cond_latents"]))
    torch.testing.assert_close(features[first + 1], temporal_out[-1] + fused, rtol=1e-5, atol=1e-6)
    moved = [
        not torch.equal(a, b) for a, b in zip(features, _cam_features(model, x, other_cond), strict=True)
    ]
    assert moved == [index > first for index in range(len(features))]


def _attention_by_hand(layer: nn.Module, x: Tensor, context: Tensor) -> Tensor:
    """softmax(Q Kᵀ / sqrt(d)) V per head with the layer's projections."""
    n, length, dim = x.shape
    heads, d = layer.heads, dim // layer.heads
    q = layer.q(x).view(n, length, heads, d).transpose(1, 2)  # (N, h, L, d)
    k, v = layer.kv(context).view(n, context.shape[1], 2, heads, d).unbind(2)  # 2 x (N, S, h, d)
    weights = (q @ k.permute(0, 2, 3, 1) / math.sqrt(d)).softmax(-1)  # (N, h, L, S)
    out = (weights @ v.transpose(1, 2)).transpose(1, 2).reshape(n, length, dim)  # (N, L, C)
    return layer.out(out)


def test_apm_attends_to_silu_alpha_mixed_plus_text_keys_and_values() -> None:
    model, _ = _model_over_random_base()
    x, inputs = _inputs(model)
    context, anchor = inputs["context"], inputs["anchor"]
    with torch.no_grad():
        x_mixed = model.apm(context, anchor)
    assert x_mixed.shape == context.shape  # (B, 77, D): the k anchor tokens projected away
    layers = [m for m in model.base.modules() if hasattr(m, "alpha")]
    assert layers
    calls: list[tuple[Tensor, Tensor]] = []
    layers[0].register_forward_hook(lambda _, args, out: calls.append((args[0].detach(), out.detach())))
    alpha = 0.7
    with torch.no_grad():
        layers[0].alpha.fill_(alpha)
        model(x, **inputs)
        query, out = calls[-1]
        x_cross = F.silu(torch.tensor(alpha)) * x_mixed + context
        by_hand = _attention_by_hand(layers[0], query, x_cross)
        only_text = _attention_by_hand(layers[0], query, context)
    torch.testing.assert_close(out, by_hand, rtol=1e-4, atol=1e-5)
    assert (out - only_text).abs().amax() > 1e-3


def test_gradients_reach_every_cam_and_apm_parameter_within_two_steps() -> None:
    """Zero-initialised outputs block the gradient upstream of them at first: at step 0 only the
    P_out of every injection and the α_l get gradient; after one step all but E_cond (behind the
    still-zero fusion conv); after two, every trainable parameter."""
    model, _ = _model_over_random_base()
    x, inputs = _inputs(model)
    target = torch.randn(x.shape, generator=_seeded(8))
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.Adam(named.values(), lr=1e-2)
    with_gradient = []
    for _ in range(3):
        optimizer.zero_grad()
        F.mse_loss(model(x, **inputs), target).backward()
        with_gradient.append({n for n, p in named.items() if p.grad is not None and p.grad.abs().sum() > 0})
        optimizer.step()
    p_out = {n for n in named if n.startswith("cam.inject.") and ".attn.out." in n}
    alphas = {n for n in named if n.endswith(".alpha")}
    e_cond = {n for n in named if n.startswith("cam.frame_encoder.")}
    assert p_out and alphas and e_cond
    assert with_gradient[0] == p_out | alphas
    assert with_gradient[1] == set(named) - e_cond
    assert with_gradient[2] == set(named)


def test_no_anchor_is_the_model_without_apm_whatever_alpha() -> None:
    """anchor=None (`lvd sample --no-apm`): every cross-attention reads x_text alone, i.e. the
    trained model with every α_l at 0, while CAM still works."""
    model, _ = _model_over_random_base()
    _wake(model.cam, seed=5)
    _wake(model.apm, seed=6)
    x, inputs = _inputs(model)
    layers = [m for m in model.base.modules() if hasattr(m, "alpha")]
    with torch.no_grad():
        for layer in layers:
            layer.alpha.fill_(0.8)
        with_apm = model(x, **inputs)
        without = model(x, **{**inputs, "anchor": None})
        for layer in layers:
            layer.alpha.zero_()
        alpha_zero = model(x, **inputs)
    torch.testing.assert_close(without, alpha_zero, rtol=0, atol=1e-6)
    assert (with_apm - without).abs().amax() > 1e-3
