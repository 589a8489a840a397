"""Frozen OpenCLIP text and image towers: text context tokens and APM anchor tokens.

`text_encoder`: `tokenize(list[str]) -> (B, 77)` with open_clip's BPE tokenizer (offline),
`forward(tokens) -> (B, 77, context_dim)` per-token features of the last or penultimate
transformer layer after the final LayerNorm (the LDM / Stable Diffusion 2 convention).
`image_encoder`: `forward(images (B, 3, H, W) in [-1, 1]) -> (B, 1, context_dim)`, the
projected CLIP image embedding as one token (StreamingT2V's APM expands it to k tokens).

Both towers are frozen (no trainable parameters, eval mode). Weights come from a local
open_clip checkpoint (`pretrained_path`: a full CLIP state dict as .safetensors, or a
.bin/.pt read with `weights_only=True`) when given, and are random otherwise. The `tiny`
flavours are small custom towers for tests. A text tower may also be described by an open_clip
`text_cfg` (the `model_cfg` of a checkpoint folder's open_clip_config.json, see
`model_zoo.importers.folders`), with open_clip's BPE tokenizer.

See docs/methods.md, 'Text and image encoders'.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import CLIPTextCfg, CLIPVisionCfg, _build_text_tower, _build_vision_tower
from safetensors.torch import load_file
from torch import Tensor, nn

from model_zoo.pretrained import PretrainedMixin
from model_zoo.registry import register_family

TOKENIZER_FALLBACK = "ViT-B-32"  # any open_clip model with the standard CLIP BPE vocabulary


@dataclass(frozen=True, kw_only=True)
class TextEncoderConfig:
    arch: str | None = "ViT-H-14"
    """open_clip model name whose text tower is built; None builds the small custom tower below."""
    context_dim: int = 1024
    """Width of the output tokens (the U-Net/DiT context_dim); must equal the tower's width."""
    layers: int = 2
    """Transformer layers of the custom tower (arch=None only)."""
    heads: int = 2
    """Attention heads of the custom tower (arch=None only)."""
    context_length: int = 77
    """Tokens per prompt (padded / truncated)."""
    layer: Literal["last", "penultimate"] = "penultimate"
    """Which transformer layer's tokens are returned (after the final LayerNorm)."""
    quick_gelu: bool = False
    """QuickGELU activations (OpenAI-trained checkpoints); False for LAION ViT-H-14."""
    text_cfg: dict[str, Any] = field(default_factory=dict)
    """An open_clip `text_cfg` (a checkpoint folder's `model_cfg.text_cfg`); when given it defines
    the tower, and `arch`, `layers` and `heads` are unused."""
    embed_dim: int | None = None
    """CLIP embedding width of the tower's text projection (loaded, not used: the tokens are read
    before it); None: context_dim."""
    pretrained_path: str | None = None
    """Local open_clip checkpoint to load; consumed at build time (the built model's config
    stores None because its own saved weights then contain the tower)."""


@dataclass(frozen=True, kw_only=True)
class ImageEncoderConfig:
    arch: str | None = "ViT-H-14"
    """open_clip model name whose image tower is built; None builds the small custom tower below."""
    context_dim: int = 1024
    """Width of the output token (the CLIP embedding dimension)."""
    image_size: int = 224
    """Input resolution of the custom tower (named archs use their own)."""
    patch_size: int = 14
    """Patch size of the custom tower (arch=None only)."""
    width: int = 64
    """Transformer width of the custom tower (arch=None only)."""
    layers: int = 2
    """Transformer layers of the custom tower (arch=None only)."""
    heads: int = 2
    """Attention heads of the custom tower (arch=None only)."""
    quick_gelu: bool = False
    """QuickGELU activations (OpenAI-trained checkpoints)."""
    pretrained_path: str | None = None
    """Local open_clip checkpoint to load; consumed at build time like TextEncoderConfig's."""


TEXT_FLAVORS: dict[str, dict[str, Any]] = {
    "tiny": dict(arch=None, context_dim=32),
    "vit-h-14": {},  # TextEncoderConfig's defaults
    "vit-l-14": dict(arch="ViT-L-14", context_dim=768, quick_gelu=True),
}

IMAGE_FLAVORS: dict[str, dict[str, Any]] = {
    "tiny": dict(arch=None, context_dim=32, image_size=32, patch_size=8, width=32),
    "vit-h-14": {},  # ImageEncoderConfig's defaults
    "vit-l-14": dict(arch="ViT-L-14", context_dim=768, quick_gelu=True),
}


def _arch_config(arch: str) -> dict[str, Any]:
    config = open_clip.get_model_config(arch)
    if config is None:
        raise KeyError(f"open_clip has no model config {arch!r}; valid: {', '.join(open_clip.list_models())}")
    return config


def _read_checkpoint(path: str) -> dict[str, Tensor]:
    file = Path(path)
    state = (
        load_file(str(file))
        if file.suffix == ".safetensors"
        else torch.load(file, map_location="cpu", weights_only=True)
    )
    state = state.get("state_dict", state)
    return {key.removeprefix("module."): value for key, value in state.items()}


