"""Regional `torch.compile` of a network's blocks, with an eager fallback where the backend is
unavailable (docs/methods.md, 'Training: what every task shares').

Each block is compiled in place (`nn.Module.compile`), before the DeepSpeed engine wraps the
network: the module tree and its parameter names stay those of the eager network (no `_orig_mod.`
prefix), so checkpoints and exports are the same either way, and one compile serves every block of
a kind. Whether the backend works here is checked once, up front, by compiling and running a small
function with it: a failure at the first compiled forward would surface inside the engine's step,
after the step's noise was drawn, on some ranks and not others.
"""

from __future__ import annotations

import torch
from torch import nn


def _probe(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(x * 2.0 + 1.0)


def unavailable_reason(backend: str) -> str | None:
    """Why `backend` cannot compile in this process (None: it can).

    Raises ValueError for a backend name torch does not know (a configuration error, not a
    missing tool).
    """
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise ValueError(
            f"train.compile_backend: unknown backend {backend!r} (known: {', '.join(sorted(known))})"
        )
    if torch._dynamo.config.disable:
        return "torch.compile is disabled in this process (TORCH_COMPILE_DISABLE=1)"
    try:
        compiled = torch.compile(_probe, backend=backend, fullgraph=True)
        compiled(torch.ones(8))
    except Exception as err:  # any backend failure (no C compiler, a broken toolchain) means eager
        lines = str(err).strip().splitlines()
        return f"{type(err).__name__}: {lines[0] if lines else 'no message'}"
    return None


def compile_blocks(module: nn.Module, backend: str) -> None:
    """Compile each of the network's blocks in place (networks without blocks stay eager)."""
    for block in getattr(module, "checkpoint_modules", list)():
        block.compile(backend=backend)
