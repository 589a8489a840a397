"""Resumable, deterministic shard writing shared by `lvd shard videos|images|latents`.

Inputs ("units") are processed in parallel but consumed in input order, and samples fill shards
up to a byte budget in that order, so the shard layout is a pure function of the inputs and the
parameters. After each shard is renamed into place, a state file records the cursor (next unit,
samples of it already written) atomically. A re-run after a crash (kill -9 at any moment)
re-processes from the cursor: at worst it rewrites the last shard with identical bytes. The
manifest is written last, atomically; when it exists with the same parameters the job is done.
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from common.files import atomic_write, atomic_write_json
from data_pipeline.score_filters import score_histograms
from data_pipeline.tario import iter_samples, tar_bytes

MANIFEST = "manifest.json"
STATE = ".shard-state.json"


@dataclass(frozen=True, kw_only=True)
class UnitResult:
    """What processing one input gives: samples in a fixed order, or the reason it was skipped."""

    samples: list[tuple[str, dict[str, bytes]]] = field(default_factory=list)
    """(key, {ext: payload}) in a deterministic order."""
    skipped: str | None = None
    """Reason the input produced nothing (undecodable, too short, ...)."""
    warnings: list[str] = field(default_factory=list)
    """Problems that did not stop the input (caption missing or not UTF-8)."""
    frames: int = 0
    """Frames in all samples of this unit (manifest bookkeeping)."""


class JobMismatchError(RuntimeError):
    """The output folder holds a job with other parameters."""


def _ordered_results(
    process: Callable[[Any], UnitResult], units: list[Any], workers: int
) -> Iterator[UnitResult]:
    """process(unit) for each unit, in order; a bounded window of units runs in parallel."""
    if workers <= 1:
        yield from map(process, units)
        return
    context = multiprocessing.get_context("forkserver")
    # One preload for every forkserver child of this process (the loader's workers use it too).
    context.set_forkserver_preload(["data_pipeline.loader"])
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        window: deque[concurrent.futures.Future[UnitResult]] = deque()
        remaining = iter(units)
        for unit in remaining:
            window.append(pool.submit(process, unit))
            if len(window) >= 2 * workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def _fresh_state(params: dict[str, Any]) -> dict[str, Any]:
    return {"params": params, "next_unit": 0, "skip_samples": 0, "shards": [], "skipped": [], "warnings": []}


def _load_state(out_dir: Path, params: dict[str, Any]) -> dict[str, Any]:
    path = out_dir / STATE
    if not path.exists():
        return _fresh_state(params)
    state = json.loads(path.read_text())
    if state["params"] != params:
        raise JobMismatchError(
            f"{out_dir} holds an unfinished job with other parameters:\n  theirs {state['params']}\n"
            f"  yours  {params}\nre-run the same command to finish it, or choose another --out"
        )
    return state


def sample_scores(samples: list[tuple[str, dict[str, bytes]]]) -> list[dict[str, float]]:
    """The 'scores' of each sample's json (samples without them give none)."""
    found = []
    for _, files in samples:
        scores = json.loads(files["json"]).get("scores") if "json" in files else None
        if isinstance(scores, dict):
            found.append(scores)
    return found


def shard_scores(path: Path) -> list[dict[str, float]]:
    """The 'scores' of the samples of one written shard."""
    return sample_scores([(sample.key, sample.files) for sample in iter_samples(path)])


def sample_buckets(samples: list[tuple[str, dict[str, bytes]]]) -> list[str]:
    """The 'bucket' of each sample's json that names one (latent caches)."""
    names = (json.loads(files["json"]).get("bucket") if "json" in files else None for _, files in samples)
    return [name for name in names if isinstance(name, str)]


def score_entries(scores: list[dict[str, float]]) -> dict[str, Any]:
    """The manifest's 'scores' (names) and 'score_histograms' ({} when no clip has scores)."""
    if not scores:
        return {}
    histograms = score_histograms(scores)
    return {"scores": sorted(histograms), "score_histograms": histograms}


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    atomic_write_json(path, payload, indent=1, sort_keys=True)


@dataclass(kw_only=True)
class _OpenShard:
    samples: list[tuple[str, dict[str, bytes]]] = field(default_factory=list)
    size: int = 0
    frames: int = 0


