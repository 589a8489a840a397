"""EMA of the trained weights that works under every ZeRO stage.

Each rank keeps the EMA of its own piece of each parameter: the whole tensor below ZeRO-3, its
partition (`ds_tensor`) under ZeRO-3. Nothing is gathered during training; `lvd export --ema`
reassembles the partitions from the per-rank checkpoint files.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class Ema:
    def __init__(self, module: nn.Module, decay: float, shard: Callable[[torch.Tensor], torch.Tensor]):
        self.decay = decay
        self.shard = shard
        self.params = {name: p for name, p in module.named_parameters() if p.requires_grad}
        self.shadow = {name: shard(p).detach().float().clone() for name, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for name, p in self.params.items():
            self.shadow[name].lerp_(self.shard(p).float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, Any]:
        shapes = {name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in self.params.items()}
        partitioned = any(hasattr(p, "ds_tensor") for p in self.params.values())
        return {"decay": self.decay, "shadow": self.shadow, "shapes": shapes, "partitioned": partitioned}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state lacks parameters: {sorted(missing)[:5]}")
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)


def assemble(rank_states: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Whole EMA tensors from the EMA states of every rank (in rank order)."""
    first = rank_states[0]
    if not first["partitioned"]:
        return {name: value.clone() for name, value in first["shadow"].items()}
    out = {}
    for name, shape in first["shapes"].items():
        flat = torch.cat([state["shadow"][name].flatten() for state in rank_states])
        numel = int(torch.Size(shape).numel())
        out[name] = flat[:numel].view(shape).clone()
    return out
