"""The trainer's side of the latent cache: what identifies a text encoder, how it fills the
cache, and the check that a cache's text embeddings come from the run's text encoder.

`lvd shard latents` loads its VAE and text encoder with the trainer's own loader
(`networks.build_helper`), so the cache takes exactly the networks `model.vae` and
`model.text_encoder` take. See docs/methods.md, 'Data: the latent cache'.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from data_pipeline.latents import CachedText, TextEmbedder, cached_text, describe
from model_zoo.importers import folders

NULL_RTOL, NULL_ATOL = 1e-3, 1e-4
"""Tolerance of the comparison of the empty caption's embeddings (relative; absolute per unit of
the embedding's largest magnitude): another device or thread count rounds, another encoder differs."""


def text_encoder_identity(spec: str, module: nn.Module) -> dict[str, Any]:
    """Source, class and output shape of a text encoder as `model.text_encoder` names it."""
    if Path(spec).is_dir():
        folder, config = folders.resolve(spec, "text_encoder")
        source, cls = str(folder.resolve()), folders.model_class(config)
    else:
        source, cls = spec, f"lvd:{spec.partition('/')[0]} (random init)"
    return {"source": source, "class": cls, "context_length": int(module.config.context_length)}


def token_mask(module: nn.Module, tokens: torch.Tensor) -> torch.Tensor | None:
    """(B, L) 1 at real tokens for an encoder that masks its padded tokens (T5), else None."""
    if not getattr(module, "masked", False):
        return None
    return (tokens != module.tokenizer.pad_token_id).float()


def text_embedder(spec: str, module: nn.Module) -> TextEmbedder:
    """The cache's text encoder: per-token embeddings and, for T5, the token mask."""

    @torch.no_grad()
    def encode(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        tokens = module.tokenize(captions)
        return module(tokens), token_mask(module, tokens)

    return TextEmbedder(encode, text_encoder_identity(spec, module))


def check_text_encoder(shards: str, spec: str, module: nn.Module | None) -> CachedText | None:
    """Refuse, naming both, a latent cache whose text embeddings another encoder than the run's
    (`spec`, loaded as `module`) made: the two embeddings of the empty caption must agree."""
    cache = cached_text(shards)
    if cache is None or module is None:
        return cache
    with torch.no_grad():
        own = module(module.tokenize([""]))[0].float().cpu().numpy()
    scale = float(np.abs(cache.null_emb).max()) if cache.null_emb.size else 1.0
    if own.shape != cache.null_emb.shape or not np.allclose(own, cache.null_emb, rtol=NULL_RTOL, atol=NULL_ATOL * scale):
        ours = text_encoder_identity(spec, module) | {"embedding_shape": list(own.shape)}
        recache = f" or re-cache with `lvd shard latents --text-encoder {spec}`" if Path(spec).is_dir() else ""
        raise ValueError(
            f"data.shards={shards}: the latent cache's text embeddings come from {describe(cache.identity)}, "
            f"but model.text_encoder is {describe(ours)}: set model.text_encoder to the cache's encoder{recache}"
        )
    return cache
