"""The local Slurm cluster from slurm/local/up.sh: real slurmctld + 2 slurmd on loopback."""

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

LOCAL_DIR = Path(__file__).resolve().parents[1] / "slurm" / "local"

REQUEUE_SCRIPT = """#!/bin/bash
#SBATCH --requeue
#SBATCH --nodes=1 --ntasks=1
echo "start restart=${SLURM_RESTART_COUNT:-0}" >>"$REQUEUE_LOG"
if [ "${SLURM_RESTART_COUNT:-0}" -ge 1 ]; then
  echo done >>"$REQUEUE_LOG"
  exit 0
fi
on_usr1() {
  echo usr1 >>"$REQUEUE_LOG"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
}
trap on_usr1 USR1
echo ready >>"$REQUEUE_LOG"
sleep 120 &
wait $!
echo "not interrupted" >>"$REQUEUE_LOG"
exit 1
"""


def run(cmd: list[str], *, env: dict[str, str] | None = None, timeout: float = 60) -> str:
    """Run a command, failing the test with its output when it exits non-zero."""
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if result.returncode != 0:
        pytest.fail(f"{cmd} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result.stdout


def wait_until(condition: Callable[[], bool], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def job_fields(job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (no accounting here, so no sacct)."""
    line = run(["scontrol", "show", "job", "-o", job_id]).strip()
    return dict(item.split("=", 1) for item in line.split() if "=" in item)


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """Bring the local cluster up once (a no-op when it already runs)."""
    run([str(LOCAL_DIR / "up.sh")], timeout=300)


def test_up_is_a_fast_no_op_when_the_cluster_runs(slurm_cluster: None) -> None:
    start = time.monotonic()
    output = run([str(LOCAL_DIR / "up.sh")])
    elapsed = time.monotonic() - start
    print(f"repeated up.sh: {elapsed:.2f} s")
    assert "already up" in output
    assert elapsed < 1.0
    states = run(["sinfo", "-h", "-N", "-p", "debug", "-o", "%N %t"]).split("\n")
    assert sorted(line.split()[0] for line in states if line) == ["n1", "n2"]


def test_up_refuses_a_foreign_slurm_conf(tmp_path: Path) -> None:
    foreign = tmp_path / "slurm.conf"
    foreign.write_text("ClusterName=production\n")
    env = {**os.environ, "SLURM_CONF": str(foreign)}
    result = subprocess.run([str(LOCAL_DIR / "up.sh")], capture_output=True, text=True, env=env, timeout=30)
    assert result.returncode != 0
    assert "not written by this script" in result.stderr
    assert foreign.read_text() == "ClusterName=production\n"


def test_two_node_job_runs_one_task_on_each_node(slurm_cluster: None, tmp_path: Path) -> None:
    output = tmp_path / "job.out"
    task = "echo $SLURMD_NODENAME $SLURM_PROCID $SLURM_NODEID"
    start = time.monotonic()
    run(
        ["sbatch", "--wait", "-N", "2", "--ntasks-per-node=1", f"--output={output}"]
        + ["--wrap", f"srun bash -c '{task}'"]
    )
    print(f"2-node sbatch --wait: {time.monotonic() - start:.2f} s")
    rows = sorted(tuple(line.split()) for line in output.read_text().splitlines())
    assert rows == [("n1", "0", "0"), ("n2", "1", "1")]


def test_usr1_to_the_batch_script_requeues_it_and_the_rerun_completes(
    slurm_cluster: None, tmp_path: Path
) -> None:
    script = tmp_path / "requeue.sbatch"
    script.write_text(REQUEUE_SCRIPT)
    log = tmp_path / "requeue.log"
    start = time.monotonic()
    job_id = run(
        ["sbatch", "--parsable", f"--output={tmp_path}/slurm-%j.out", f"--export=ALL,REQUEUE_LOG={log}"]
        + [str(script)]
    ).strip()
    wait_until(lambda: log.exists() and "ready" in log.read_text(), timeout=30, what="the first run")
    signalled = time.monotonic()
    run(["scancel", "--signal=USR1", "--batch", job_id])
    wait_until(lambda: job_fields(job_id)["JobState"] == "COMPLETED", timeout=60, what="the rerun")
    done = time.monotonic()
    print(f"requeue job: {done - start:.2f} s total, {done - signalled:.2f} s from USR1 to completion")
    assert log.read_text().splitlines() == ["start restart=0", "ready", "usr1", "start restart=1", "done"]
    fields = job_fields(job_id)
    assert fields["Restarts"] == "1"
    assert fields["ExitCode"] == "0:0"
