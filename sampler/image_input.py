"""`lvd sample --image PATH`: the conditioning image read, fitted to the sampling size, and encoded
to the clean first latent frame an image-conditioned denoiser is given (docs/methods.md, 'Image-to-video')."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from sampler.pipeline import Pipeline, vae_factors


def read_image(path: str | Path, height: int, width: int) -> Tensor:
    """A PNG/JPEG image as (1, 3, height, width) in [-1, 1]: scaled so that it covers the size, then
    center-cropped to it."""
    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
    except (FileNotFoundError, UnidentifiedImageError) as error:
        raise ValueError(f"--image {path}: not a readable image file ({error})") from None
    scale = max(height / image.height, width / image.width)
    resized = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))), Image.BICUBIC)
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    pixels = np.asarray(resized.crop((left, top, left + width, top + height)), dtype=np.float32)  # (H, W, 3)
    return torch.from_numpy(pixels / 127.5 - 1.0).permute(2, 0, 1)[None]  # (1, 3, H, W)


@torch.no_grad()
def image_latent(pipeline: Pipeline, image: Tensor) -> Tensor:
    """The clean latent (1, C, h, w) of `image` (1, 3, H, W): the posterior mode of the image held
    still over the frames one latent frame covers (one frame for a causal VAE), scaled as training
    scaled its latents."""
    vae = pipeline.vae
    frames = 1 if hasattr(vae, "latent_frames") else vae_factors(vae)[0]
    still = image.to(next(vae.parameters()))[:, :, None].expand(-1, -1, frames, -1, -1)  # (1, 3, f_t, H, W)
    z = vae.encode(still).mode()[:, :, 0]  # (1, C, h, w)
    return (z - vae.config.shift_factor) * vae.config.scale_factor


IMAGE_STRATEGIES = ("ddim", "lvdm-autoregressive")
"""Strategies that take --image: ddim for image-conditioned exports, lvdm-autoregressive through
LVDM's mask conditioning (every lvdm_prediction export)."""


def conditioning_latent(image: str | None, strategy: str, pipeline: Pipeline, height: int, width: int) -> Tensor | None:
    """--image's clean latent for `pipeline`'s denoiser (None without --image); one clear line when
    the model or the strategy cannot take it."""
    if image is None:
        return None
    if strategy not in IMAGE_STRATEGIES:
        raise ValueError(f"--image is taken by --strategy {' or '.join(IMAGE_STRATEGIES)}, not {strategy}")
    if not (pipeline.image_conditioning or pipeline.task == "lvdm_prediction"):
        raise ValueError(
            f"--image {image}: the model {pipeline.path} was not trained for image conditioning (its "
            "model_index.json has no 'image_conditioning'; train the diffusion task with objective.image_rate > 0, or use an lvdm_prediction export)"
        )
    return image_latent(pipeline, read_image(image, height, width))