class ShardJob:
    """One `lvd shard` job writing `shard-NNNNNN.tar` files and `manifest.json` into `out_dir`."""

    def __init__(
        self,
        out_dir: Path,
        *,
        params: dict[str, Any],
        shard_bytes: int,
        labels: list[str],
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.out_dir, self.params, self.shard_bytes, self.labels = out_dir, params, shard_bytes, labels
        self.extra = extra or {}  # further manifest entries (a latent cache's text encoder)
        self.scores: list[dict[str, float]] = []  # 'scores' of every written sample's json
        self.buckets: dict[str, int] = {}  # clips per 'bucket' named in the written samples' json
        out_dir.mkdir(parents=True, exist_ok=True)

    def finished_manifest(self) -> dict[str, Any] | None:
        path = self.out_dir / MANIFEST
        if path.exists():
            manifest = json.loads(path.read_text())
            if manifest.get("params") == self.params:
                return manifest
            raise JobMismatchError(f"{path} was written with other parameters; choose another --out")
        return None

    def run(self, units: list[Any], process: Callable[[Any], UnitResult], *, workers: int) -> dict[str, Any]:
        """Process `units` (resuming from the state file) and return the manifest."""
        done = self.finished_manifest()
        if done is not None:
            return done
        state = _load_state(self.out_dir, self.params)
        first = state["next_unit"]
        for entry in state["shards"]:  # a resumed job re-reads the scores of the shards written before
            written = [(sample.key, sample.files) for sample in iter_samples(self.out_dir / entry["path"])]
            self._count(written)
        pending: list[tuple[int, str, dict[str, str]]] = []
        shard = _OpenShard()
        bar = tqdm(total=len(units), initial=first, desc=f"shard {self.params['command']}", unit="input")
        results = _ordered_results(process, units[first:], workers)
        for number, result in enumerate(results, start=first):
            pending += self._reports(number, result)
            skip = state["skip_samples"] if number == first else 0
            per_sample_frames = result.frames // max(1, len(result.samples))
            for position in range(skip, len(result.samples)):
                key, files = result.samples[position]
                size = sum(len(payload) for payload in files.values()) + 512 * (len(files) + 1)
                if shard.samples and shard.size + size > self.shard_bytes:
                    self._close(state, shard, (number, position), pending)
                    shard = _OpenShard()
                shard.samples.append((key, files))
                shard.size += size
                shard.frames += per_sample_frames
            bar.update(1)
            bar.set_postfix(shards=len(state["shards"]), skipped=len(state["skipped"]))
        bar.close()
        if shard.samples:
            self._close(state, shard, (len(units), 0), pending)
        self._settle(state, len(units), pending)
        return self._finish(state, len(units))

    def _reports(self, number: int, result: UnitResult) -> list[tuple[int, str, dict[str, str]]]:
        label = self.labels[number]
        if result.skipped is not None:
            return [(number, "skipped", {"input": label, "reason": result.skipped})]
        return [(number, "warnings", {"input": label, "reason": reason}) for reason in result.warnings]

    def _settle(
        self, state: dict[str, Any], next_unit: int, pending: list[tuple[int, str, dict[str, str]]]
    ) -> None:
        """Move reports of units before `next_unit` into the state (a re-run recomputes the rest)."""
        for number, kind, report in pending:
            if number < next_unit:
                state[kind].append(report)
        pending[:] = [entry for entry in pending if entry[0] >= next_unit]

    def _close(
        self,
        state: dict[str, Any],
        shard: _OpenShard,
        cursor: tuple[int, int],
        pending: list[tuple[int, str, dict[str, str]]],
    ) -> None:
        name = f"shard-{len(state['shards']):06d}.tar"
        atomic_write(self.out_dir / name, tar_bytes(shard.samples))
        self._count(shard.samples)
        state["shards"].append({"path": name, "samples": len(shard.samples), "frames": shard.frames})
        state["next_unit"], state["skip_samples"] = cursor
        self._settle(state, cursor[0], pending)
        _write_json(self.out_dir / STATE, state)

    def _count(self, samples: list[tuple[str, dict[str, bytes]]]) -> None:
        """Add written samples to the scores and bucket counts of the manifest."""
        self.scores += sample_scores(samples)
        for name in sample_buckets(samples):
            self.buckets[name] = self.buckets.get(name, 0) + 1

    def _finish(self, state: dict[str, Any], inputs: int) -> dict[str, Any]:
        manifest = {
            "params": self.params,
            "inputs": inputs,
            "shards": state["shards"],
            "samples": sum(entry["samples"] for entry in state["shards"]),
            "frames": sum(entry["frames"] for entry in state["shards"]),
            "skipped": state["skipped"],
            "warnings": state["warnings"],
        } | score_entries(self.scores) | ({"buckets": dict(sorted(self.buckets.items()))} if self.buckets else {}) | self.extra
        _write_json(self.out_dir / MANIFEST, manifest)
        (self.out_dir / STATE).unlink(missing_ok=True)
        return manifest
