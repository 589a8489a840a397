"""The stage runner of `lvd demo`: numbered stages, each a real `lvd` subcommand in a subprocess
(its output to logs/, its progress lines echoed, throttled) or a small in-process step, skipped
when its output already exists."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parent.parent
PROGRESS = re.compile(r"^\s*(lvd [a-z]+: |step \d+|\[rank ?\d+\] step \d+)", re.IGNORECASE)
"""Lines of a stage's output echoed to the console (everything goes to the stage's log)."""
STEP = re.compile(r"step \d+", re.IGNORECASE)
"""Progress lines that repeat (a step count): throttled; the others (where weights came from, done)
are echoed as they come."""
ECHO_EVERY = 5.0
"""At most one step line per stage every this many seconds (the last one always)."""


class Echo:
    """Copies a stage's output into its log and echoes its progress lines, throttled."""

    def __init__(self, prefix: str, log: IO[str], quiet: bool):
        self.prefix, self.log, self.quiet = prefix, log, quiet
        self.last_time, self.pending = 0.0, ""

    def line(self, text: str) -> None:
        if self.quiet or not PROGRESS.match(text):
            return
        if not STEP.search(text):
            if self.pending:  # the last step line first, in order
                print(f"    {self.prefix}{self.pending.strip()}", flush=True)
                self.pending = ""
            print(f"    {self.prefix}{text.strip()}", flush=True)
            return
        now = time.monotonic()
        if now - self.last_time >= ECHO_EVERY:
            self.last_time, self.pending = now, ""
            print(f"    {self.prefix}{text.strip()}", flush=True)
        else:
            self.pending = text

    def pump(self, stream: IO[str]) -> None:
        """Read `stream` to its end; lines end at '\\n' or '\\r' (progress bars)."""
        buffer = ""
        while chunk := stream.read1(4096) if hasattr(stream, "read1") else stream.read(4096):
            text = chunk.decode("utf-8", "replace") if isinstance(chunk, bytes) else chunk
            self.log.write(text)
            buffer += text
            *lines, buffer = re.split(r"[\r\n]", buffer)
            for line in lines:
                self.line(line)
        self.line(buffer)
        if self.pending and not self.quiet:
            print(f"    {self.prefix}{self.pending.strip()}", flush=True)
        self.log.flush()


@dataclass(frozen=True)
class Job:
    title: str
    done: Path
    args: list[str]


class Stage:
    def __init__(self, out: Path, quiet: bool):
        self.out = out
        self.quiet = quiet
        self.log_dir = out / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.number = 0
        self.seconds: dict[str, float] = {}
        """Wall seconds of every stage that ran (not of skipped ones), by title."""
        self._open: tuple[str, float] | None = None

    def close(self) -> None:
        """End the timing of the in-process stage announced last, if any."""
        if self._open is not None:
            title, start = self._open
            self.seconds[title] = time.perf_counter() - start
            self._open = None

    def run(self, title: str, done: Path, args: list[str]) -> None:
        """Run `lvd <args>` unless `done` exists; its output goes to logs/<n>-<name>.log."""
        self.together([Job(title, done, args)])

    def together(self, jobs: list[Job]) -> None:
        """Run several `lvd` jobs at the same time (each skipped when its `done` exists)."""
        self.close()
        started = []
        for job in jobs:
            self.number += 1
            if job.done.exists():
                print(f"[{self.number}] {job.title}: already done ({job.done})", flush=True)
                continue
            print(f"[{self.number}] {job.title} ...", flush=True)
            started.append((self.number, job, self._start(self.number, job, len(jobs) > 1)))
        for number, job, (proc, thread, log, start) in started:
            proc.wait()
            thread.join()
            if proc.returncode != 0:
                tail = log.read_text(errors="replace").splitlines()[-25:]
                raise SystemExit(f"lvd demo: stage '{job.title}' failed (exit {proc.returncode}); log: {log}\n" + "\n".join(tail))
            self.seconds[job.title] = time.perf_counter() - start
            print(f"    [{number}] done in {self.seconds[job.title]:.0f} s (log: {log})", flush=True)

    def _start(self, number: int, job: Job, tagged: bool) -> tuple[subprocess.Popen[bytes], threading.Thread, Path, float]:
        log = self.log_dir / f"{number:02d}-{job.args[0]}.log"
        handle = open(log, "w")  # noqa: SIM115 (closed by the pump thread's owner at exit)
        proc = subprocess.Popen(
            [sys.executable, "-m", "lvd", *job.args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
        )
        echo = Echo(f"[{number}] " if tagged else "", handle, self.quiet)
        thread = threading.Thread(target=echo.pump, args=(proc.stdout,), daemon=True)
        thread.start()
        return proc, thread, log, time.perf_counter()

    def say(self, text: str) -> None:
        """A progress line of an in-process stage (silenced by --quiet)."""
        if not self.quiet:
            print(f"    {text}", flush=True)

    def step(self, title: str, done: Path) -> bool:
        """Number and announce an in-process stage (timed until the next stage or `close`);
        False when `done` exists (skip it)."""
        self.close()
        self.number += 1
        if done.exists():
            print(f"[{self.number}] {title}: already done ({done})", flush=True)
            return False
        print(f"[{self.number}] {title} ...", flush=True)
        self._open = (title, time.perf_counter())
        return True
