"""3D convolution with replicate ("repeat") padding along time and zero padding in space.

LVDM pads time by repeating the border frames, so an interior output frame sees only real
frames and the encoder is temporally shift-equivariant away from the borders
(docs/methods.md, 'Video VAE: architecture').

On CPU the convolution always runs on oneDNN (`Conv3d`): PyTorch's own choice sends batch-1
inputs with N·C·T·H ≤ 20480 (every tiny config, and the sampler's one-video VAE decoding at small
sizes) to its im2col kernel: 2-6x slower per convolution here, 3.7-5.1x for a tiny VAE decoding
(`benchmarks/conv3d_cpu.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Conv3d(nn.Conv3d):
    """`nn.Conv3d` (zero padding, no dilation, no groups) that runs on oneDNN for every float32
    CPU input.

    PyTorch picks oneDNN for a CPU convolution only above a size heuristic; below it (batch 1 and
    N·C·T·H ≤ 20480) it runs `slow_conv3d`, whose im2col buffer is 27x the input. oneDNN gives
    the same values to float32 rounding (~1e-4 relative), is deterministic, and has a backward.
    Other devices and dtypes (CUDA, meta, bf16) keep `nn.Conv3d`'s path. The parameters are used
    inside this module's forward, as ZeRO-3's gathering hooks need.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        if (
            self.groups != 1
            or self.dilation != (1, 1, 1)
            or self.padding_mode != "zeros"
            or isinstance(self.padding, str)
        ):
            raise ValueError("Conv3d: only groups=1, dilation 1 and explicit zero padding")

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if (
            x.device.type == "cpu"
            and x.dtype == torch.float32
            and not x.is_mkldnn
            and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled
        ):
            return torch.ops.aten.mkldnn_convolution(
                x.contiguous(), weight, bias, list(self.padding), list(self.stride), [1, 1, 1], 1
            )
        return super()._conv_forward(x, weight, bias)


class TimePaddedConv3d(nn.Module):
    """`nn.Conv3d` on (B, C, T, H, W) with odd kernels: time padded by replication, space by zeros.

    With stride `s` along time the output has `ceil(T / s)` frames, so shifting the input by
    `s` frames shifts the output by one frame.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int, int] = (3, 3, 3),
        stride: tuple[int, int, int] = (1, 1, 1),
        bias: bool = True,
    ) -> None:
        super().__init__()
        if any(k % 2 == 0 for k in kernel_size):
            raise ValueError(f"TimePaddedConv3d needs odd kernel sizes, got {kernel_size}")
        kt, kh, kw = kernel_size
        self.time_pad = kt // 2
        self.conv = Conv3d(
            in_channels, out_channels, kernel_size, stride=stride, padding=(0, kh // 2, kw // 2), bias=bias
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.time_pad:
            pad = (0, 0, 0, 0, self.time_pad, self.time_pad)
            x = F.pad(x, pad, mode="replicate")  # (B, C, T + 2p, H, W)
        return self.conv(x)  # (B, C_out, T / s_t, H / s_h, W / s_w)
