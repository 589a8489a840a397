"""The shared-memory ring through which loader workers hand uint8 video batches to the main process."""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from data_pipeline.stages import to_unit_range


class VideoRing:
    """Fixed uint8 buffers in shared memory through which workers hand video batches to the main
    process, which converts them to float and frees the cell at once.

    Versus returning a tensor per batch this saves, per batch, a fresh shared-memory segment (its
    page faults cost more than the uint8 -> float conversion), the copy into it and the file
    descriptor hand-shake with the worker. DataLoader keeps at most `prefetch` batches of a worker
    outstanding, so `prefetch + 1` cells per worker never make a worker wait; a busy flag per cell
    keeps that safe without relying on it.
    """

    WAIT_SECONDS = 120.0

    def __init__(self, *, rows: int, cells: int, nbytes: int, shared: bool) -> None:
        self.buffers = torch.empty((rows, cells, nbytes), dtype=torch.uint8)
        self.busy = torch.zeros((rows, cells), dtype=torch.uint8)
        if shared:
            self.buffers.share_memory_()
            self.busy.share_memory_()

    def put(self, row: int, number: int, video: np.ndarray) -> tuple[int, int, tuple[int, ...]]:
        """Copy the `number`-th batch of ring row `row` into a cell; returns what `take` needs."""
        cell = number % self.busy.shape[1]
        busy, deadline = self.busy.numpy(), time.monotonic() + self.WAIT_SECONDS
        while busy[row, cell]:
            if time.monotonic() > deadline:
                raise RuntimeError(f"video ring cell {row}/{cell} still busy after {self.WAIT_SECONDS} s")
            time.sleep(0.001)
        busy[row, cell] = 1
        self.buffers[row, cell, : video.nbytes].numpy()[:] = video.reshape(-1)
        return row, cell, video.shape

    def take(self, row: int, cell: int, shape: tuple[int, ...]) -> torch.Tensor:
        """(B, C, T, H, W) float32 in [-1, 1] of a cell's (B, T, H, W, 3) batch; frees the cell."""
        pixels = self.buffers[row, cell, : math.prod(shape)].numpy().reshape(shape)
        video = to_unit_range(pixels)
        self.busy[row, cell] = 0
        return video
