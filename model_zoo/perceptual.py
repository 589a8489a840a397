"""A learned perceptual distance between images in the manner of LPIPS (Zhang et al. 2018, "The
Unreasonable Effectiveness of Deep Features as a Perceptual Metric", eq. 1):

    d(x, x̂) = Σ_l  mean_hw  w_l · ( ŷ_l(x) - ŷ_l(x̂) )²

with ŷ_l the features of layer l of a frozen VGG16, divided by their norm over channels at each
position, and w_l a learned non-negative weight per channel (a 1×1 convolution to one channel).

The weights are read from a local folder only (docs/methods.md, 'Video VAE: training losses'):

    PATH/vgg16.pth   torchvision's VGG16 state dict: the whole model's (keys `features.N.*`,
                     the classifier is ignored) or only its `features` (keys `N.*`)
    PATH/vgg.pth     the linear layers of the `lpips` package (lpips/weights/v0.1/vgg.pth,
                     keys `lin{l}.model.1.weight` of shape (1, C_l, 1, 1))
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

VGG16_LAYOUT: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
"""VGG16's feature stack up to its last convolution: output channels of each 3×3 convolution
(each followed by a ReLU), "M" a 2×2 max-pool. Built in this order, the module indices match
torchvision's `vgg16().features`."""
TAPS = (3, 8, 15, 22, 29)
"""Indices of the ReLUs whose outputs are compared (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3)."""
TAP_CHANNELS = (64, 128, 256, 512, 512)
"""Channels of the compared features."""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
"""Per-channel mean of the ImageNet images VGG16 was trained on, in [0, 1]."""
IMAGENET_STD = (0.229, 0.224, 0.225)
"""Per-channel standard deviation of those images, in [0, 1]."""
BACKBONE_FILE = "vgg16.pth"
"""The file of the folder that holds the VGG16 weights."""
LINEAR_FILE = "vgg.pth"
"""The file of the folder that holds the per-layer linear weights (the `lpips` package's name)."""


def vgg16_features() -> nn.Sequential:
    """VGG16's convolutional stack up to relu5_3 (random weights)."""
    layers: list[nn.Module] = []
    channels = 3
    for entry in VGG16_LAYOUT:
        if entry == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(channels, int(entry), 3, padding=1), nn.ReLU()]
            channels = int(entry)
    return nn.Sequential(*layers)


class PerceptualDistance(nn.Module):
    """d(a, b) per image pair for images (N, 3, H, W) in [-1, 1]; frozen once loaded."""

    def __init__(self) -> None:
        super().__init__()
        self.features = vgg16_features()
        self.linear = nn.ModuleList(nn.Conv2d(channels, 1, 1, bias=False) for channels in TAP_CHANNELS)
        # ImageNet normalisation of images given in [-1, 1].
        self.register_buffer("shift", (2 * torch.tensor(IMAGENET_MEAN) - 1).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", (2 * torch.tensor(IMAGENET_STD)).view(1, 3, 1, 1), persistent=False)

    def tapped(self, images: Tensor) -> list[Tensor]:
        """The compared features of `images`, each unit-normalised over its channels."""
        h = (images - self.shift) / self.scale
        out = []
        for index, layer in enumerate(self.features):
            h = layer(h)  # (N, C_l, H_l, W_l) after the l-th tapped ReLU
            if index in TAPS:
                out.append(h / (h.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        pairs = zip(self.tapped(a), self.tapped(b), strict=True)
        per_layer = [linear((fa - fb).pow(2)).mean(dim=(1, 2, 3)) for linear, (fa, fb) in zip(self.linear, pairs, strict=True)]
        return torch.stack(per_layer).sum(dim=0)  # (N,)


def load_perceptual(directory: str | Path) -> PerceptualDistance:
    """The frozen distance from a folder holding `vgg16.pth` and `vgg.pth` (see the module
    docstring); a missing folder or file is an error naming it."""
    directory = Path(directory)
    for name in (BACKBONE_FILE, LINEAR_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(
                f"perceptual weights {directory}: no file {name} in it (the folder must hold {BACKBONE_FILE}, "
                f"torchvision's VGG16 state dict, and {LINEAR_FILE}, the lpips package's linear layers)"
            )
    distance = PerceptualDistance()
    backbone = torch.load(directory / BACKBONE_FILE, map_location="cpu", weights_only=True)
    backbone = {key.removeprefix("features."): value for key, value in backbone.items() if not key.startswith("classifier.")}
    distance.features.load_state_dict(backbone)
    linear = torch.load(directory / LINEAR_FILE, map_location="cpu", weights_only=True)
    keys = [f"lin{index}.model.1.weight" for index in range(len(TAP_CHANNELS))]
    if missing := [key for key in keys if key not in linear]:
        raise ValueError(f"perceptual weights {directory / LINEAR_FILE}: no tensor(s) {missing}")
    for key, layer in zip(keys, distance.linear, strict=True):
        layer.weight.data.copy_(linear[key])
    return distance.requires_grad_(False).eval()