def _load_tower(tower: nn.Module, state: dict[str, Tensor], prefix: str) -> None:
    """Load the keys `prefix + name` of a full CLIP state dict whose `name` belongs to `tower` (strict)."""
    wanted = set(tower.state_dict())
    own = {
        key[len(prefix) :]: value
        for key, value in state.items()
        if key.startswith(prefix) and key[len(prefix) :] in wanted
    }
    tower.load_state_dict(own, strict=True)


def _freeze(module: nn.Module) -> None:
    module.requires_grad_(False)
    module.eval()


@register_family("text_encoder", TextEncoderConfig, TEXT_FLAVORS)
class TextEncoder(PretrainedMixin, nn.Module):
    """Frozen OpenCLIP text tower returning per-token features (B, context_length, context_dim)."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.config = dataclasses.replace(config, pretrained_path=None)
        if config.text_cfg:
            text_cfg = CLIPTextCfg(**config.text_cfg)
        elif config.arch is None:
            text_cfg = CLIPTextCfg(
                context_length=config.context_length,
                width=config.context_dim,
                heads=config.heads,
                layers=config.layers,
            )
        else:
            text_cfg = CLIPTextCfg(
                **{**_arch_config(config.arch)["text_cfg"], "context_length": config.context_length}
            )
        if text_cfg.width != config.context_dim:
            raise ValueError(
                f"text_encoder {config.arch}: tower width {text_cfg.width} != context_dim {config.context_dim}"
            )
        self.tower = _build_text_tower(config.embed_dim or config.context_dim, text_cfg, quick_gelu=config.quick_gelu)
        self._tokenizer = (
            open_clip.SimpleTokenizer(context_length=config.context_length, **(text_cfg.tokenizer_kwargs or {}))
            if config.text_cfg
            else open_clip.get_tokenizer(config.arch or TOKENIZER_FALLBACK, context_length=config.context_length)
        )
        if config.pretrained_path is not None:
            # Text keys sit at the top level of a CLIP state dict, or under "text." (CustomTextCLIP).
            state = _read_checkpoint(config.pretrained_path)
            _load_tower(self.tower, state, "text." if any(k.startswith("text.") for k in state) else "")
        _freeze(self)

    def tokenize(self, prompts: list[str]) -> Tensor:
        """open_clip BPE tokens (B, context_length), on the model's device."""
        return self._tokenizer(prompts).to(self.tower.positional_embedding.device)

    def token_mask(self, tokens: Tensor) -> None:
        """None: CLIP's fixed-length prompts are attended whole (padding included)."""
        return None

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens (B, L) long -> per-token features (B, L, context_dim)."""
        index = -2 if self.config.layer == "penultimate" else -1
        out = self.tower.forward_intermediates(
            tokens,
            indices=[index],
            stop_early=True,
            normalize_intermediates=True,
            intermediates_only=True,
            output_fmt="NLC",
        )
        return out["text_intermediates"][0]  # (B, L, D)

    def encode_prompts(self, prompts: list[str]) -> Tensor:
        """Prompts -> context tokens (B, context_length, context_dim) without gradients."""
        with torch.no_grad():
            return self(self.tokenize(prompts))

    def example_input(self, batch_size: int = 2) -> Tensor:
        """Tokens of `batch_size` short prompts (the first one empty, as in CFG dropout)."""
        prompts = [""] + [f"a video of {n} birds flying over the sea" for n in range(1, batch_size)]
        return self.tokenize(prompts)

    def checkpoint_modules(self) -> list[nn.Module]:
        """None: the frozen tower runs without gradients."""
        return []


@register_family("image_encoder", ImageEncoderConfig, IMAGE_FLAVORS)
class ImageEncoder(PretrainedMixin, nn.Module):
    """Frozen OpenCLIP image tower: images in [-1, 1] -> projected CLIP embedding as one token."""

    def __init__(self, config: ImageEncoderConfig) -> None:
        super().__init__()
        self.config = dataclasses.replace(config, pretrained_path=None)
        if config.arch is None:
            vision_cfg = CLIPVisionCfg(
                layers=config.layers,
                width=config.width,
                head_width=config.width // config.heads,
                patch_size=config.patch_size,
                image_size=config.image_size,
            )
        else:
            vision_cfg = CLIPVisionCfg(**_arch_config(config.arch)["vision_cfg"])
        self.image_size = vision_cfg.image_size
        self.tower = _build_vision_tower(config.context_dim, vision_cfg, quick_gelu=config.quick_gelu)
        self.register_buffer("mean", torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1), persistent=False)
        if config.pretrained_path is not None:
            _load_tower(self.tower, _read_checkpoint(config.pretrained_path), "visual.")
        _freeze(self)

    def forward(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) in [-1, 1] -> (B, 1, context_dim)."""
        pixels = F.interpolate(
            images, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False
        )
        pixels = ((pixels + 1) / 2 - self.mean) / self.std  # CLIP normalisation of [0, 1] pixels
        return self.tower(pixels)[:, None]  # (B, 1, D)

    def example_input(self, batch_size: int = 2) -> Tensor:
        """Random images (B, 3, 48, 48) in [-1, 1] on the model's device."""
        return torch.rand(batch_size, 3, 48, 48, device=self.mean.device) * 2 - 1

    def checkpoint_modules(self) -> list[nn.Module]:
        """None: the frozen tower runs without gradients."""
        return []
