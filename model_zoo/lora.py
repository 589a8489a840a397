"""LoRA adapters as files, and merging them into a network's weights (docs/methods.md, 'LoRA').

An adapter holds, per adapted linear layer `path`, the down projection A (r, in) and the up
projection B (out, r); the layer's weight becomes W + s · (alpha / r) · B A, with s the user's
scale. Training injects the adapters with peft (trainer/lora.py); here they are plain tensors, so
the sampler and the export merge them without peft. Three key layouts are written:

    peft       adapter_config.json + adapter_model.safetensors,
               `base_model.model.<path>.lora_A.weight` / `.lora_B.weight` (`PeftModel.from_pretrained`)
    diffusers  pytorch_lora_weights.safetensors, `unet.<path>.lora_A.weight` / `.lora_B.weight`
               (`load_lora_weights`; alpha / r is folded into B, as diffusers assumes alpha = r)
    comfyui    lora_comfyui.safetensors, `lora_unet_<path with _ for .>.lora_down.weight`,
               `.lora_up.weight` and `.alpha`

The adapter also records the identity of the base it was trained on (lvd_base.json: the
`init_from` it came from, if any, and the SHA-256 of its weights), so that applying it to another
base is refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
BASE_FILE = "lvd_base.json"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
DIFFUSERS_PREFIX = "unet."
COMFYUI_WEIGHTS = "lora_comfyui.safetensors"
COMFYUI_PREFIX = "lora_unet_"
FORMATS = ("peft", "diffusers", "comfyui")
"""Key layouts an adapter can be written in (the peft one is always written)."""


@dataclass(frozen=True)
class Adapter:
    """The low-rank factors of every adapted layer, and what they apply to."""

    down: dict[str, Tensor]
    """Module path -> A, (rank, in_features)."""
    up: dict[str, Tensor]
    """Module path -> B, (out_features, rank)."""
    rank: int
    """r."""
    alpha: float
    """The update is scaled by alpha / r."""
    base: dict[str, Any]
    """Identity of the base network: `init_from` (path or None), `family`, `sha256` of its weights."""

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def weights_sha256(state: dict[str, Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of a state dict (the base's identity)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def adapter_from_state(state: dict[str, Tensor], *, rank: int, alpha: float, base: dict[str, Any]) -> Adapter:
    """An adapter from peft's parameter names (`<path>.lora_A[.<adapter name>].weight`)."""
    down: dict[str, Tensor] = {}
    up: dict[str, Tensor] = {}
    for key, value in state.items():
        for marker, into in ((".lora_A.", down), (".lora_B.", up)):
            if marker in key:
                into[key.split(marker)[0]] = value.detach().float().cpu().contiguous()
    if not down or set(down) != set(up):
        raise ValueError(f"no complete LoRA pairs in the state ({len(down)} lora_A, {len(up)} lora_B)")
    return Adapter(down=down, up=up, rank=rank, alpha=alpha, base=base)


def save_adapter(adapter: Adapter, out: str | Path, *, formats: tuple[str, ...] = ("peft",)) -> Path:
    """Write the adapter into folder `out` in each of `formats` (see the module docstring)."""
    unknown = [name for name in formats if name not in FORMATS]
    if unknown:
        raise ValueError(f"LoRA format {unknown[0]!r}: valid are {', '.join(FORMATS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = sorted(adapter.down)
    peft_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": adapter.base.get("init_from"),
        "r": adapter.rank,
        "lora_alpha": adapter.alpha,
        "target_modules": paths,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_rslora": False,
        "modules_to_save": None,
    }
    (out / PEFT_CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n")
    (out / BASE_FILE).write_text(json.dumps(adapter.base, indent=2) + "\n")
    tensors = {f"{PEFT_PREFIX}{p}.lora_A.weight": adapter.down[p] for p in paths}
    tensors |= {f"{PEFT_PREFIX}{p}.lora_B.weight": adapter.up[p] for p in paths}
    save_file(tensors, str(out / PEFT_WEIGHTS), metadata={"format": "pt"})
    if "diffusers" in formats:
        tensors = {f"{DIFFUSERS_PREFIX}{p}.lora_A.weight": adapter.down[p] for p in paths}
        tensors |= {f"{DIFFUSERS_PREFIX}{p}.lora_B.weight": adapter.up[p] * adapter.scale for p in paths}
        save_file(tensors, str(out / DIFFUSERS_WEIGHTS), metadata={"format": "pt"})
    if "comfyui" in formats:
        tensors = {}
        for p in paths:
            key = COMFYUI_PREFIX + p.replace(".", "_")
            tensors |= {f"{key}.lora_down.weight": adapter.down[p], f"{key}.lora_up.weight": adapter.up[p]}
            tensors[f"{key}.alpha"] = torch.tensor(float(adapter.alpha))
        save_file(tensors, str(out / COMFYUI_WEIGHTS))
    return out


def load_adapter(folder: str | Path) -> Adapter:
    """The adapter of a folder in peft's layout (as `save_adapter` or peft's `save_pretrained` write it)."""
    folder = Path(folder)
    for name in (PEFT_CONFIG, PEFT_WEIGHTS):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder}: no {name} (not a LoRA adapter folder in peft's layout)")
    config = json.loads((folder / PEFT_CONFIG).read_text())
    base = json.loads((folder / BASE_FILE).read_text()) if (folder / BASE_FILE).is_file() else {}
    state = {
        key.removeprefix(PEFT_PREFIX): value for key, value in load_file(str(folder / PEFT_WEIGHTS)).items()
    }
    return adapter_from_state(state, rank=int(config["r"]), alpha=float(config["lora_alpha"]), base=base)


def merged_state(base: dict[str, Tensor], adapter: Adapter, *, scale: float = 1.0) -> dict[str, Tensor]:
    """The base's state with each adapted weight W replaced by W + scale · (alpha / r) · B A."""
    merged = dict(base)
    for path in sorted(adapter.down):
        key = f"{path}.weight"
        if key not in base:
            raise ValueError(f"LoRA module {path!r}: the network has no weight {key!r}")
        weight = base[key]
        delta = adapter.up[path] @ adapter.down[path]  # (out, r) @ (r, in) -> (out, in)
        if delta.shape != weight.shape:
            raise ValueError(
                f"LoRA module {path!r}: the update is {tuple(delta.shape)}, the weight {tuple(weight.shape)}"
            )
        merged[key] = (weight.float() + scale * adapter.scale * delta).to(weight.dtype)
    return merged


def check_base(adapter: Adapter, state: dict[str, Tensor], *, where: str) -> None:
    """Refuse a base whose weights are not the ones the adapter was trained on."""
    want = adapter.base.get("sha256")
    if want is None:
        return
    got = weights_sha256(state)
    if got != want:
        origin = adapter.base.get("init_from") or f"a seeded random {adapter.base.get('family', 'network')}"
        raise ValueError(
            f"{where}: the LoRA adapter was trained on another base (weights sha256 {want[:16]}, from {origin}); "
            f"this network's weights have sha256 {got[:16]}"
        )


def apply_adapter(module: nn.Module, adapter: Adapter, *, scale: float = 1.0, where: str = "LoRA") -> None:
    """Merge the adapter into `module`'s weights in place, after checking the base's identity."""
    state = {name: tensor.detach() for name, tensor in module.state_dict().items()}
    check_base(adapter, state, where=where)
    module.load_state_dict(merged_state(state, adapter, scale=scale))
