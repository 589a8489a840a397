"""3D convolution with replicate ("repeat") padding along time and zero padding in space.

LVDM pads time by repeating the border frames, so an interior output frame sees only real
frames and the encoder is temporally shift-equivariant away from the borders (SPEC §2.1).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


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
        self.conv = nn.Conv3d(
            in_channels, out_channels, kernel_size, stride=stride, padding=(0, kh // 2, kw // 2), bias=bias
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.time_pad:
            pad = (0, 0, 0, 0, self.time_pad, self.time_pad)
            x = F.pad(x, pad, mode="replicate")  # (B, C, T + 2p, H, W)
        return self.conv(x)  # (B, C_out, T / s_t, H / s_h, W / s_w)
