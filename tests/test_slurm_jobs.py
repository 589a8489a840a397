"""slurm/*.sbatch and `lvd submit` against the real local Slurm (slurm/local/up.sh): 2-node ZeRO-2
training over gloo, preemption -> checkpoint -> requeue -> exact resume (sbatch and submitit),
and array sharding equal to the single-process sharder. Plus fast checks of the helpers."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from slurm.shard_merge import MERGE_TASKS_ENV, array_position, slice_bounds, write_slice
from slurm.submit import parse_minutes, split_argv
from trainer.monitor import read_metrics

REPO = Path(__file__).resolve().parents[1]
STEPS = 4
TRAIN_ARGS = [
    "--config",
    str(REPO / "configs/tiny/unet3d.yaml"),
    "data.height=32",
    "data.width=32",
    "train.micro_batch_size=1",
    "train.warmup_steps=2",
    f"train.steps={STEPS}",
    "train.checkpoint_every=2",
    "run.log_every=1",
    "train.zero_stage=2",
]
SHARD_ARGS = ["--clip-frames", "8", "--size", "32", "--shard-size-mb", "0.03"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


def _run(cmd: list[str], *, cwd: Path = REPO, timeout: float = 120) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{cmd}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def _job(job_id: str) -> dict[str, str]:
    line = _run(["scontrol", "show", "job", "-o", job_id]).strip()
    return dict(item.split("=", 1) for item in line.split() if "=" in item)


def _wait(condition, *, timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
            pytest.fail(f"timed out after {timeout} s waiting for {what}\n{tail}")
        time.sleep(0.2)


def _wait_done(job_id: str, log: Path, timeout: float = 400) -> dict[str, str]:
    _wait(
        lambda: _job(job_id)["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"),
        timeout=timeout,
        what=f"job {job_id}",
        log=log,
    )
    fields = _job(job_id)
    assert fields["JobState"] == "COMPLETED", log.read_text()[-4000:]
    return fields


def _losses(run_dir: Path) -> dict[int, float]:
    return {step: record["loss"] for step, record in read_metrics(run_dir).items()}


def _sbatch_two_nodes(script: str, log: Path, args: list[str]) -> str:
    """Job id of `script` submitted on 2 nodes, one rank each, logging to `log`."""
    cmd = ["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", f"--output={log}", script]
    return _run(cmd + args).strip()


def _sbatch_train(run_dir: Path, log: Path, shards: str) -> str:
    return _sbatch_two_nodes(
        "slurm/train.sbatch", log, [*TRAIN_ARGS, f"data.shards={shards}", f"run.dir={run_dir}"]
    )


def _submit(command: str, *args: str, cwd: Path = REPO) -> str:
    return _run([sys.executable, "-m", "slurm.submit", command, *args], cwd=cwd)


@pytest.fixture(scope="module")
def cluster() -> None:
    _run([str(REPO / "slurm/local/up.sh")], timeout=300)


Job = tuple[str, Path, Path]
"""(job id, run dir, rank-0 log)."""


def _reference_losses(jobs: dict[str, Job]) -> dict[int, float]:
    job_id, run_dir, log = jobs["reference"]
    _wait_done(job_id, log)
    return _losses(run_dir)


def _preempt_and_resume(job: Job, signal_cmd: list[str]) -> tuple[int, str]:
    """Signal the job right after its first step, wait for the requeued run to complete; return
    (the step it resumed from, its log)."""
    job_id, run_dir, log = job
    _wait(lambda: 1 in read_metrics(run_dir), timeout=300, what=f"step 1 of job {job_id}", log=log)
    _run([*signal_cmd, job_id])
    _wait(lambda: _job(job_id)["Restarts"] == "1", timeout=120, what=f"the requeue of job {job_id}", log=log)
    fields = _wait_done(job_id, log)
    assert fields["Restarts"] == "1"
    text = log.read_text()
    assert "resumed from" in text, text[-3000:]
    return int(text.split("resumed from", 1)[1].split("at step", 1)[1].split()[0]), text


@pytest.fixture(scope="module")
def train_jobs(
    cluster: None, video_shards: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[dict[str, Job], dict[str, Future]]]:
    """Three 2-node jobs submitted at once (Slurm queues what does not fit): an uninterrupted
    sbatch run, an sbatch run preempted with USR1 and an `lvd submit` run preempted with USR2.
    Watcher threads send each signal right after the job's first step, whenever it starts."""
    root = tmp_path_factory.mktemp("slurm_train")
    jobs = {}
    for name in ("reference", "sbatch"):
        run_dir, log = root / name, root / f"{name}.out"
        jobs[name] = (_sbatch_train(run_dir, log, video_shards), run_dir, log)
    run_dir = root / "submitit"
    out = _submit(
        "train",
        "--nodes",
        "2",
        "--gpus-per-node",
        "0",
        "--partition",
        "debug",
        "--time",
        "10",
        "--logs",
        f"{root}/logs/%j",
        "--",
        *TRAIN_ARGS,
        f"data.shards={video_shards}",
        f"run.dir={run_dir}",
    )
    job_id = out.split("job ", 1)[1].split()[0]
    assert f"{root}/logs/{job_id}/{job_id}_0_log.out" in out
    jobs["submitit"] = (job_id, run_dir, root / "logs" / job_id / f"{job_id}_0_log.out")
    with ThreadPoolExecutor(2) as pool:
        preempted = {
            "sbatch": pool.submit(
                _preempt_and_resume, jobs["sbatch"], ["scancel", "--signal=USR1", "--batch"]
            ),
            "submitit": pool.submit(_preempt_and_resume, jobs["submitit"], ["scancel", "--signal=USR2"]),
        }
        try:
            yield jobs, preempted
        finally:  # a failed test leaves no job behind (the watchers then end on the cancelled state)
            subprocess.run(["scancel", *(job_id for job_id, _, _ in jobs.values())], check=False)


