"""Random streams keyed by unit of work, so results do not depend on which rank runs a unit."""

from __future__ import annotations

import hashlib

import torch


def unit_generator(seed: int, stream: str, index: int = 0) -> torch.Generator:
    """A CPU generator that is a pure function of (seed, stream, index) (SHA-256 of the three)."""
    digest = hashlib.sha256(f"{seed}/{stream}/{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
