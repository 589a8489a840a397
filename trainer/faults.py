"""Fault injection for the tests: `LVD_FAULT` makes a run fail in a chosen way at a chosen step.

    LVD_FAULT=kill_in_save:<step>            SIGKILL the process half-way through that step's save
    LVD_FAULT=nan_loss:<step>[:<step>...]    rank 0's loss is NaN at these steps
    LVD_FAULT=nan_loss_from:<step>           rank 0's loss is NaN from this step on
    LVD_FAULT=kill_rank:<rank>:<step>        SIGKILL that rank as that step begins (its peers are left in a collective)
    LVD_FAULT=stop_rank:<rank>:<step>        SIGSTOP it instead: a hung rank, which no launcher sees exit
"""

from __future__ import annotations

import os
import signal

FAULT_ENV = "LVD_FAULT"


def _fault() -> tuple[str, str]:
    kind, _, steps = os.environ.get(FAULT_ENV, "").partition(":")
    return kind, steps


def kill_in_save(step: int) -> None:
    """Die like `kill -9` in the middle of writing the checkpoint of `step`, when asked to."""
    if _fault() == ("kill_in_save", str(step)):
        os.kill(os.getpid(), signal.SIGKILL)


def fail_rank(rank: int, step: int) -> None:
    """Die like `kill -9` (kill_rank) or hang like `kill -STOP` (stop_rank) as (1-based) optimizer
    step `step` begins, when this rank is the one asked for."""
    kind, steps = _fault()
    if kind in ("kill_rank", "stop_rank") and steps == f"{rank}:{step}":
        os.kill(os.getpid(), signal.SIGKILL if kind == "kill_rank" else signal.SIGSTOP)


def nan_loss(step: int) -> bool:
    """Whether rank 0's loss of (1-based) optimizer step `step` is to be made NaN."""
    kind, steps = _fault()
    if kind == "nan_loss":
        return str(step) in steps.split(":")
    if kind == "nan_loss_from":
        return step >= int(steps)
    return False
