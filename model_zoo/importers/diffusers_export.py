"""Write lvd networks as a diffusers `TextToVideoSDPipeline` folder (see docs/methods.md,
'Pretrained weights'): a ModelScope-layout `unet3d` as `UNet3DConditionModel` (the inverse of the
import key mapping), a frame-wise VAE with zero temporal branches as `AutoencoderKL`, and a
transformers CLIP text encoder with its tokenizer."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from model_zoo.importers.diffusers_unet import UNET3D_CLASS, convert, key_pairs, unet3d_config
from model_zoo.unet3d import UNet3DConfig

IGNORED_FIELDS = ("num_heads", "dropout")
"""UNet3DConfig fields a diffusers config does not carry (heads follow head_dim; dropout is training-only)."""


def diffusers_unet3d_config(config: UNet3DConfig) -> dict[str, Any]:
    """The UNet3DConditionModel config of a ModelScope-layout `config`; ValueError naming the
    options that have no UNet3DConditionModel counterpart."""
    levels = range(len(config.channel_mult))
    cross = [2**level in config.attention_resolutions for level in levels]
    theirs = {
        "_class_name": UNET3D_CLASS,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "block_out_channels": [config.model_channels * m for m in config.channel_mult],
        "down_block_types": ["CrossAttnDownBlock3D" if c else "DownBlock3D" for c in cross],
        "up_block_types": ["CrossAttnUpBlock3D" if c else "UpBlock3D" for c in reversed(cross)],
        "layers_per_block": config.num_res_blocks,
        "norm_num_groups": config.num_groups,
        "norm_eps": config.norm_eps,
        "cross_attention_dim": config.context_dim,
        "attention_head_dim": config.head_dim,
    }
    back = unet3d_config(theirs, "export") if config.head_dim and config.context_dim else None
    differing = [
        f.name
        for f in dataclasses.fields(config)
        if f.name not in IGNORED_FIELDS and (back is None or getattr(back, f.name) != getattr(config, f.name))
    ]
    if differing:
        raise ValueError(f"unet3d options outside the ModelScope layout: {differing}")
    return theirs


def write_unet(denoiser: nn.Module, out: Path) -> None:
    """Save a ModelScope-layout `unet3d` as a diffusers UNet3DConditionModel folder."""
    from diffusers import UNet3DConditionModel

    if denoiser.family != "unet3d":
        raise ValueError(f"a {denoiser.family} denoiser has no diffusers UNet3DConditionModel form")
    target = UNet3DConditionModel.from_config(diffusers_unet3d_config(denoiser.config))
    shapes = {k: v.shape for k, v in target.state_dict().items()}
    state = convert(denoiser.state_dict(), shapes, key_pairs(denoiser.config), where=f"{out}: unet3d")
    target.load_state_dict(state, strict=True)
    target.save_pretrained(out)


def write_vae(vae: nn.Module, out: Path) -> None:
    """Save a frame-wise `temporal_decoder_vae` whose temporal branches are zero as AutoencoderKL
    (with its latent scale as `scaling_factor`)."""
    if vae.family != "temporal_decoder_vae":
        raise ValueError(f"a {vae.family} VAE has no diffusers AutoencoderKL form")
    temporal = [n for n, p in vae.named_parameters() if "_temporal." in n and ".conv." in n and p.abs().max() > 0]
    if temporal or vae.config.shift_factor != 0:
        raise ValueError(f"the VAE's temporal decoder branches or latent shift are not zero ({temporal[:3]}): not a per-frame AutoencoderKL")
    vae.vae.register_to_config(scaling_factor=vae.config.scale_factor)
    vae.vae.save_pretrained(out)


def write_text_encoder(encoder: nn.Module, out: Path) -> str:
    """Save a transformers CLIP text encoder and its tokenizer as `text_encoder/` and `tokenizer/`;
    the tokenizer's class name."""
    if encoder.family != "hf_text_encoder" or encoder.masked:
        raise ValueError(f"a {encoder.family} text encoder is not a transformers CLIPTextModel")
    encoder.model.save_pretrained(out / "text_encoder")
    encoder.tokenizer.save_pretrained(out / "tokenizer")
    return type(encoder.tokenizer).__name__
