"""`lvd shard` as a Slurm job array: each task shards a disjoint slice of the input list, then
one merge writes a single manifest, equal in samples to the single-process sharder's.

Sample keys and metadata come from each input's `source` name (data_pipeline.inputs), so a
slice must list its inputs under the same names as the whole input does. A slice is therefore
a folder of symlinks at the same relative paths (folder input), or the same CSV/JSONL rows in a
file beside symlinks for the relative paths (list input). Inputs are cut into contiguous
slices; a path listed twice stays in the slice of its first row, where the sharder skips it
as a repeat, as it does in one process.

Layout under `--out`: `parts/task-NNNN/` holds task N's slice (`input/`) and its shards and
manifest; the merge moves every shard to `--out/shard-NNNNNN.tar` (numbered in task order),
writes `--out/manifest.json` and removes `parts/`. Every step is safe to re-run.

    python -m slurm.shard_merge slurm videos --input X --out Y [...]   # slurm/shard.sbatch
    python -m slurm.shard_merge task --task K --tasks N videos --input X --out Y [...]
    python -m slurm.shard_merge merge --tasks N videos --input X --out Y [...]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from common.files import atomic_write, atomic_write_json
from data_pipeline import shard_cli
from data_pipeline.inputs import CAPTION_SUFFIX, list_inputs
from data_pipeline.shard_writer import MANIFEST, score_entries, shard_scores

PARTS = "parts"
LIST_SUFFIXES = (".csv", ".jsonl")


def slice_bounds(count: int, task: int, tasks: int) -> tuple[int, int]:
    """[start, stop) of task `task`'s contiguous share of `count` items (sizes differ by <= 1)."""
    if not 0 <= task < tasks:
        raise ValueError(f"task {task} is not in 0..{tasks - 1}")
    return count * task // tasks, count * (task + 1) // tasks


def part_dir(out: Path, task: int) -> Path:
    return out / PARTS / f"task-{task:04d}"


def _link(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target.resolve())


def _relative_source(source: str) -> Path:
    path = Path(source)
    if ".." in path.parts:
        raise ValueError(
            f"input path {source!r} leaves its list's folder: list it as an absolute path to shard it as an array"
        )
    return path


def _folder_slice(folder: Path, task: int, tasks: int, dest: Path) -> Path:
    items = list_inputs(str(folder))
    start, stop = slice_bounds(len(items), task, tasks)
    for item in items[start:stop]:
        source = Path(item.source)
        _link(dest / source, folder / source)
        caption = source.with_suffix(CAPTION_SUFFIX)
        if source.suffix != CAPTION_SUFFIX and (folder / caption).is_file():
            _link(dest / caption, folder / caption)
    return dest


def _read_rows(listing: Path) -> tuple[list[str] | None, list[Any]]:
    """(CSV header or None, rows): CSV rows as dicts, JSONL rows as their original lines."""
    text = listing.read_text(encoding="utf-8")
    if listing.suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        rows = list(reader)
        return list(reader.fieldnames or []), rows
    return None, [line for line in text.splitlines() if line.strip()]


def _row_path(row: Any) -> str:
    return str((json.loads(row) if isinstance(row, str) else row).get("path") or "")


