"""Keep freed CPU memory inside the process (glibc malloc), so hot loops stop page-faulting.

PyTorch's CPU tensors come from glibc `malloc`. By default glibc serves every block above a
dynamic threshold (128 KiB rising to 32 MiB) with a fresh `mmap` and unmaps it on free, and it
trims the heap top back to the kernel. A loop that allocates and frees the same large buffers
every step (conv3d's unfold buffers, attention scores, decoded frames) then touches new pages
every step: each 4 KiB page is a minor fault, zero-filled by the kernel, and on a VM the host may
have reclaimed the page too. Measured here (`lvd sample`'s tiny VAE decode, 1 thread): 33 000
faults and ~20% of the time per decode; with `keep_freed_memory()` ~0 faults and 15-30% faster,
and the 2-rank lvdm-hierarchical run gained more than the 1-rank one. The cost: a process keeps
up to `trim_threshold` of freed memory at its heap top, and blocks below `mmap_threshold` that it
freed stay in its heap for reuse.

The `lvd train` and `lvd sample` ranks call it first thing; `LVD_KEEP_FREED_MEMORY=0` turns it
off. The settings are per process: data-loader workers (started by a forkserver) keep glibc's
defaults, so a node's many workers do not each hold on to freed memory. glibc reads the same
settings from `GLIBC_TUNABLES` at start-up; this does it at run time so that srun, torchrun and
`common.launch` ranks need no environment.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
"""glibc's `mallopt` parameter numbers (malloc.h)."""

MMAP_THRESHOLD = 1 << 30
"""Blocks of 1 GiB and more still get their own mapping (and go back to the kernel when freed)."""
TRIM_THRESHOLD = 1 << 30
"""The heap top is given back to the kernel only when more than 1 GiB of it is free."""

DISABLE_ENV = "LVD_KEEP_FREED_MEMORY"


def keep_freed_memory(
    mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD
) -> str:
    """Apply the settings through glibc `mallopt`; returns what happened, in words (for logs).

    A no-op, with the reason, when `LVD_KEEP_FREED_MEMORY=0` or the C library is not glibc
    (musl, macOS): nothing else depends on it.
    """
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return f"malloc: left at glibc defaults ({DISABLE_ENV}=0)"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "malloc: left at defaults (no glibc mallopt in this C library)"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    for name, value in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
        if not 0 < value < 2**31:  # mallopt takes a C int
            raise ValueError(f"keep_freed_memory: {name} must be in (0, 2 GiB), got {value}")
    trim_ok = mallopt(M_TRIM_THRESHOLD, trim_threshold)
    mmap_ok = mallopt(M_MMAP_THRESHOLD, mmap_threshold)
    if not (trim_ok and mmap_ok):
        return f"malloc: glibc refused mallopt (trim {trim_ok}, mmap {mmap_ok}); defaults kept where refused"
    return (
        f"malloc: freed memory kept in-process (mmap threshold {mmap_threshold >> 20} MiB, "
        f"trim threshold {trim_threshold >> 20} MiB)"
    )
