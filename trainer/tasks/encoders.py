"""The frozen encoders of a latent text-to-video task: clips -> latents, captions -> context."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from trainer.config import ModelConfig
from trainer.tasks.interface import Batch
from trainer.tasks.networks import build_helper

TEXT_ENCODER_SEED, VAE_SEED = 1, 2
"""Offsets from `train.seed` of the random initialisation of the frozen helpers."""


@dataclass(frozen=True)
class LatentEncoders:
    """The frozen helpers that turn a batch into what a latent denoiser sees."""

    text_encoder: nn.Module
    """Captions (as tokens) -> context (B, 77, D)."""
    vae: nn.Module | None
    """Clips -> latents; None when the shards already hold latents."""

    def helpers(self) -> dict[str, nn.Module]:
        """The frozen networks by the name they are saved and exported under."""
        return {"text_encoder": self.text_encoder} | ({} if self.vae is None else {"vae": self.vae})

    def tokenizer(self) -> Callable[[list[str]], Tensor]:
        return self.text_encoder.tokenize

    def context_dim(self) -> int:
        return int(self.text_encoder.config.context_dim)

    def latent_channels(self, model: ModelConfig) -> int:
        """Channels of the latents: the VAE's, or (latent shards) the trained network's output."""
        if self.vae is None:
            return int(model.overrides.get("out_channels", 4))
        return int(self.vae.config.latent_channels)

    @torch.no_grad()
    def encode(self, batch: Batch, generator: torch.Generator, device: torch.device) -> tuple[Tensor, Tensor]:
        """Latents (B, c, t, h, w) and text context (B, 77, D), both from the frozen helpers."""
        if batch.latents is not None:
            latents = batch.latents.to(device)
        else:
            latents = self.vae.to_latents(batch.pixels().to(device), generator=generator)
        if batch.text_emb is None:
            return latents, self.text_encoder(batch.tokens.to(device))
        # A latent cache's embeddings: where the loader dropped a caption (p_uncond) it put the
        # cache's empty-caption embedding, the context the sampler's unconditional branch uses.
        return latents, batch.text_emb.to(device)

    def mask_input(self, batch: Batch, device: torch.device) -> dict[str, Tensor]:
        """The denoiser's `context_mask` keyword for the batch's captions (`text_mask_input`); a
        latent cache's own token mask where it stored one."""
        if batch.text_emb is not None and batch.text_mask is not None:
            return {"context_mask": batch.text_mask.to(device).bool()}
        return text_mask_input(self.text_encoder, batch.tokens, device)


def text_mask_input(text_encoder: nn.Module, tokens: Tensor | None, device: torch.device) -> dict[str, Tensor]:
    """{'context_mask': (B, L) bool, True at real tokens} for a text encoder of variable-length
    prompts (T5), so the denoiser's cross-attention skips the padding; {} for fixed-length CLIP
    prompts (every token is attended, and the denoiser is called as without a mask)."""
    mask = None if tokens is None else text_encoder.token_mask(tokens.to(device))
    return {} if mask is None else {"context_mask": mask}


def text_encoder(model: ModelConfig, *, seed: int, device: torch.device) -> nn.Module:
    """The frozen text encoder of `model` (its tokenizer and layer; seeded when random)."""
    return build_helper(
        model.text_encoder,
        seed=seed + TEXT_ENCODER_SEED,
        device=device,
        role="text_encoder",
        tokenizer=model.tokenizer,
        text_layer=model.text_layer,
    )


def latent_encoders(model: ModelConfig, *, vae: bool, seed: int, device: torch.device) -> LatentEncoders:
    """The text encoder and, for pixel data, the VAE of `model` (seeded when random)."""
    return LatentEncoders(
        text_encoder=text_encoder(model, seed=seed, device=device),
        vae=build_helper(model.vae, seed=seed + VAE_SEED, device=device, role="vae") if vae else None,
    )
