"""Parameter and FLOP counters that work on the `meta` device (no memory allocated)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

aten = torch.ops.aten


def _cpu_flash_forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:  # noqa: ANN001
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_backward(
    grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
) -> int:  # noqa: ANN001
    # Model FLOPs: the four matmuls of the gradients, twice the forward's two (the kernel's
    # recomputation of the scores is not model work), as the unfused path counts them.
    return 2 * sdpa_flop_count(query_shape, key_shape, value_shape)


CPU_ATTENTION_FLOPS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_forward,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward,
}
"""PyTorch's counter has formulas for the CUDA attention kernels but counts 0 for the CPU flash
kernel that `F.scaled_dot_product_attention` runs on CPU; with these, fused attention counts the
same FLOPs as the unfused matmul path (and as on `meta`, which runs the unfused path)."""


def flop_counter() -> FlopCounterMode:
    """`FlopCounterMode` that also counts CPU fused attention (matmuls, convolutions, attention)."""
    return FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters (works on meta tensors; shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def estimate_flops(
    model: nn.Module,
    input_shape: tuple[int, ...],
    *,
    backward: bool = False,
    make_inputs: Callable[[torch.Tensor], dict[str, Any]] | None = None,
) -> int:
    """FLOPs of one forward (and backward when asked) for an input of `input_shape`.

    Counted by `torch.utils.flop_counter.FlopCounterMode`, on the model's own device: on
    `meta` nothing is computed or allocated. `make_inputs(x)` returns the keyword arguments of
    `forward` beyond `x` (timesteps, context); by default the model's `example_inputs(x)` if
    it has one.
    """
    device = next(model.parameters()).device
    x = torch.randn(input_shape, device=device, requires_grad=backward)
    kwargs = make_inputs(x) if make_inputs is not None else _default_inputs(model, x)
    counter = flop_counter()
    with counter:
        out = model(x, **kwargs)
        if backward:
            out = out if isinstance(out, torch.Tensor) else out[0]
            out.sum().backward()
    return int(counter.get_total_flops())


def _default_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    example = getattr(model, "example_inputs", None)
    return example(x) if example is not None else {}
