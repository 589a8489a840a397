"""Every latent autoencoder declares its (time, height, width) downsampling, and it is what encoding does."""

from __future__ import annotations

import pytest
import torch

from model_zoo import build_model, list_models
from model_zoo.layers.gaussian_posterior import LatentScalingMixin
from model_zoo.registry import get_family
from sampler.pipeline import vae_factors

VAES = [name for name in list_models() if issubclass(get_family(name.split("/")[0]).model_cls, LatentScalingMixin)]


def test_the_latent_autoencoders_are_found():
    assert {name.split("/")[0] for name in VAES} >= {"video_vae", "temporal_decoder_vae"}


@pytest.mark.parametrize("name", [name for name in VAES if name.endswith("/tiny")])
def test_declared_factors_match_the_encoded_shape(name: str) -> None:
    family, flavor = name.split("/")
    torch.manual_seed(0)
    vae = build_model(family, flavor).eval()
    causal = hasattr(vae, "latent_frames")  # a causal VAE: 1 + ft·k frames -> 1 + k latent frames
    frames = 9 if causal else 8
    video = torch.rand(1, 3, frames, 32, 32) * 2 - 1
    with torch.no_grad():
        latents = vae.to_latents(video)
    ft, fh, fw = vae.downsample_factors
    latent_frames = 1 + (frames - 1) // ft if causal else frames // ft
    assert latents.shape[2:] == (latent_frames, 32 // fh, 32 // fw)
    assert vae_factors(vae) == (ft, fh, fw)


@pytest.mark.parametrize("name", VAES)
def test_factors_of_the_big_flavours_on_meta(name: str) -> None:
    family, flavor = name.split("/")
    with torch.device("meta"):
        vae = build_model(family, flavor)
    assert all(isinstance(f, int) and f >= 1 for f in vae.downsample_factors)
