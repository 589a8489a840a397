"""CLIPSIM (Wu et al. 2021, GODIVA): mean over frames of the cosine similarity between the CLIP
image embedding of a frame and the CLIP text embedding of the video's prompt. Reported as the raw
cosine in [-1, 1] (some papers multiply by 100).

Weights are only ever read from local files (nothing is downloaded), in one of two forms:
- a directory in open_clip's `local-dir:` layout: `open_clip_config.json` (with `model_cfg`)
  beside a weights file (*.safetensors, *.bin or *.pth), e.g. a manually copied HF snapshot;
- a weights file, with `model_name` naming a built-in open_clip architecture (e.g. ViT-B-32).
A directory without a weights file is refused (open_clip would silently build random weights).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from PIL import Image

from metrics.inception import stacked

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pth")


@dataclass(frozen=True)
class ClipScorer:
    model: torch.nn.Module
    """open_clip CLIP model with loaded weights, in eval mode."""
    preprocess: Any
    """open_clip's image transform for this model (PIL image -> (3, S, S) tensor)."""
    tokenizer: Any
    """open_clip tokenizer for this model."""
    name: str
    """Architecture and weights source, for the report."""


def load_clip(path: str | Path, model_name: str = "ViT-B-32") -> ClipScorer:
    path = Path(path)
    if path.is_dir():
        if not (path / "open_clip_config.json").is_file():
            raise FileNotFoundError(f"{path} has no open_clip_config.json (open_clip local-dir layout)")
        if not any(any(path.glob(pattern)) for pattern in WEIGHT_PATTERNS):
            raise FileNotFoundError(f"{path} holds no CLIP weights ({', '.join(WEIGHT_PATTERNS)})")
        model_name, pretrained = f"local-dir:{path}", None
    elif path.is_file():
        pretrained = str(path)
    else:
        raise FileNotFoundError(f"CLIP weights not found: {path}")
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
    return ClipScorer(
        model.eval(), preprocess, open_clip.get_tokenizer(model_name), f"open_clip {model_name} from {path}"
    )


@torch.inference_mode()
def clipsim(
    scorer: ClipScorer, frames: Iterable[np.ndarray], prompt: str, *, batch_size: int = 16
) -> dict[str, Any]:
    """Mean and per-frame-count of the frame-to-prompt cosine similarity of a frame stream."""
    text = torch.nn.functional.normalize(
        scorer.model.encode_text(scorer.tokenizer([prompt])), dim=-1
    )  # (1, E)
    similarities = []
    for batch in stacked(frames, batch_size):
        images = torch.stack([scorer.preprocess(Image.fromarray(frame)) for frame in batch])  # (B, 3, S, S)
        embeddings = torch.nn.functional.normalize(scorer.model.encode_image(images), dim=-1)  # (B, E)
        similarities.append((embeddings @ text.T).squeeze(1).double().numpy())
    if not similarities:
        return {"computed": False, "reason": "no frames"}
    values = np.concatenate(similarities)
    return {"computed": True, "clipsim": float(values.mean()), "frames": len(values), "prompt": prompt}
