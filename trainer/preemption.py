"""SIGUSR1 / SIGTERM: finish the current step, checkpoint, exit with `common.launch.PREEMPTED_EXIT_CODE`.

Slurm sends `--signal=B:USR1@<s>` before the time limit (slurm/train.sbatch forwards it to the
ranks), and SIGTERM on preemption. The flag is only read between steps, and all ranks agree on
it with one all-reduce, so every rank checkpoints at the same step.
"""

from __future__ import annotations

import signal


class PreemptionFlag:
    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> PreemptionFlag:
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: object) -> None:
        self.signal = signum

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
