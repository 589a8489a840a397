"""`lvd shard`: the data pipeline's sharder, plus the model loading that `shard latents` needs.

data_pipeline never imports model_zoo (the layering of tests/layering.py), so the encoders for
the latent cache are loaded here and handed to it as plain callables.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from common.pipeline_folder import is_pipeline_folder
from data_pipeline.shard_cli import main as shard_main

VideoEncoder = Callable[[torch.Tensor], torch.Tensor]
TextEncoder = Callable[[list[str]], torch.Tensor]


def load_encoder(folder: str) -> tuple[VideoEncoder, TextEncoder | None]:
    """`--vae` is an exported pipeline folder (vae/ and text_encoder/ are used) or one VAE folder."""
    import model_zoo

    root = Path(folder)
    pipeline = is_pipeline_folder(root)
    vae = model_zoo.from_pretrained(root / "vae" if pipeline else root).eval()
    text = model_zoo.from_pretrained(root / "text_encoder").eval() if pipeline and (root / "text_encoder").is_dir() else None

    @torch.no_grad()
    def encode_video(video: torch.Tensor) -> torch.Tensor:
        return vae.to_latents(video.contiguous())  # the posterior sample, scaled and shifted for diffusion

    @torch.no_grad()
    def encode_text(captions: list[str]) -> torch.Tensor:
        return text(text.tokenize(captions))

    return encode_video, (encode_text if text is not None else None)


def main(argv: list[str]) -> int:
    return shard_main(argv, load_encoder=load_encoder)
