"""lvd: distributed latent video diffusion training and long-video generation."""

__version__ = "0.1.0"
