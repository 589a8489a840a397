"""LoRA on the trained denoiser, applied from outside the model with peft (docs/methods.md, 'LoRA').

    identity = inject_lora(model, cfg.train.lora, init_from=cfg.model.init_from)   # before the engine

peft replaces each targeted linear layer in place by one holding the frozen base layer and the
factors A, B; the model class, its config and its blocks stay as they are. Only A and B keep
requires_grad, so only they reach the optimizer and the checkpoint (the engine saves trainable
parameters only); the base is rebuilt the same way at resume and export, and its identity (the
SHA-256 of its weights) must match the one the checkpoint recorded.
"""

from __future__ import annotations

import re
from typing import Any

import peft
import torch
from torch import Tensor, nn

from model_zoo.lora import Adapter, adapter_from_state, weights_sha256
from trainer.config import TrainJobConfig
from trainer.lora_config import DEFAULT_TARGETS, LoraConfig


def target_modules(model: nn.Module, lora: LoraConfig) -> list[str]:
    """Names of the linear layers the patterns of `lora.targets` (or the family's default) match
    in full; a pattern that matches no linear layer is an error naming it."""
    family = getattr(model, "family", type(model).__name__)
    patterns = lora.targets or DEFAULT_TARGETS.get(family)
    if not patterns:
        raise ValueError(
            f"train.lora.targets: the {family} network has no default LoRA targets; give module-name patterns "
            f"(families with defaults: {', '.join(DEFAULT_TARGETS)})"
        )
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    chosen: list[str] = []
    for pattern in patterns:
        try:
            matched = [name for name in linear if re.fullmatch(pattern, name)]
        except re.error as err:
            raise ValueError(f"train.lora.targets: {pattern!r} is not a regular expression ({err})") from None
        if not matched:
            raise ValueError(
                f"train.lora.targets: {pattern!r} matches no linear layer of the {family} network"
            )
        chosen.extend(name for name in matched if name not in chosen)
    return chosen


def base_identity(model: nn.Module, init_from: str | None) -> dict[str, Any]:
    """What the adapter applies to: where the base came from and the SHA-256 of its weights."""
    return {
        "init_from": init_from,
        "family": getattr(model, "family", type(model).__name__),
        "sha256": weights_sha256(model.state_dict()),
    }


def inject_lora(model: nn.Module, lora: LoraConfig, *, init_from: str | None) -> dict[str, Any]:
    """Add rank-`lora.rank` adapters to the target layers of `model` in place and freeze all else;
    the base's identity (taken before the injection)."""
    identity = base_identity(model, init_from)
    config = peft.LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha or lora.rank,
        target_modules=target_modules(model, lora),
        lora_dropout=0.0,
    )
    peft.inject_adapter_in_model(config, model)
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_" in name)
    return identity


def adapter_of(state: dict[str, Tensor], lora: LoraConfig, identity: dict[str, Any]) -> Adapter:
    """The adapter in a (consolidated) checkpoint state of a LoRA run."""
    return adapter_from_state(state, rank=lora.rank, alpha=lora.alpha or lora.rank, base=identity)


def check_identity(recorded: dict[str, Any], current: dict[str, Any], *, where: str) -> None:
    """Refuse to continue or export a LoRA checkpoint over a base other than the one it was trained on."""
    if recorded.get("sha256") != current["sha256"]:
        raise ValueError(
            f"{where}: the LoRA checkpoint was trained on another base (init_from={recorded.get('init_from')}, "
            f"weights sha256 {str(recorded.get('sha256'))[:16]}); this run's base (init_from={current['init_from']}) "
            f"has sha256 {current['sha256'][:16]}"
        )


def rebuilt_base(cfg: TrainJobConfig, meta: dict[str, Any], *, where: str) -> nn.Module:
    """The frozen base of a LoRA run, rebuilt as the run built it (seed, `model.init_from`), after
    checking it is the base the checkpoint's adapter was trained on."""
    from trainer.tasks import build_task

    base = build_task(cfg, torch.device("cpu")).trained["model"]
    check_identity(meta.get("lora_base") or {}, base_identity(base, cfg.model.init_from), where=where)
    return base
