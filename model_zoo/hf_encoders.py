"""Frozen Hugging Face text and image encoders: CLIP / T5 text towers and CLIP's image tower.

`hf_text_encoder` wraps a transformers `CLIPTextModel` or `T5EncoderModel` (the `hf_config`
its `config.json` holds) with the model's own tokenizer (`tokenizer_path`, a folder
`AutoTokenizer` reads): `tokenize(list[str]) -> (B, context_length)` padded ids,
`forward(tokens) -> (B, context_length, context_dim)` the last hidden states. T5 encodes with the
attention mask of the real tokens and its padded positions come out as zeros; `token_mask(tokens)`
gives that mask (B, context_length) bool for the denoiser's cross-attention (None for CLIP, whose
fixed-length prompts are attended whole, padding included, as Stable Diffusion trains them).
`hf_image_encoder` wraps a `CLIPVisionModelWithProjection`: images in [-1, 1] -> the projected
image embedding as one token (B, 1, context_dim), StreamingT2V's APM anchor.

Weights come from `pretrained_path` (the Hugging Face folder), loaded strictly: an unknown or
missing key is an error naming it. Like the OpenCLIP towers, the path is consumed at build time.
See docs/methods.md, 'Pretrained weights'.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from safetensors.torch import load_file
from torch import Tensor, nn

from model_zoo.pretrained import PretrainedMixin
from model_zoo.registry import register_family

TEXT_ARCHITECTURES = ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel")
IMAGE_ARCHITECTURES = ("CLIPVisionModelWithProjection",)
TOKENIZER_FOLDER = "tokenizer"
"""Subfolder of a saved `hf_text_encoder` that holds its tokenizer."""


@dataclass(frozen=True, kw_only=True)
class HFTextEncoderConfig:
    hf_config: dict[str, Any] = field(default_factory=dict)
    """The transformers `config.json` of the text model (its `architectures` name the class)."""
    tokenizer_path: str = ""
    """Folder of the model's tokenizer files (read with `AutoTokenizer.from_pretrained`); in a
    saved model folder, relative to it."""
    context_length: int = 77
    """Tokens per prompt (padded / truncated)."""
    context_dim: int = 768
    """Width of the output tokens: the model's hidden size."""
    pretrained_path: str | None = None
    """Hugging Face model folder whose weights load at build time (then reset to None)."""

    def in_folder(self, folder: Path) -> HFTextEncoderConfig:
        """This config with a relative `tokenizer_path` taken inside the model folder `folder`."""
        if Path(self.tokenizer_path).is_absolute():
            return self
        return dataclasses.replace(self, tokenizer_path=str(folder / self.tokenizer_path))


@dataclass(frozen=True, kw_only=True)
class HFImageEncoderConfig:
    hf_config: dict[str, Any] = field(default_factory=dict)
    """The transformers `config.json` of a `CLIPVisionModelWithProjection`."""
    context_dim: int = 768
    """Width of the output token: the model's projection_dim."""
    pretrained_path: str | None = None
    """Hugging Face model folder whose weights load at build time (then reset to None)."""


def _build(hf_config: dict[str, Any], allowed: tuple[str, ...], where: str) -> nn.Module:
    import transformers  # imported here: transformers costs seconds at import time

    names = hf_config.get("architectures") or []
    if len(names) != 1 or names[0] not in allowed:
        raise ValueError(f"{where}: architectures={names} is not one of {list(allowed)}")
    config = transformers.AutoConfig.for_model(**hf_config)
    return getattr(transformers, names[0])(config)


