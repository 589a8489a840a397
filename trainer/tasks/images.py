"""How a trained network takes an image batch of joint image + video training.

A U-Net (`unet3d`) denoises an image batch, one-frame clips (N, c, 1, h, w), with its temporal
layers skipped (`image_mode=True`): the LVDM / VidRD / ModelScope practice. A DiT (`dit`,
`video_dit`) takes an image as a one-frame video, which needs a temporal patch of 1. See
docs/methods.md, 'Data: joint image + video training'.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch import nn

from model_zoo.dit import DiT
from model_zoo.unet3d import UNet3D
from model_zoo.video_dit import VideoDiT


def check_image_network(network: nn.Module) -> None:
    """A ValueError naming `data.image_shards` when `network` cannot take one-frame image batches."""
    if isinstance(network, UNet3D):
        return
    if isinstance(network, (DiT, VideoDiT)):
        if network.config.patch_size[0] != 1:
            raise ValueError(
                f"data.image_shards: images pass as one-frame videos, but this {type(network).__name__} patches "
                f"{network.config.patch_size[0]} frames together (patch_size {list(network.config.patch_size)}); "
                "use a temporal patch of 1 or drop data.image_shards"
            )
        return
    raise ValueError(f"data.image_shards: a {type(network).__name__} cannot train on image batches")


def image_denoiser(network: nn.Module, model: Callable[..., Any]) -> Callable[..., Any]:
    """`model` (the engine of `network`) as it denoises an image batch."""
    check_image_network(network)
    if isinstance(network, UNet3D):
        return functools.partial(model, image_mode=True)
    return model
