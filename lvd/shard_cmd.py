"""`lvd shard`: the data pipeline's sharder, plus the model loading that `shard latents` needs.

data_pipeline never imports model_zoo (the layering of tests/layering.py), so the encoders for
the latent cache are loaded here, with the trainer's own loader (`build_helper`: every VAE and
text encoder `model.vae` / `model.text_encoder` take), and handed to it as callables: the VAE's as
a `PosteriorEncoder`, whose draw the sharder seeds per clip from `--seed` and the clip's key (or
its posterior mean with `--posterior mean`), the text encoder's as a `TextEmbedder`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from common.pipeline_folder import is_pipeline_folder
from data_pipeline.latents import PosteriorEncoder, TextEmbedder, VideoEncoder
from data_pipeline.shard_cli import main as shard_main


def load_encoder(
    vae_spec: str, *, text_encoder: str | None = None, tokenizer: str | None = None, posterior: str = "sample"
) -> tuple[PosteriorEncoder | VideoEncoder, TextEmbedder | None]:
    """The --vae (and --text-encoder) networks. Without --text-encoder, a --vae pipeline folder's
    own text_encoder/ is used when it has one."""
    from trainer.latent_cache import text_embedder
    from trainer.tasks.networks import build_helper

    for flag, spec in (("--vae", vae_spec), ("--text-encoder", text_encoder), ("--tokenizer", tokenizer)):
        if spec is not None and not Path(spec).is_dir():
            raise FileNotFoundError(f"{flag} {spec}: no such folder")
    device = torch.device("cpu")
    vae = build_helper(vae_spec, seed=0, device=device, role="vae")
    root = Path(vae_spec)
    if text_encoder is None and is_pipeline_folder(root) and (root / "text_encoder").is_dir():
        text_encoder = str(root / "text_encoder")
    text = None
    if text_encoder is not None:
        module = build_helper(text_encoder, seed=0, device=device, role="text_encoder", tokenizer=tokenizer)
        text = text_embedder(text_encoder, module)
    if posterior == "mean":

        @torch.no_grad()
        def encode_mean(video: torch.Tensor) -> torch.Tensor:
            z = vae.encode(video.contiguous()).mode()
            return (z - vae.config.shift_factor) * vae.config.scale_factor

        return encode_mean, text

    @torch.no_grad()
    def encode_video(video: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        # the posterior sample (clip i's from generators[i]), scaled and shifted for diffusion
        return vae.to_latents(video.contiguous(), generators)

    return PosteriorEncoder(encode_video), text


def main(argv: list[str]) -> int:
    return shard_main(argv, load_encoder=load_encoder)
