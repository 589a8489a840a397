"""The optional aesthetic score: a linear/MLP head over CLIP image embeddings (LAION's predictor).

`--aesthetic-model FOLDER` holds
- `config.json`: {"embed_dim": E, "vision": {open_clip `CLIPVisionCfg` fields, e.g. "layers",
  "width", "patch_size", "image_size"}, "head": [hidden widths]} (LAION's improved predictor over
  ViT-L/14: E 768, head [1024, 128, 64, 16]);
- `model.safetensors`: the vision tower under `visual.*` (the keys of an open_clip CLIP state
  dict) and the head's linear layers as `head.{i}.weight` / `head.{i}.bias`, i = 0.. in order,
  the last one giving 1 output. The layers are applied without activations, as in LAION's MLP
  (its dropouts are identities at inference).

A frame's score is the head applied to its L2-normalised CLIP embedding (frame resized bicubically
to short side `image_size`, centre-cropped, normalised with OpenAI CLIP's mean and std); a clip's
is the mean over its first, middle and last frame. See docs/methods.md, 'Data: curation scores
and filters'.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import CLIPVisionCfg, _build_vision_tower
from safetensors.torch import load_file


class AestheticModel(torch.nn.Module):
    def __init__(self, embed_dim: int, vision: dict, head: list[int]) -> None:
        super().__init__()
        self.visual = _build_vision_tower(embed_dim, CLIPVisionCfg(**vision))
        self.image_size = int(CLIPVisionCfg(**vision).image_size)
        widths = [embed_dim, *head, 1]
        self.head = torch.nn.ModuleList(
            torch.nn.Linear(a, b) for a, b in zip(widths, widths[1:], strict=False)
        )
        self.register_buffer("mean", torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        # frames (N, H, W, 3) uint8 -> scores (N,)
        x = frames.permute(0, 3, 1, 2).float() / 255.0
        scale = self.image_size / min(x.shape[-2:])
        size = (
            max(self.image_size, round(x.shape[-2] * scale)),
            max(self.image_size, round(x.shape[-1] * scale)),
        )
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False).clamp(0, 1)
        top, left = (size[0] - self.image_size) // 2, (size[1] - self.image_size) // 2
        x = x[..., top : top + self.image_size, left : left + self.image_size]
        y = F.normalize(self.visual((x - self.mean) / self.std), dim=-1)
        for layer in self.head:
            y = layer(y)
        return y[:, 0]


@functools.lru_cache(maxsize=2)
def load_aesthetic(folder: str) -> AestheticModel:
    """The model of `folder` (cached per process); errors name the file and what is wrong."""
    root = Path(folder)
    config_path, weights_path = root / "config.json", root / "model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"--aesthetic-model: {path} is missing (see data_pipeline/aesthetic.py)")
    try:
        config = json.loads(config_path.read_text())
        model = AestheticModel(
            int(config["embed_dim"]), dict(config["vision"]), [int(w) for w in config["head"]]
        )
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"--aesthetic-model: {config_path} is not a valid config: {error!r}") from None
    missing, unexpected = model.load_state_dict(load_file(weights_path), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"--aesthetic-model: {weights_path}: missing keys {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model.eval()


def aesthetic(folder: str, frames: list[np.ndarray]) -> float:
    """Mean aesthetic score of the first, middle and last frame of a clip."""
    picked = [frames[0], frames[len(frames) // 2], frames[-1]]
    with torch.inference_mode():
        return float(load_aesthetic(folder)(torch.from_numpy(np.stack(picked))).mean())
