"""Building a task's networks: frozen helpers, and the trained network from scratch or `init_from`."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import model_zoo
from model_zoo.importers import folders
from model_zoo.importers.diffusers_unet import UNET2D_CLASS, grow_inputs, load_unet
from model_zoo.unet3d import UNet3DConfig
from trainer.config import ModelConfig


def announce(line: str) -> None:
    """Print a line of the run log to stderr on rank 0 (which weights each network starts from;
    stdout stays clean for `lvd plan --json`)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"lvd train: {line}", file=sys.stderr, flush=True)


def build_helper(
    spec: str,
    *,
    seed: int,
    device: torch.device,
    role: folders.Role | None = None,
    tokenizer: str | None = None,
    text_layer: folders.TextLayer = "penultimate",
) -> nn.Module:
    """A frozen helper network from 'family/flavor' (seeded random init) or a folder: an lvd
    export, a diffusers / Hugging Face / open_clip model folder or a pipeline folder (its `role`
    subfolder)."""
    if Path(spec).is_dir():
        module, line = folders.load(spec, role or _own_role(spec), tokenizer=tokenizer, text_layer=text_layer)
        announce(line)
    else:
        family, _, flavor = spec.partition("/")
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            module = model_zoo.build_model(family, flavor or "tiny")
        announce(f"{role or family}: random {family}/{flavor or 'tiny'} (seed {seed})")
    module.requires_grad_(False).eval()
    return module.to(device)


def _own_role(spec: str) -> folders.Role:
    """The role a model folder's own class serves (lvd folders load whatever they hold)."""
    _, config = folders.resolve(spec, "denoiser")
    cls = folders.model_class(config)
    for role, classes in folders.ROLE_CLASSES.items():
        if cls in classes:
            return role  # type: ignore[return-value]
    return "denoiser"


def trained_model(model: ModelConfig, **forced: Any) -> nn.Module:
    """The trained network: built from family/flavor + overrides, or loaded from `model.init_from`,
    whose own config then gives the architecture: every override the YAML or the task sets
    must already hold in it (no override is silently dropped)."""
    overrides = {**model.overrides, **forced}
    if not model.init_from:
        announce(f"model: random {model.family}/{model.flavor}")
        return model_zoo.build_model(model.family, model.flavor, **overrides)
    loaded, line = folders.load(model.init_from, "denoiser")
    if line.startswith("denoiser: lvd"):
        check_init_config(model.init_from, loaded.config, overrides)
    else:
        loaded, grown = _grow_to(loaded, forced)
        line += grown
        check_init_config(model.init_from, loaded.config, forced)
        ignored = sorted(k for k in model.overrides if k not in forced)
        line += f"; the YAML's model sizes give way to it (flavor {model.flavor}" + (f", overrides {ignored})" if ignored else ")")
    announce(line)
    return loaded


def _grow_to(loaded: nn.Module, forced: dict[str, Any]) -> tuple[nn.Module, str]:
    """An imported U-Net given the extra input channels and level embedding a task needs (LVDM's
    mask channel and perturbation level), zero-initialised; and a note for the run log."""
    config = loaded.config
    in_channels = int(forced.get("in_channels", config.in_channels))
    num_levels = int(forced.get("num_levels", config.num_levels))
    if in_channels <= config.in_channels and num_levels == config.num_levels:
        return loaded, ""
    if config.num_levels and num_levels != config.num_levels:
        return loaded, ""  # check_init_config names the mismatch
    grown = grow_inputs(loaded, in_channels=in_channels, num_levels=num_levels)
    return grown, f"; grown to in_channels={in_channels}, num_levels={num_levels} (new weights zero: output unchanged)"


def image_unet(source_path: str, key: str, sizes: dict[str, Any], *, role: str) -> nn.Module:
    """The image network (a `unet3d` without temporal layers) that config key `key` names: an
    `lvd export` folder (its `denoiser`) or model folder, or a diffusers UNet2DConditionModel folder
    (or a pipeline folder, its unet: Stable Diffusion's U-Net) loaded as one. It must have this
    run's `sizes` (latent channels, text width); an error naming the key and path otherwise."""
    source = Path(source_path)
    if not source.is_dir():
        raise FileNotFoundError(f"{key}={source}: no such export or model folder")
    folder, config = folders.resolve(source, "denoiser")
    if folders.model_class(config) == UNET2D_CLASS:
        image = load_unet(folder, config, image=True)
        announce(f"{role}: unet3d image network from diffusers {UNET2D_CLASS} {folder}")
    else:
        image = model_zoo.from_pretrained(folder)
    if not isinstance(image.config, UNet3DConfig):
        raise ValueError(
            f"{key}={folder}: a {image.family} network; {role} starts from a unet3d image network"
        )
    temporal = [name for name in ("temporal_conv", "temporal_attention") if getattr(image.config, name)]
    if temporal:
        raise ValueError(
            f"{key}={folder}: not an image network ({', '.join(temporal)} on); train it with model.overrides={{temporal_conv: false, temporal_attention: false}}"
        )
    differing = [
        f"{name} (export {getattr(image.config, name)!r}, this run {value!r})"
        for name, value in sizes.items()
        if getattr(image.config, name) != value
    ]
    if differing:
        raise ValueError(
            f"{key}={folder}: the image network does not fit this run: " + "; ".join(differing)
        )
    return image


def init_from_or_build(model: ModelConfig, config: Any) -> nn.Module:
    """A network of `config`, or `model.init_from`'s weights when given (its config must equal `config`)."""
    if not model.init_from:
        return model_zoo.build_from_config(config)
    loaded = model_zoo.from_pretrained(model.init_from)
    check_init_config(model.init_from, loaded.config, {f.name: getattr(config, f.name) for f in dataclasses.fields(config)})
    return loaded


def check_init_config(init_from: str, config: Any, wanted: dict[str, Any]) -> None:
    """Refuse, naming each one, the settings a checkpoint's config does not have or holds otherwise."""
    names = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(wanted) - names)
    if unknown:
        raise ValueError(f"model.init_from={init_from}: its {type(config).__name__} has no field(s) {unknown}")
    differing = [
        f"{key} (checkpoint {getattr(config, key)!r}, asked {value!r})"
        for key, value in wanted.items()
        if _normalised(getattr(config, key)) != _normalised(value)
    ]
    if differing:
        raise ValueError(
            f"model.init_from={init_from}: the checkpoint's architecture differs from what this run sets: "
            + "; ".join(differing) + " (drop these overrides, or train from scratch)"
        )


def _normalised(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _normalised(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return tuple(_normalised(v) for v in value)
    if isinstance(value, dict):
        return {k: _normalised(v) for k, v in value.items()}
    return value


def train_only(module: nn.Module, trainable: Iterable[nn.Parameter]) -> None:
    """Only `trainable` parameters of `module` receive gradients (and reach the optimizer)."""
    chosen = {id(param) for param in trainable}
    for param in module.parameters():
        param.requires_grad_(id(param) in chosen)
