"""FVD features from user-supplied I3D weights (never downloaded).

Expected format: a TorchScript file of the TF-Hub I3D port used by StyleGAN-V and
`universome/fvd-comparison` (`i3d_torchscript.pt`). It is called as
    module(videos, rescale=False, resize=False, return_features=True) -> (B, D)
with videos (B, 3, 16, 224, 224) float32 in [-1, 1]. Frames are resized here (bilinear,
antialiased, aspect ratio not kept) and cut into non-overlapping 16-frame clips.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from metrics.inception import stacked

CLIP_FRAMES = 16
INPUT_SIZE = 224


def load_i3d(path: str | Path) -> torch.jit.ScriptModule:
    """Load the TorchScript I3D; a clear error when the file is missing or not TorchScript."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"I3D weights not found: {path}")
    try:
        return torch.jit.load(str(path), map_location="cpu").eval()
    except RuntimeError as err:
        raise ValueError(
            f"{path} is not a TorchScript file (expected i3d_torchscript.pt format): {err}"
        ) from err


def clip_tensor(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 RGB -> (1, 3, T, 224, 224) float in [-1, 1]."""
    pixels = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()  # (T, 3, H, W)
    resized = F.interpolate(pixels, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True)
    return (resized / 127.5 - 1.0).clamp(-1.0, 1.0).permute(1, 0, 2, 3).unsqueeze(0)  # (1, 3, T, 224, 224)


@torch.inference_mode()
def i3d_clip_features(module: torch.jit.ScriptModule, frames: Iterable[np.ndarray]) -> np.ndarray:
    """(num_clips, D) features of the complete 16-frame clips of a frame stream."""
    features = [
        module(clip_tensor(clip), rescale=False, resize=False, return_features=True).double().numpy()
        for clip in stacked(frames, CLIP_FRAMES)
        if len(clip) == CLIP_FRAMES
    ]
    return np.concatenate(features) if features else np.zeros((0, 0))