def _rows_text(header: list[str] | None, rows: list[Any]) -> str:
    if header is None:
        return "".join(f"{row}\n" for row in rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _list_slice(listing: Path, task: int, tasks: int, dest: Path) -> Path:
    header, rows = _read_rows(listing)
    first_seen: dict[str, int] = {}
    for row in rows:
        first_seen.setdefault(_row_path(row), len(first_seen))
    start, stop = slice_bounds(len(first_seen), task, tasks)
    mine = [row for row in rows if start <= first_seen[_row_path(row)] < stop]
    for row in mine:
        listed = _row_path(row)
        if listed and not Path(listed).is_absolute():
            _link(dest / _relative_source(listed), listing.parent / listed)
    sliced = dest / f"inputs{listing.suffix}"
    atomic_write(sliced, _rows_text(header, mine))
    return sliced


def write_slice(spec: str, task: int, tasks: int, dest: Path) -> Path:
    """Write task `task`'s slice of the input `spec` under `dest`; return what to pass as --input."""
    location = Path(spec)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    if location.is_dir():
        return _folder_slice(location, task, tasks, dest)
    if location.is_file() and location.suffix in LIST_SUFFIXES:
        return _list_slice(location, task, tasks, dest)
    raise ValueError(f"--input {spec}: array sharding needs a folder, a .csv or a .jsonl")


def _option(argv: list[str], name: str) -> str:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(name)
    value = getattr(parser.parse_known_args(argv)[0], name.lstrip("-").replace("-", "_"))
    if value is None:
        raise ValueError(f"the lvd shard arguments need {name}")
    return value


def _with_option(argv: list[str], name: str, value: str) -> list[str]:
    """`argv` with every `name X` / `name=X` replaced by one `name value`."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(f"{name}="):
            out.append(arg)
    return [*out, name, value]


def _finished(out: Path) -> bool:
    return (out / MANIFEST).is_file() and not (out / PARTS).exists()


def run_task(shard_argv: list[str], task: int, tasks: int) -> int:
    """Shard task `task`'s slice of the input into parts/task-NNNN (resumes a partial part)."""
    if shard_argv[:1] not in (["videos"], ["images"]):
        raise ValueError(
            "array sharding supports `videos` and `images` (latents: shard one manifest per job)"
        )
    out = Path(_option(shard_argv, "--out"))
    if _finished(out):
        print(f"lvd shard task {task}: {out / MANIFEST} is already merged")
        return 0
    part = part_dir(out, task)
    sliced = write_slice(_option(shard_argv, "--input"), task, tasks, part / "input")
    argv = _with_option(_with_option(shard_argv, "--input", str(sliced)), "--out", str(part))
    print(f"lvd shard task {task} of {tasks}: {sliced} -> {part}")
    return shard_cli.main(argv)


def _merged_params(part_manifest: dict[str, Any], input_spec: str) -> dict[str, Any]:
    params = dict(part_manifest["params"])
    params["input"] = str(Path(input_spec).resolve())
    return params


def _move_shards(out: Path, parts: list[tuple[Path, dict[str, Any]]]) -> list[dict[str, Any]]:
    shards = []
    for part, manifest in parts:
        for entry in manifest["shards"]:
            name = f"shard-{len(shards):06d}.tar"
            source = part / entry["path"]
            if source.exists():
                os.replace(source, out / name)
            elif not (out / name).exists():
                raise FileNotFoundError(f"{source} is missing and {out / name} was not moved yet")
            shards.append({**entry, "path": name})
    return shards


def merge_parts(out: Path, tasks: int, *, input_spec: str) -> dict[str, Any]:
    """Merge parts/task-0000..N-1 into out/manifest.json (shards renumbered in task order); the
    score histograms are recomputed from the merged shards' jsons."""
    if _finished(out):
        return json.loads((out / MANIFEST).read_text())
    parts = []
    for task in range(tasks):
        path = part_dir(out, task) / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: task {task} has not finished")
        parts.append((path.parent, json.loads(path.read_text())))
    shards = _move_shards(out, parts)
    manifests = [manifest for _, manifest in parts]
    merged = {
        "params": _merged_params(manifests[0], input_spec),
        "inputs": sum(m["inputs"] for m in manifests),
        "shards": shards,
        "samples": sum(entry["samples"] for entry in shards),
        "frames": sum(entry["frames"] for entry in shards),
        "skipped": [entry for m in manifests for entry in m["skipped"]],
        "warnings": [entry for m in manifests for entry in m["warnings"]],
        "merged_from_tasks": tasks,
    } | score_entries([scores for entry in shards for scores in shard_scores(out / entry["path"])])
    atomic_write_json(out / MANIFEST, merged, indent=1, sort_keys=True)
    shutil.rmtree(out / PARTS)
    return merged


def merge(shard_argv: list[str], tasks: int) -> int:
    out = Path(_option(shard_argv, "--out"))
    manifest = merge_parts(out, tasks, input_spec=_option(shard_argv, "--input"))
    print(
        f"{manifest['samples']} samples in {len(manifest['shards'])} shards from {tasks} tasks, {len(manifest['skipped'])} inputs skipped -> {out / MANIFEST}"
    )
    return 0 if manifest["samples"] else 1


def array_position(env: dict[str, str]) -> tuple[int, int]:
    """(task index, task count) of this Slurm array task; the array must be a contiguous range."""
    if "SLURM_ARRAY_TASK_ID" not in env:
        raise ValueError("not a job array task: submit with sbatch --array=0-N")
    first, last = int(env["SLURM_ARRAY_TASK_MIN"]), int(env["SLURM_ARRAY_TASK_MAX"])
    count = int(env.get("SLURM_ARRAY_TASK_COUNT", last - first + 1))
    if count != last - first + 1:
        raise ValueError(f"the array must be a contiguous range (--array={first}-{last}), got {count} tasks")
    return int(env["SLURM_ARRAY_TASK_ID"]) - first, count


SAME_AS_ARRAY = (("partition", "SLURM_JOB_PARTITION"), ("account", "SLURM_JOB_ACCOUNT"))
"""sbatch options of the merge job taken from the array task's environment."""
MERGE_TASKS_ENV = "LVD_SHARD_MERGE_TASKS"
"""Set in the merge job that the first array task submits: the number of parts to merge."""


def _log_dir(job_id: str) -> Path:
    """The folder of this job's stdout log (the merge job logs beside the array's)."""
    fields = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    stdout = next((item.split("=", 1)[1] for item in fields.split() if item.startswith("StdOut=")), "")
    return Path(stdout).parent if stdout else Path.cwd()


def submit_merge(shard_argv: list[str], env: dict[str, str], tasks: int) -> str | None:
    """Submit slurm/shard.sbatch as the merge job, after the whole array succeeded (first task
    only, once per array). Returns the job id, or None when another task submits it."""
    array_id = env["SLURM_ARRAY_JOB_ID"]
    if env["SLURM_ARRAY_TASK_ID"] != env["SLURM_ARRAY_TASK_MIN"]:
        return None
    marker = Path(_option(shard_argv, "--out")) / PARTS / f"merge-submitted-{array_id}"
    if marker.exists():
        return None
    # The merge job must not inherit this task's SLURM_ARRAY_* (and other job) variables.
    job_env = {
        key: value for key, value in env.items() if not key.startswith("SLURM_") or key == "SLURM_CONF"
    }
    job_env[MERGE_TASKS_ENV] = str(tasks)
    script = Path(env["LVD_ROOT"]) / "slurm" / "shard.sbatch"
    command = ["sbatch", "--parsable", f"--dependency=afterok:{array_id}", "--kill-on-invalid-dep=yes"]
    command += ["--job-name=lvd-shard-merge", f"--output={_log_dir(env['SLURM_JOB_ID'])}/%x-%j.out"]
    # Same partition and account as the array, also when they were given on sbatch's command line.
    command += [f"--{option}={env[var]}" for option, var in SAME_AS_ARRAY if env.get(var)]
    command += [str(script), *shard_argv]
    result = subprocess.run(command, env=job_env, capture_output=True, text=True)
    if result.returncode != 0:
        raise ValueError(f"sbatch of the merge job failed: {result.stderr.strip()}")
    job_id = result.stdout.strip()
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(job_id + "\n")
    print(f"lvd shard: merge job {job_id} runs after array {array_id}")
    return job_id


def slurm_step(shard_argv: list[str], env: dict[str, str]) -> int:
    """What slurm/shard.sbatch runs: the merge job, or one array task (the first also submits the merge)."""
    if MERGE_TASKS_ENV in env:
        return merge(shard_argv, int(env[MERGE_TASKS_ENV]))
    task, tasks = array_position(env)
    submit_merge(shard_argv, env, tasks)
    return run_task(shard_argv, task, tasks)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m slurm.shard_merge", description=__doc__.splitlines()[0], allow_abbrev=False
    )
    steps = parser.add_subparsers(dest="step", required=True)
    steps.add_parser(
        "slurm", help="in slurm/shard.sbatch: an array task (SLURM_ARRAY_TASK_*) or the merge job"
    )
    task = steps.add_parser("task", help="one slice", allow_abbrev=False)
    task.add_argument("--task", type=int, required=True)
    task.add_argument("--tasks", type=int, required=True)
    merged = steps.add_parser("merge", help="merge the parts of N tasks", allow_abbrev=False)
    merged.add_argument("--tasks", type=int, required=True)
    return parser


def main(argv: list[str]) -> int:
    args, shard_argv = _parser().parse_known_args(argv)
    try:
        if args.step == "merge":
            return merge(shard_argv, args.tasks)
        if args.step == "slurm":
            return slurm_step(shard_argv, dict(os.environ))
        return run_task(shard_argv, args.task, args.tasks)
    except (ValueError, FileNotFoundError) as error:
        print(f"lvd shard array: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