@pytest.mark.slurm
def test_sbatch_trains_zero2_with_one_rank_on_each_node(train_jobs) -> None:
    jobs, _ = train_jobs
    losses = _reference_losses(jobs)
    _, run_dir, log = jobs["reference"]
    text = log.read_text()
    assert "2 nodes x 1 ranks, rendezvous n1:" in text
    assert "lvd: rank 0 of 2 on n1" in text and "lvd: rank 1 of 2 on n2" in text
    assert sorted(losses) == list(range(1, STEPS + 1))
    checkpoint = run_dir / "checkpoints" / f"step_{STEPS:08d}"
    assert (checkpoint / "COMPLETE").exists()
    meta = json.loads((checkpoint / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["step"] == STEPS
    assert "zero_stage: 2" in (run_dir / "config.yaml").read_text()


@pytest.mark.slurm
def test_sbatch_usr1_checkpoints_requeues_and_resumes_exactly(train_jobs) -> None:
    jobs, preempted = train_jobs
    stopped, text = preempted["sbatch"].result()
    assert 1 <= stopped < STEPS
    assert "USR1: asking the ranks to checkpoint" in text and "requeueing job" in text
    assert "restart 0:" in text and "restart 1:" in text
    run_dir = jobs["sbatch"][1]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"
    assert _losses(run_dir) == _reference_losses(jobs)  # exact, steps 1..STEPS once each


@pytest.mark.slurm
def test_submit_train_usr2_checkpoints_requeues_and_resumes_exactly(train_jobs) -> None:
    jobs, preempted = train_jobs
    stopped, text = preempted["submitit"].result()
    assert 1 <= stopped < STEPS
    assert "lvd: rank 0 of 2 on n1" in text and "USR2: asking the ranks to checkpoint" in text
    assert "restart 1:" in text
    assert _losses(jobs["submitit"][1]) == _reference_losses(jobs)


def _samples(manifest: Path) -> dict[str, str]:
    """sample key -> hash of all its payloads, over the shards a manifest lists."""
    digests: dict[str, hashlib._Hash] = {}
    for entry in json.loads(manifest.read_text())["shards"]:
        with tarfile.open(manifest.parent / entry["path"]) as tar:
            for member in sorted(tar.getmembers(), key=lambda m: m.name):
                key, ext = member.name.split(".", 1)
                digest = digests.setdefault(key, hashlib.sha256())
                digest.update(ext.encode() + tar.extractfile(member).read())
    return {key: digest.hexdigest() for key, digest in digests.items()}


@pytest.fixture(scope="module")
def single_process_shards(media_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("single") / "shards"
    _run(
        [
            sys.executable,
            "-m",
            "data_pipeline.shard_cli",
            "videos",
            "--input",
            str(media_dir / "videos"),
            "--out",
            str(out),
            *SHARD_ARGS,
        ]
    )
    return out / "manifest.json"


def _assert_same_shards(merged: Path, single: Path) -> None:
    ours, theirs = json.loads(merged.read_text()), json.loads(single.read_text())
    assert ours["samples"] == theirs["samples"] > 0
    assert ours["params"] == theirs["params"] and ours["inputs"] == theirs["inputs"]
    assert ours["skipped"] == theirs["skipped"]
    assert _samples(merged) == _samples(single)
    assert sorted(p.name for p in merged.parent.iterdir()) == sorted(
        ["manifest.json", *(s["path"] for s in ours["shards"])]
    )


@pytest.mark.slurm
def test_sbatch_shard_array_equals_single_process(
    cluster, media_dir, single_process_shards, tmp_path
) -> None:
    out = tmp_path / "shards"
    cmd = ["sbatch", "--parsable", "--array=0-1", f"--output={tmp_path}/%x-%A_%a.out", "slurm/shard.sbatch"]
    array_id = _run(
        cmd + ["videos", "--input", str(media_dir / "videos"), "--out", str(out), *SHARD_ARGS]
    ).strip()
    _wait(
        lambda: (out / "manifest.json").exists() and not (out / "parts").exists(),
        timeout=180,
        what="the merge",
        log=tmp_path / f"lvd-shard-{array_id}_0.out",
    )
    log = (tmp_path / f"lvd-shard-{array_id}_0.out").read_text()
    assert f"runs after array {array_id}" in log
    assert len(list(tmp_path.glob("lvd-shard-merge-*.out"))) == 1  # the merge logs beside the array
    _assert_same_shards(out / "manifest.json", single_process_shards)
    assert json.loads((out / "manifest.json").read_text())["merged_from_tasks"] == 2


@pytest.mark.slurm
def test_submit_shard_array_equals_single_process(
    cluster, media_dir, single_process_shards, tmp_path
) -> None:
    out = tmp_path / "shards"
    printed = _submit(
        "shard",
        "--tasks",
        "2",
        "--partition",
        "debug",
        "--time",
        "10",
        "--logs",
        f"{tmp_path}/logs/%j",
        "--",
        "videos",
        "--input",
        str(media_dir / "videos"),
        "--out",
        str(out),
        *SHARD_ARGS,
    )
    assert printed.count("submitted lvd shard task") == 2 and "merge (after array" in printed
    _wait(
        lambda: (out / "manifest.json").exists() and not (out / "parts").exists(),
        timeout=180,
        what="the merge",
    )
    _assert_same_shards(out / "manifest.json", single_process_shards)


@pytest.fixture(scope="module")
def hierarchical_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], Path]:
    """`lvd sample` arguments for a tiny hierarchical run, and its video made by one local rank."""
    from sampler.cli import main as sample_main
    from sampler.tiny import tiny_pipeline

    root = tmp_path_factory.mktemp("sample")
    argv = [
        "--model",
        str(tiny_pipeline(root / "pred", "lvdm_prediction", seed=0)),
        "--model2",
        str(tiny_pipeline(root / "interp", "lvdm_interpolation", seed=1)),
        "--strategy",
        "lvdm-hierarchical",
        "--frames",
        "64",
        "--stride",
        "3",
        "--steps",
        "4",
        "--height",
        "32",
        "--width",
        "32",
        "--device",
        "cpu",
        "--no-progress",
        "--prompt",
        "a red bicycle",
    ]
    assert sample_main([*argv, "--out", str(root / "one" / "v.mp4")]) == 0
    return argv, root / "one" / "v.mp4"


@pytest.mark.slurm
def test_sbatch_sample_on_two_nodes_requeues_on_usr1_and_matches_one_rank(
    cluster, hierarchical_reference, tmp_path
) -> None:
    argv, reference = hierarchical_reference
    video, log = tmp_path / "v.mp4", tmp_path / "sample.out"
    job_id = _sbatch_two_nodes("slurm/sample.sbatch", log, [*argv, "--out", str(video)])
    parts = video.with_suffix(".parts")
    _wait(lambda: any(parts.glob("gap-*.safetensors")), timeout=300, what="the first gap", log=log)
    _run(["scancel", "--signal=USR1", "--batch", job_id])
    _wait(lambda: _job(job_id)["Restarts"] == "1", timeout=120, what=f"the requeue of job {job_id}", log=log)
    _wait_done(job_id, log)
    text = log.read_text()
    assert "requeueing job" in text and "rank 1 of 2" in text
    assert video.read_bytes() == reference.read_bytes()
    report = json.loads(video.with_suffix(".json").read_text())
    assert report["world_size"] == 2 and report["units_reused"] > 0  # the restart reused saved units


@pytest.mark.slurm
def test_submit_dry_run_prints_the_script_and_keeps_arguments_out_of_it(tmp_path) -> None:
    hostile = "run.dir=/tmp/x; touch /tmp/lvd-pwned"
    printed = _submit(
        "train",
        "--nodes",
        "2",
        "--partition",
        "debug",
        "--time",
        "1:30:00",
        "--dry-run",
        "--logs",
        f"{tmp_path}/%j",
        "--",
        "--config",
        "configs/tiny/unet3d.yaml",
        hostile,
    )
    assert printed.startswith("#!/bin/bash")
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --partition=debug",
        "#SBATCH --time=90",
        "#SBATCH --requeue",
        "#SBATCH --signal=USR2@120",
        "lvd_rendezvous",
    ):
        assert line in printed, line
    assert "source " + str(REPO / "slurm" / "launch.sh") in printed
    assert "touch" not in printed and "unet3d" not in printed  # arguments travel pickled, not in the script
    assert not list(tmp_path.iterdir())  # nothing submitted
    gpus = _submit(
        "train", "--nodes", "2", "--gpus-per-node", "4", "--dry-run", "--logs", f"{tmp_path}/%j", "--", "x=1"
    )
    assert "#SBATCH --gpus-per-node=4" in gpus and "#SBATCH --ntasks-per-node=4" in gpus
    sample = _submit("sample", "--nodes", "2", "--dry-run", "--logs", f"{tmp_path}/%j", "--", "--model", "x")
    assert "#SBATCH --nodes=2" in sample and "#SBATCH --requeue" in sample and "lvd_rendezvous" in sample


