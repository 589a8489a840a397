"""First-frame image conditioning by channel concatenation (as in Wan and CogVideoX image-to-video).

The denoiser's input is the noisy latents with C + 1 channels appended: the clean latent of the
conditioning image in frame 0 (zeros in every other frame) and a mask channel that is 1 in frame 0
and 0 elsewhere. Without an image the C + 1 channels are all zero (mask 0), so one network serves
text-to-video and image-to-video. See docs/methods.md, 'Image-to-video'.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def image_condition(first_latent: Tensor | None, like: Tensor, keep: Tensor | None = None) -> Tensor:
    """The C + 1 conditioning channels (B, C+1, T, h, w) for latents shaped like `like` (B, C, T, h, w).

    `first_latent` (B, C, h, w) is the image's clean latent (None: no image, all zeros); `keep` (B,)
    bool chooses the samples that get it (None: all)."""
    batch, channels, frames, height, width = like.shape
    cond = like.new_zeros(batch, channels + 1, frames, height, width)
    if first_latent is None:
        return cond
    given = like.new_ones(batch) if keep is None else keep.to(like.dtype)
    weight = given.view(batch, 1, 1, 1)
    cond[:, :channels, 0] = first_latent.to(like) * weight  # clean latent in frame 0 of the kept samples
    cond[:, channels, 0] = weight[:, 0]  # mask: 1 in frame 0 of the kept samples
    return cond


def with_image_condition(model: Callable[..., Tensor], first_latent: Tensor | None, keep: Tensor | None = None) -> Callable[..., Tensor]:
    """`model(x, t, **kw)` that sees `cat([x, image_condition(...)], dim=1)`: (B, 2C+1, T, h, w)."""

    def denoise(x: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
        return model(torch.cat([x, image_condition(first_latent, x, keep)], dim=1), t, **kwargs)

    return denoise


def conditioned_channels(latent_channels: int) -> int:
    """Input channels of a denoiser trained with image conditioning: C noisy + C image + 1 mask."""
    return 2 * latent_channels + 1
