"""Save and load models as `config.json` + `model.safetensors` (diffusers layout, no pickle)."""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from common.files import atomic_write_json, replacing
from model_zoo.registry import build_from_config, get_family

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def config_to_dict(config: Any) -> dict[str, Any]:
    return {f.name: _to_json(getattr(config, f.name)) for f in dataclasses.fields(config)}


def _to_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return config_to_dict(value)
    if isinstance(value, tuple | list):
        return [_to_json(v) for v in value]
    return value


def _from_json(tp: Any, value: Any) -> Any:
    """Turn JSON lists back into the tuples (and nested dataclasses) the config types declare."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return config_from_dict(tp, value)
    if origin is tuple and isinstance(value, list):
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_json(args[0], v) for v in value)
        return tuple(_from_json(a, v) for a, v in zip(args, value, strict=True))
    if origin in (typing.Union, types.UnionType) and value is not None:
        for arg in typing.get_args(tp):
            if arg is not type(None):
                return _from_json(arg, value)
    return value


def config_from_dict(config_cls: type, data: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(config_cls)
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{config_cls.__name__}: unknown key(s) in {CONFIG_NAME}: {', '.join(unknown)}")
    return config_cls(**{k: _from_json(hints[k], v) for k, v in data.items()})


def write_config(model: nn.Module, directory: str | os.PathLike[str]) -> Path:
    """Write only `config.json` (with the family name): enough to rebuild the module empty."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    # A model with files of its own (a tokenizer) writes them into the folder and says how its
    # config names them there, so that the folder is self-contained.
    own = model.bundle_files(out) if hasattr(model, "bundle_files") else model.config
    config = {"_family": model.family, **config_to_dict(own)}
    atomic_write_json(out / CONFIG_NAME, config)
    return out


def save_pretrained(model: nn.Module, directory: str | os.PathLike[str], *, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `config.json` (with the family name) and `model.safetensors` atomically into `directory`."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = state_dict if state_dict is not None else model.state_dict()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with replacing(out / WEIGHTS_NAME) as tmp:
        save_file(_unshare(tensors), str(tmp))
    return write_config(model, out)


def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage (tied weights): store independent copies.
    seen: set[int] = set()
    out = {}
    for key, value in tensors.items():
        ptr = value.untyped_storage().data_ptr()
        out[key] = value.clone() if ptr in seen else value
        seen.add(ptr)
    return out


def load_config(directory: str | os.PathLike[str]) -> Any:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {CONFIG_NAME} (expected a folder written by save_pretrained)")
    data = json.loads(path.read_text())
    family = data.pop("_family", None)
    if family is None:
        raise ValueError(f"{path}: no '_family' key (not an lvd model folder)")
    config = config_from_dict(get_family(family).config_cls, data)
    # Files a model bundled into its folder are named relative to it.
    return config.in_folder(Path(directory)) if hasattr(config, "in_folder") else config


def from_pretrained(directory: str | os.PathLike[str], *, device: str | torch.device = "cpu", strict: bool = True) -> nn.Module:
    """Load a model written by `save_pretrained` (no deepspeed, no pickle)."""
    config = load_config(directory)
    model = build_from_config(config, device=device)
    weights = Path(directory) / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing weights file")
    state = load_file(str(weights), device=str(device))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if strict and (missing or unexpected):
        raise ValueError(f"{weights}: state dict does not match {model.family}: missing={missing[:5]} unexpected={unexpected[:5]}")
    return model


class PretrainedMixin:
    """Gives a model `save_pretrained(dir)`; the model stores its config as `self.config`."""

    config: Any
    family: str

    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        return save_pretrained(self, directory)  # type: ignore[arg-type]