def test_slices_are_disjoint_and_cover_the_input() -> None:
    for count in (0, 1, 5, 62):
        for tasks in (1, 2, 3, 7):
            bounds = [slice_bounds(count, task, tasks) for task in range(tasks)]
            assert [stop - start for start, stop in bounds] and sum(
                stop - start for start, stop in bounds
            ) == count
            assert all(bounds[i][1] == bounds[i + 1][0] for i in range(tasks - 1))
            assert max(s - a for a, s in bounds) - min(s - a for a, s in bounds) <= 1
    with pytest.raises(ValueError):
        slice_bounds(4, 2, 2)


def test_list_slices_keep_source_names_and_repeats_together(tmp_path) -> None:
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    for name in ("a.mp4", "b.mp4", "sub/c.mp4"):
        (data / name).write_bytes(name.encode())
    rows = [
        {"path": "a.mp4", "caption": "A"},
        {"path": "sub/c.mp4", "caption": "C"},
        {"path": "a.mp4", "caption": "again"},
        {"path": str(data / "b.mp4"), "caption": "B"},
    ]
    listing = data / "list.jsonl"
    listing.write_text("".join(json.dumps(row) + "\n" for row in rows))
    slices = [write_slice(str(listing), task, 2, tmp_path / f"task{task}") for task in range(2)]
    got = [[json.loads(line) for line in path.read_text().splitlines()] for path in slices]
    # 3 distinct inputs: task 0 gets a.mp4 (with its repeat, which the sharder then skips), task 1 the rest.
    assert got == [[rows[0], rows[2]], [rows[1], rows[3]]]
    assert (
        slices[1].parent / "sub" / "c.mp4"
    ).read_bytes() == b"sub/c.mp4"  # relative paths resolve as before
    assert not (slices[1].parent / "a.mp4").exists()
    listing.write_text(json.dumps({"path": "../outside.mp4", "caption": "x"}) + "\n")
    with pytest.raises(ValueError, match="absolute path"):
        write_slice(str(listing), 0, 1, tmp_path / "bad")


