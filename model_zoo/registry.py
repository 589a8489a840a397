"""The model registry: families, their named flavours, and building by name.

A family registers its config dataclass, its `nn.Module` class and a `FLAVORS` dict of named
config overrides. `build_model("unet3d", "tiny")` builds one; `device="meta"` builds it
without allocating memory, for counting parameters and FLOPs of billion-parameter flavours.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Family:
    name: str
    config_cls: type
    model_cls: type[nn.Module]
    flavors: Mapping[str, Mapping[str, Any]]


_FAMILIES: dict[str, Family] = {}


def register_family(
    name: str, config_cls: type, flavors: Mapping[str, Mapping[str, Any]]
) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: `@register_family("unet3d", UNet3DConfig, FLAVORS)`."""

    def decorate(model_cls: type[nn.Module]) -> type[nn.Module]:
        if name in _FAMILIES and _FAMILIES[name].model_cls is not model_cls:
            raise ValueError(f"model family {name!r} is registered twice")
        _FAMILIES[name] = Family(name, config_cls, model_cls, flavors)
        model_cls.family = name
        return model_cls

    return decorate


def _ensure_loaded() -> None:
    # Importing the package imports every family module, which registers it.
    import model_zoo  # noqa: F401


def get_family(name: str) -> Family:
    _ensure_loaded()
    if name not in _FAMILIES:
        raise KeyError(f"unknown model family {name!r}; valid families: {', '.join(sorted(_FAMILIES))}")
    return _FAMILIES[name]


def list_models() -> list[str]:
    """All registered models as 'family/flavor'."""
    _ensure_loaded()
    return [f"{fam.name}/{flavor}" for fam in sorted(_FAMILIES.values(), key=lambda f: f.name) for flavor in fam.flavors]


def make_config(family: str, flavor: str = "tiny", **overrides: Any) -> Any:
    """The config dataclass of `family/flavor`, with `overrides` applied (unknown keys are named)."""
    fam = get_family(family)
    if flavor not in fam.flavors:
        raise KeyError(f"unknown flavor {flavor!r} for model family {family!r}; valid flavors: {', '.join(fam.flavors)}")
    fields = {f.name for f in dataclasses.fields(fam.config_cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise KeyError(f"unknown config key(s) {', '.join(unknown)} for model family {family!r}; valid keys: {', '.join(sorted(fields))}")
    return fam.config_cls(**{**fam.flavors[flavor], **overrides})


def build_from_config(config: Any, *, device: str | torch.device | None = None) -> nn.Module:
    """Build the module for a config instance (its family is found by config class)."""
    _ensure_loaded()
    for fam in _FAMILIES.values():
        if type(config) is fam.config_cls:
            with torch.device(device) if device is not None else contextlib.nullcontext():
                return fam.model_cls(config)
    raise TypeError(f"no registered model family uses config class {type(config).__name__}")


def build_model(family: str, flavor: str = "tiny", *, device: str | torch.device | None = None, **overrides: Any) -> nn.Module:
    """Build `family/flavor`; `device="meta"` allocates nothing. Unknown names list the valid ones."""
    return build_from_config(make_config(family, flavor, **overrides), device=device)
