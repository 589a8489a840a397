"""Launch N local ranks of a Python module, like `torchrun --standalone`, without its 10 s start-up.

Each child gets RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT and
OMP_NUM_THREADS=1. If one rank fails the others are stopped (SIGTERM, SIGKILL after 10 s) and the
launcher names the rank that failed, so a crash never leaves a rank waiting in a collective.
SIGTERM/SIGUSR1 sent to the launcher are forwarded to every rank.
"""

from __future__ import annotations

import datetime
import math
import os
import signal
import socket
import subprocess
import sys
import time

PREEMPTED_EXIT_CODE = 75
"""Exit code of a run that stopped on a signal after a complete checkpoint (EX_TEMPFAIL): the
job that ran it requeues it (slurm/launch.sh spells the same number for the sbatch scripts)."""


COLLECTIVE_TIMEOUT_ENV = "LVD_COLLECTIVE_TIMEOUT"


def collective_timeout(default: datetime.timedelta) -> datetime.timedelta:
    """How long a rank waits in a collective for a peer that neither answers nor exits (a hung
    rank, a lost node) before it fails: `LVD_COLLECTIVE_TIMEOUT` seconds when set, else `default`.
    A peer that exits is noticed by the launcher (and by gloo's closed connection) at once."""
    value = os.environ.get(COLLECTIVE_TIMEOUT_ENV, "")
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not (math.isfinite(seconds) and seconds >= 0.001):
        raise ValueError(f"{COLLECTIVE_TIMEOUT_ENV}: must be a positive number of seconds, got {value!r}")
    return datetime.timedelta(seconds=seconds)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_env(rank: int, nproc: int, port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(nproc),
        LOCAL_WORLD_SIZE=str(nproc),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def launch_local(python_args: list[str], *, nproc: int) -> int:
    """Run `python <python_args>` as `nproc` ranks; return the first non-zero exit code, else 0."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, *python_args], env=rank_env(rank, nproc, port)) for rank in range(nproc)]

    def forward(signum: int, _frame: object) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        return _wait_all(procs)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait_all(procs: list[subprocess.Popen[bytes]]) -> int:
    code = 0
    # Poll every rank each time (a generator inside any() would stop at the first live one, and
    # a later rank's death would go unnoticed while rank 0 waits for it).
    while None in [proc.poll() for proc in procs]:
        if code == 0 and (code := _report_failures(procs)):
            _stop(procs)
        time.sleep(0.1)
    if code == 0:  # every rank ended between two polls
        code = _report_failures(procs)
    return code if code >= 0 else 128 - code


def _report_failures(procs: list[subprocess.Popen[bytes]]) -> int:
    """Name the ranks that have failed so far on stderr; the first one's exit code (0: none failed)."""
    failed = [(rank, proc.returncode) for rank, proc in enumerate(procs) if proc.returncode not in (None, 0)]
    if not failed:
        return 0
    running = [str(rank) for rank, proc in enumerate(procs) if proc.returncode is None]
    ranks = ", ".join(f"rank {rank} of {len(procs)} {_describe(code)}" for rank, code in failed)
    stopping = f"; stopping rank(s) {', '.join(running)}" if running else ""
    print(f"lvd: {ranks}{stopping}", file=sys.stderr, flush=True)
    return failed[0][1]


def _describe(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + 10
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
