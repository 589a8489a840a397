"""Ulysses sequence parallelism: the DiT families on 2 real gloo ranks give the single-device
outputs and gradients (self- and cross-attention, 3-D RoPE, a token count not divisible by 2);
clear errors for what it does not support."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model_zoo import build_model
from model_zoo.layers.sequence_parallel import Collectives, apply_ulysses

CASES = {
    # family/flavor -> (input (B, C, T, H, W) shape, tokens): 3 * 3 * 3 = 27 tokens, odd.
    "dit/tiny": ((2, 4, 3, 6, 6), 27),
    "video_dit/tiny": ((2, 16, 3, 6, 6), 27),
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _inputs(model: torch.nn.Module, shape: tuple[int, ...]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(1)
    x = torch.randn(*shape)
    return x, model.example_inputs(x)


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(*name.split("/"))
    # Zero-initialised gates and output layers would hide the attention from the output: perturb all.
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model


def _forward_backward(model: torch.nn.Module, x: torch.Tensor, kwargs: dict[str, torch.Tensor]):
    model.zero_grad()
    out = model(x, **kwargs)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _rank(rank: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from trainer.sequence_parallel import group_collectives

    try:
        for name, (shape, _) in CASES.items():
            model = _model(name)
            x, kwargs = _inputs(model, shape)
            ref_out, ref_grads = _forward_backward(model, x, kwargs)
            apply_ulysses(model, group_collectives(dist.group.WORLD, rank, 2))
            out, grads = _forward_backward(model, x, kwargs)
            for grad in grads.values():  # each rank holds its tokens' part: the sum is the gradient
                dist.all_reduce(grad)
            out_err = (out - ref_out).abs().max().item()
            grad_err = max((grads[n] - g).abs().max().item() / (g.abs().max().item() + 1e-12) for n, g in ref_grads.items())
            missing = sorted(set(ref_grads) - set(grads))
            if rank == 0:
                results[name] = (out_err, grad_err, missing, ref_out.abs().max().item())
    finally:
        dist.destroy_process_group()


@pytest.mark.multirank
@pytest.mark.slow  # two spawned interpreters: ~20 s alone, longer on a loaded machine
def test_ulysses_equals_single_device_on_two_ranks() -> None:
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(_free_port(), results), nprocs=2, join=True)
        results = dict(results)
    assert set(results) == set(CASES)
    for name, (out_err, grad_err, missing, scale) in results.items():
        assert scale > 1e-3, name  # a non-trivial output
        assert not missing, (name, missing)
        assert out_err < 1e-5, (name, out_err)
        assert grad_err < 1e-5, (name, grad_err)


def _fake(size: int) -> Collectives:
    return Collectives(rank=0, size=size, all_to_all=lambda x: x, all_gather=lambda x: x[None])


def test_heads_not_divisible_is_a_clear_error() -> None:
    model = build_model("video_dit", "tiny")  # 2 heads
    with pytest.raises(ValueError, match="2 attention heads, not divisible by the SP degree 3"):
        apply_ulysses(model, _fake(3))


def test_joint_text_attention_and_unet_are_refused() -> None:
    with pytest.raises(ValueError, match="text_attention=joint"):
        apply_ulysses(build_model("video_dit", "tiny", text_attention="joint"), _fake(2))
    with pytest.raises(ValueError, match="not a DiT"):
        apply_ulysses(build_model("unet3d", "tiny"), _fake(2))


def test_one_rank_group_is_the_identity() -> None:
    """SP degree 1 through the same code path (pad, all-to-all, gather) changes no bit."""
    for name, (shape, _) in CASES.items():
        model = _model(name)
        x, kwargs = _inputs(model, shape)
        with torch.no_grad():
            reference = model(x, **kwargs)
            apply_ulysses(model, _fake(1))
            assert torch.equal(model(x, **kwargs), reference), name