def test_folder_slices_link_files_and_captions(tmp_path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for stem in ("a", "b", "c"):
        (data / f"{stem}.mp4").write_bytes(stem.encode())
        (data / f"{stem}.txt").write_text(f"caption {stem}")
    second = write_slice(str(data), 1, 2, tmp_path / "task1")
    assert sorted(p.name for p in second.iterdir()) == ["b.mp4", "b.txt", "c.mp4", "c.txt"]
    assert (second / "c.txt").read_text() == "caption c"


def test_array_position_and_cli_helpers() -> None:
    env = {
        "SLURM_ARRAY_TASK_ID": "5",
        "SLURM_ARRAY_TASK_MIN": "4",
        "SLURM_ARRAY_TASK_MAX": "7",
        "SLURM_ARRAY_TASK_COUNT": "4",
    }
    assert array_position(env) == (1, 4)
    with pytest.raises(ValueError, match="contiguous"):
        array_position({**env, "SLURM_ARRAY_TASK_COUNT": "2"})
    with pytest.raises(ValueError, match="array"):
        array_position({MERGE_TASKS_ENV: "2"})
    assert [parse_minutes(text) for text in ("90", "1:30:00", "2:05", "1-00:00:00", "1-2", "0:00:30")] == [
        90,
        90,
        3,
        1440,
        1560,
        1,
    ]
    assert split_argv(["train", "--nodes", "2", "--", "--nodes", "x=1"]) == (
        ["train", "--nodes", "2"],
        ["--nodes", "x=1"],
    )
    assert split_argv(["train"]) == (["train"], [])


def test_submit_sp_goes_to_the_subcommand_and_stays_inside_a_node(tmp_path, capsys) -> None:
    """`lvd submit --sp N [--sp-ring R]`: train gets train.sp_size / train.sp_ring overrides, sample
    gets --sp / --sp-ring; N must divide the ranks of a node (SP inside a node, data parallel across
    nodes); a differing SP setting among the subcommand's own arguments is named, not overridden."""
    from slurm.submit import main, with_sequence_parallel

    config = ("--config", "configs/tiny/video_dit.yaml")
    assert with_sequence_parallel("train", config, 1, 1, 8) == config
    assert with_sequence_parallel("train", config, 4, 2, 8) == (*config, "train.sp_size=4", "train.sp_ring=2")
    assert with_sequence_parallel("train", (*config, "train.sp_size=4"), 4, 1, 8) == (*config, "train.sp_size=4", "train.sp_ring=1")
    assert with_sequence_parallel("sample", ("--model", "m"), 2, 1, 4) == ("--model", "m", "--sp", "2", "--sp-ring", "1")
    cases = [
        (("train", config, 3, 1, 8), "--sp 3: must divide the 8 rank(s) of a node"),
        (("train", config, 2, 1, 1), "--sp 2: must divide the 1 rank(s) of a node"),
        (("train", config, 4, 3, 8), "--sp-ring 3: must divide --sp 4"),
        (("train", (*config, "train.sp_size=2"), 4, 1, 8), "already set train.sp_size=2"),
        (("sample", ("--sp", "2"), 4, 1, 8), "already give --sp 2"),
        (("shard", (), 2, 1, 8), "only for train and sample"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            with_sequence_parallel(*call)
    code = main(["train", "--nodes", "2", "--gpus-per-node", "8", "--sp", "3", "--dry-run", "--logs", f"{tmp_path}/%j", "--", *config])
    assert code == 2 and "lvd submit: --sp 3: must divide the 8 rank(s) of a node" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