def load_hf_weights(module: nn.Module, folder: str) -> None:
    """Load the one *.safetensors file of a Hugging Face folder strictly into `module` (tied
    weights saved once are filled from their tie)."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if len(files) != 1:
        raise FileNotFoundError(f"{folder}: expected one *.safetensors weights file, found {[p.name for p in files]}")
    state = load_file(str(files[0]))
    result = module.load_state_dict(state, strict=False)
    tied = _tied_keys(module)
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise ValueError(f"{files[0]}: unknown key(s) {result.unexpected_keys[:8]}; missing key(s) {missing[:8]}")


def _tied_keys(module: nn.Module) -> set[str]:
    seen: dict[int, str] = {}
    tied = set()
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.update({name, seen[id(param)]})
        seen.setdefault(id(param), name)
    return tied


def _freeze(module: nn.Module) -> None:
    module.requires_grad_(False)
    module.eval()


@register_family("hf_text_encoder", HFTextEncoderConfig, {})
class HFTextEncoder(PretrainedMixin, nn.Module):
    """Frozen transformers text model returning per-token features (B, context_length, context_dim)."""

    def __init__(self, config: HFTextEncoderConfig) -> None:
        super().__init__()
        from transformers import AutoTokenizer

        self.config = dataclasses.replace(config, pretrained_path=None)
        self.model = _build(config.hf_config, TEXT_ARCHITECTURES, "hf_text_encoder")
        self.masked = config.hf_config.get("model_type") == "t5"
        self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_path)
        if config.pretrained_path is not None:
            load_hf_weights(self.model, config.pretrained_path)
        _freeze(self)

    def bundle_files(self, folder: Path) -> HFTextEncoderConfig:
        """Write the tokenizer into `folder`/tokenizer; the config naming it relative to `folder`."""
        self.tokenizer.save_pretrained(folder / TOKENIZER_FOLDER)
        return dataclasses.replace(self.config, tokenizer_path=TOKENIZER_FOLDER)

    def tokenize(self, prompts: list[str]) -> Tensor:
        """Token ids (B, context_length), padded with the tokenizer's pad token."""
        ids = self.tokenizer(
            prompts, padding="max_length", max_length=self.config.context_length, truncation=True, return_tensors="pt"
        ).input_ids
        return ids.to(next(self.model.parameters()).device)

    def token_mask(self, tokens: Tensor) -> Tensor | None:
        """(B, L) bool, True at the real tokens of a variable-length (T5) prompt; None for CLIP.

        A prompt of padding only (an empty prompt, from a tokenizer that adds no end token) keeps
        its first token, so that every prompt has one token to attend to."""
        if not self.masked:
            return None
        mask = tokens != self.tokenizer.pad_token_id  # (B, L)
        mask[:, 0] |= ~mask.any(dim=1)
        return mask

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens (B, L) long -> last hidden states (B, L, context_dim)."""
        mask = self.token_mask(tokens)
        if mask is None:
            return self.model(input_ids=tokens).last_hidden_state
        hidden = self.model(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
        return hidden * mask[..., None].to(hidden.dtype)

    def encode_prompts(self, prompts: list[str]) -> Tensor:
        """Prompts -> context tokens without gradients."""
        with torch.no_grad():
            return self(self.tokenize(prompts))

    def example_input(self, batch_size: int = 2) -> Tensor:
        """Tokens of `batch_size` short prompts (the first one empty)."""
        return self.tokenize([""] + [f"a video of {n} birds" for n in range(1, batch_size)])

    def checkpoint_modules(self) -> list[nn.Module]:
        """None: the frozen model runs without gradients."""
        return []


@register_family("hf_image_encoder", HFImageEncoderConfig, {})
class HFImageEncoder(PretrainedMixin, nn.Module):
    """Frozen `CLIPVisionModelWithProjection`: images in [-1, 1] -> (B, 1, projection_dim)."""

    def __init__(self, config: HFImageEncoderConfig) -> None:
        super().__init__()
        self.config = dataclasses.replace(config, pretrained_path=None)
        self.model = _build(config.hf_config, IMAGE_ARCHITECTURES, "hf_image_encoder")
        self.image_size = int(self.model.config.image_size)
        self.register_buffer("mean", torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1), persistent=False)
        if config.pretrained_path is not None:
            load_hf_weights(self.model, config.pretrained_path)
        _freeze(self)

    def forward(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) in [-1, 1] -> (B, 1, context_dim)."""
        pixels = F.interpolate(images, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False)
        pixels = ((pixels + 1) / 2 - self.mean) / self.std  # CLIP normalisation of [0, 1] pixels
        return self.model(pixel_values=pixels).image_embeds[:, None]  # (B, 1, D)

    def example_input(self, batch_size: int = 2) -> Tensor:
        """Random images (B, 3, 48, 48) in [-1, 1] on the model's device."""
        return torch.rand(batch_size, 3, 48, 48, device=self.mean.device) * 2 - 1

    def checkpoint_modules(self) -> list[nn.Module]:
        """None: the frozen tower runs without gradients."""
        return []
