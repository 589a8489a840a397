"""`lvd shard`: the data pipeline's sharder, plus the model loading that `shard latents` needs.

data_pipeline never imports model_zoo (the layering of tests/layering.py), so the encoders for
the latent cache are loaded here and handed to it as callables: the VAE's as a `PosteriorEncoder`,
whose draw the sharder seeds per clip from `--seed` and the clip's key.
"""

from __future__ import annotations

from pathlib import Path

import torch

from common.pipeline_folder import is_pipeline_folder
from data_pipeline.latents import PosteriorEncoder, TextEncoder
from data_pipeline.shard_cli import main as shard_main


def load_encoder(folder: str) -> tuple[PosteriorEncoder, TextEncoder | None]:
    """`--vae` is an exported pipeline folder (vae/ and text_encoder/ are used) or one VAE folder."""
    import model_zoo

    root = Path(folder)
    pipeline = is_pipeline_folder(root)
    vae = model_zoo.from_pretrained(root / "vae" if pipeline else root).eval()
    text = model_zoo.from_pretrained(root / "text_encoder").eval() if pipeline and (root / "text_encoder").is_dir() else None

    @torch.no_grad()
    def encode_video(video: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        # the posterior sample (clip i's from generators[i]), scaled and shifted for diffusion
        return vae.to_latents(video.contiguous(), generators)

    @torch.no_grad()
    def encode_text(captions: list[str]) -> torch.Tensor:
        return text(text.tokenize(captions))

    return PosteriorEncoder(encode_video), (encode_text if text is not None else None)


def main(argv: list[str]) -> int:
    return shard_main(argv, load_encoder=load_encoder)
