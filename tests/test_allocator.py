"""common.allocator: freed tensor memory is reused in-process instead of page-faulted anew."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from common.allocator import DISABLE_ENV, keep_freed_memory

CHILD = """
import json, resource, torch
from common.allocator import keep_freed_memory
message = keep_freed_memory()
def step():  # a 48 MiB buffer allocated, written and freed, as conv3d's unfold buffer is each call
    torch.empty(12 * 2**20).fill_(1.0)
for _ in range(10):  # glibc settles: posix_memalign's padding makes the first few frees too small to reuse
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(json.dumps({"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, "message": message}))
"""


def child_faults(disable: bool) -> dict:
    env = {**os.environ, DISABLE_ENV: "0" if disable else "1"}
    env.pop("GLIBC_TUNABLES", None)
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_freed_buffers_are_reused_without_page_faults():
    default, kept = child_faults(disable=True), child_faults(disable=False)
    assert "glibc defaults" in default["message"] and "kept in-process" in kept["message"]
    pages = 10 * 48 * 2**20 // 4096  # what 10 fresh 48 MiB buffers cost in 4 KiB faults
    assert default["faults"] > pages // 2  # glibc's default: a new mapping every step
    assert kept["faults"] < pages // 20


def test_thresholds_must_fit_mallopt():
    with pytest.raises(ValueError, match="trim_threshold"):
        keep_freed_memory(trim_threshold=4 << 30)
