"""Console progress of a long stage: a tqdm bar on a terminal, plain lines otherwise.

    progress = Progress("lvd train", "step", total=1200, mode="auto", every=10)
    for ...:
        progress.update(loss=0.123)
    progress.close()

Plain lines (logs, `sbatch` output files, `lvd demo`'s stage echo) read

    lvd train: step 50/1200 loss=0.1234 | 3.21 it/s | ETA 6m05s

and come every `every` items and/or every `interval` seconds, and once more at the end. The
rate is measured over the items since the previous line, so a resumed run or a slow first step
does not skew it. Mode "quiet" prints nothing.
"""

from __future__ import annotations

import math
import sys
import time
from typing import IO, Literal

ProgressMode = Literal["auto", "bar", "lines", "quiet"]
MODES = ("auto", "bar", "lines", "quiet")


def format_duration(seconds: float) -> str:
    """3725 -> '1h02m05s', 65 -> '1m05s', 4.2 -> '4s'; '?' when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _fmt(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class Progress:
    """Counts items of one stage and shows them as `mode` says ("auto": bar on a TTY)."""

    def __init__(
        self,
        prefix: str,
        unit: str,
        *,
        total: int | None = None,
        start: int = 0,
        mode: ProgressMode = "auto",
        every: int | None = None,
        interval: float | None = None,
        stream: IO[str] | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"progress mode: must be one of {MODES}, got {mode!r}")
        self.prefix, self.unit, self.total = prefix, unit, total
        self.stream = stream if stream is not None else sys.stdout
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "lines"
        self.mode = mode
        self.every, self.interval = every, interval
        self.count = start
        self.postfix: dict[str, object] = {}
        self._mark_count, self._mark_time = start, time.perf_counter()
        self._rate = float("nan")
        self._printed = start
        self._bar = None
        if mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=start, desc=prefix, unit=unit, file=self.stream, leave=False, dynamic_ncols=True)

    def update(self, n: int = 1, **postfix: object) -> None:
        self.count += n
        if postfix:
            self.postfix = postfix
        if self.mode == "quiet":
            return
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix({k: _fmt(v) for k, v in postfix.items()}, refresh=False)
            return
        now = time.perf_counter()
        due = self.every is not None and self.count % self.every == 0
        due = due or (self.interval is not None and now - self._mark_time >= self.interval)
        if due or (self.total is not None and self.count >= self.total):
            self._line(now)

    def line(self) -> str:
        """The plain line for the current count (what lines mode prints)."""
        done = f"{self.count}/{self.total}" if self.total is not None else str(self.count)
        parts = [f"{self.prefix}: {self.unit} {done}"]
        if self.postfix:
            parts[0] += " " + " ".join(f"{k}={_fmt(v)}" for k, v in self.postfix.items())
        if math.isfinite(self._rate):
            parts.append(f"{self._rate:.3g} {self.unit}/s" if self._rate >= 1 else f"{1 / self._rate:.3g} s/{self.unit}")
            if self.total is not None:
                parts.append(f"ETA {format_duration((self.total - self.count) / self._rate) if self._rate > 0 else '?'}")
        return " | ".join(parts)

    def _line(self, now: float) -> None:
        elapsed = now - self._mark_time
        if self.count > self._mark_count and elapsed > 0:
            self._rate = (self.count - self._mark_count) / elapsed
        self._mark_count, self._mark_time = self.count, now
        print(self.line(), file=self.stream, flush=True)
        self._printed = self.count

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.mode == "lines" and self.count != self._printed:
            self._line(time.perf_counter())
