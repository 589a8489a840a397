"""`lvd submit {train,shard,sample}`: the Slurm jobs of slurm/*.sbatch, submitted through submitit.

    lvd submit train --nodes 2 --gpus-per-node 8 --partition gpu --time 1440 -- --config x.yaml run.dir=/shared/x
    lvd submit shard --tasks 16 --time 120 -- videos --input /data/list.jsonl --out /shared/shards/x
    lvd submit sample --nodes 1 --gpus-per-node 4 --time 60 -- --model /shared/x/export --strategy vidrd ...

Same launch logic as the templates: the job script sources slurm/launch.sh (so slurm/env.sh, the
one file of cluster settings, whose values are also this command's defaults) and exports the
rendezvous with `lvd_rendezvous`; srun starts one task per GPU (per node on CPU nodes), and
each task runs the subcommand as one rank. The subcommand's arguments travel pickled to the
job as a list: they never pass through a shell.

Preemption and time limits: submitit sends USR2 `signal_lead_s` before the limit (or it comes
from `scancel --signal=USR2 <job>`). Rank 0 then asks its rank process to checkpoint (USR1),
which makes every rank checkpoint at the same step and exit with the preempted code, and
submitit requeues the job; the rerun resumes from the run folder.
"""

from __future__ import annotations

import argparse
import functools
import os
import shlex
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import field_default
from common.launch import PREEMPTED_EXIT_CODE

REPO = Path(__file__).resolve().parent.parent
ENV_SH = REPO / "slurm" / "env.sh"
REQUEUE_GRACE_S = 300
"""How long a preempted rank waits for the requeue (which stops it) before it reports an error."""


@dataclass(frozen=True, kw_only=True)
class SubmitOptions:
    """One `lvd submit` call."""

    command: str
    """The lvd subcommand to run in the job: train, shard or sample."""
    args: tuple[str, ...]
    """The subcommand's own arguments, as a list (never joined into a shell string)."""
    nodes: int = 1
    """Nodes of the job (train, sample)."""
    gpus_per_node: int = 0
    """GPUs per node; one rank per GPU, or one rank per node when 0 (CPU nodes, gloo)."""
    partition: str = ""
    """Slurm partition ('' = the cluster's default)."""
    account: str = ""
    """Slurm account ('' = the user's default)."""
    time_min: int = 60
    """Time limit per run of the job in minutes (a requeued job gets it again)."""
    cpus_per_task: int = 1
    """CPU cores per rank."""
    tasks: int = 2
    """shard: array tasks, each shards one slice of the input list."""
    signal_lead_s: int = 120
    """Seconds before the time limit at which the job is told to checkpoint (USR2)."""
    logs: str = "slurm-logs/%j"
    """submitit's folder for job scripts, pickles and logs (%j = job id); on a shared filesystem."""
    python: str = sys.executable
    """Python of the lvd virtualenv on the compute nodes."""
    dry_run: bool = False
    """Print the sbatch script instead of submitting it."""


def read_cluster_env(env_sh: Path = ENV_SH) -> dict[str, str]:
    """The variables slurm/env.sh exports, read by sourcing it in bash (the file stays the one source)."""
    script = 'source "$1" >/dev/null && env -0'
    result = subprocess.run(["bash", "-c", script, "lvd-env", str(env_sh)], capture_output=True, check=True)
    pairs = (item.split("=", 1) for item in result.stdout.decode().split("\0") if "=" in item)
    return dict(pairs)


def parse_minutes(text: str) -> int:
    """Minutes (seconds rounded up) from a Slurm time: M, M:S, H:M:S, D-H, D-H:M or D-H:M:S."""
    days, dash, clock = text.rpartition("-")
    try:
        parts = [int(part) for part in clock.split(":")]
        day_count = int(days) if dash else 0
    except ValueError:
        raise argparse.ArgumentTypeError(f"--time {text!r}: expected M, M:S, H:M:S or D-H[:M[:S]]") from None
    if len(parts) > 3 or min(parts + [day_count]) < 0:
        raise argparse.ArgumentTypeError(f"--time {text!r}: expected M, M:S, H:M:S or D-H[:M[:S]]")
    if dash:  # D-H, D-H:M, D-H:M:S
        hours, minutes, seconds = (parts + [0, 0])[:3]
    else:  # M, M:S, H:M:S
        hours, minutes, seconds = ([0] + parts + [0])[:3] if len(parts) < 3 else parts
    return (day_count * 24 + hours) * 60 + minutes + (seconds > 0)


def _ranks_per_node(gpus_per_node: int) -> int:
    return max(gpus_per_node, 1)


def with_sequence_parallel(command: str, args: tuple[str, ...], sp: int, ring: int, ranks_per_node: int) -> tuple[str, ...]:
    """The subcommand's arguments with the sequence-parallel degree `sp` (ring degree `ring`) added:
    `train.sp_size=` / `train.sp_ring=` overrides for train, `--sp` / `--sp-ring` for sample.

    The layout: an SP group is `sp` consecutive ranks and Slurm numbers the ranks node by node, so
    `sp` must divide the ranks of a node (the all-to-alls stay on the intra-node links; data
    parallelism spans the nodes). Raises ValueError naming the value that does not fit, or an
    SP setting already among `args` that differs."""
    if sp == 1 and ring == 1:
        return args
    if command not in ("train", "sample"):
        raise ValueError(f"--sp: only for train and sample, not {command}")
    if sp < 1 or ranks_per_node % sp:
        raise ValueError(
            f"--sp {sp}: must divide the {ranks_per_node} rank(s) of a node (an SP group stays inside a node; "
            "data parallelism spans the nodes)"
        )
    if ring < 1 or sp % ring:
        raise ValueError(f"--sp-ring {ring}: must divide --sp {sp}")
    if command == "train":
        wanted = {"train.sp_size": str(sp), "train.sp_ring": str(ring)}
        given = dict(arg.partition("=")[::2] for arg in args if "=" in arg)
        for key, value in wanted.items():
            if key in given and given[key] != value:
                raise ValueError(f"--sp {sp} --sp-ring {ring}: the train arguments already set {key}={given[key]}")
        return (*args, *(f"{key}={value}" for key, value in wanted.items() if key not in given))
    flags = {"--sp": str(sp), "--sp-ring": str(ring)}
    for flag, value in flags.items():
        if flag in args:
            given = args[args.index(flag) + 1] if args.index(flag) + 1 < len(args) else ""
            if given != value:
                raise ValueError(f"--sp {sp} --sp-ring {ring}: the sample arguments already give {flag} {given}")
    return (*args, *(x for flag, value in flags.items() if flag not in args for x in (flag, value)))


def _rank_banner() -> str:
    env = os.environ
    return f"lvd: rank {env.get('SLURM_PROCID', '0')} of {env.get('SLURM_NTASKS', '1')} on {env.get('SLURMD_NODENAME', '?')}"


def _ignore_usr2() -> None:
    # Runs in the rank process before exec: USR2 is submitit's, the rank checkpoints on USR1.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


class RankJob:
    """One rank of `lvd train` / `lvd sample` inside a submitit task.

    The rank runs as a child process (`python -m lvd <command> <args>`) that reads its rank from
    srun's variables. A watcher thread waits for it, so submitit's USR2 handler (which calls
    `checkpoint` in the main thread) can forward USR1 and wait without touching Popen's lock.
    """

    def __init__(self, command: str, args: tuple[str, ...], python: str) -> None:
        self.command, self.args, self.python = command, args, python
        self._child: subprocess.Popen[bytes] | None = None
        self._exited = threading.Event()

    def __getstate__(self) -> dict[str, Any]:
        return {"command": self.command, "args": self.args, "python": self.python}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["command"], state["args"], state["python"])

    def __call__(self) -> int:
        print(_rank_banner(), flush=True)
        self._child = subprocess.Popen(
            [self.python, "-m", "lvd", self.command, *self.args], preexec_fn=_ignore_usr2
        )
        threading.Thread(target=self._watch, daemon=True).start()
        while not self._exited.wait(1.0):
            pass
        code = self._child.returncode
        if code == PREEMPTED_EXIT_CODE:
            self._await_requeue()
        if code != 0:
            raise RuntimeError(f"lvd {self.command} exited with code {code}")
        return code

    def _watch(self) -> None:
        assert self._child is not None
        self._child.wait()
        self._exited.set()

    def _await_requeue(self) -> None:
        """A preempted rank checkpointed; rank 0 requeues the job, which stops every task."""
        if os.environ.get("SLURM_PROCID", "0") == "0":
            print(
                f"lvd: rank checkpointed and stopped: requeueing job {os.environ['SLURM_JOB_ID']}", flush=True
            )
            subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], check=True)
        threading.Event().wait(REQUEUE_GRACE_S)

    def checkpoint(self) -> Any:
        """submitit's hook on USR2 (rank 0 only): make the ranks checkpoint, then requeue as is."""
        from submitit.helpers import DelayedSubmission

        if self._child is not None and not self._exited.is_set():
            print("lvd: USR2: asking the ranks to checkpoint", flush=True)
            self._child.send_signal(signal.SIGUSR1)
            self._exited.wait()
        return DelayedSubmission(RankJob(self.command, self.args, self.python))


class ShardTask:
    """Array task `task` of `tasks`: shard one slice of the input (slurm.shard_merge)."""

    def __init__(self, args: tuple[str, ...], task: int, tasks: int) -> None:
        self.args, self.task, self.tasks = args, task, tasks

    def __call__(self) -> int:
        from slurm.shard_merge import run_task

        code = run_task(list(self.args), self.task, self.tasks)
        if code != 0:
            raise RuntimeError(f"lvd shard task {self.task} exited with code {code}")
        return code


class ShardMerge:
    """The job after the array: merge the parts into one manifest (slurm.shard_merge)."""

    def __init__(self, args: tuple[str, ...], tasks: int) -> None:
        self.args, self.tasks = args, tasks

    def __call__(self) -> int:
        from slurm.shard_merge import merge

        code = merge(list(self.args), self.tasks)
        if code != 0:
            raise RuntimeError(f"lvd shard merge exited with code {code}")
        return code


def _executor(
    options: SubmitOptions, *, name: str, nodes: int, ranks_per_node: int, gpus_per_node: int
) -> Any:
    import submitit

    executor = submitit.AutoExecutor(
        folder=options.logs, cluster="slurm", slurm_python=shlex.quote(options.python)
    )
    params: dict[str, Any] = {
        "slurm_job_name": name,
        "nodes": nodes,
        "tasks_per_node": ranks_per_node,
        "cpus_per_task": options.cpus_per_task,
        "timeout_min": options.time_min,
        "slurm_signal_delay_s": options.signal_lead_s,
        "slurm_setup": [f"source {shlex.quote(str(REPO / 'slurm' / 'launch.sh'))}", "lvd_rendezvous"],
        "slurm_additional_parameters": {"requeue": True},
    }
    if gpus_per_node:
        params["gpus_per_node"] = gpus_per_node
    if options.partition:
        params["slurm_partition"] = options.partition
    if options.account:
        params["slurm_account"] = options.account
    executor.update_parameters(**params)
    return executor


def _script(executor: Any, *, array: int | None = None) -> str:
    """The sbatch script submitit would write for this executor (and an array of `array` tasks)."""
    from submitit.slurm.slurm import _make_sbatch_string

    slurm = executor._executor
    extra = {} if array is None else {"map_count": array}
    return _make_sbatch_string(
        command=slurm._submitit_command_str, folder=slurm.folder, **slurm.parameters, **extra
    )


def _report(job: Any, what: str) -> None:
    print(f"submitted {what}: job {job.job_id}")
    print(f"  stdout: {job.paths.stdout}")
    print(f"  stderr: {job.paths.stderr}")


def submit_ranks(options: SubmitOptions) -> int:
    """train / sample: nodes x ranks-per-node submitit tasks, each running one rank."""
    ranks = _ranks_per_node(options.gpus_per_node)
    executor = _executor(
        options,
        name=f"lvd-{options.command}",
        nodes=options.nodes,
        ranks_per_node=ranks,
        gpus_per_node=options.gpus_per_node,
    )
    if options.dry_run:
        print(_script(executor))
        return 0
    job = executor.submit(RankJob(options.command, options.args, options.python))
    _report(job, f"lvd {options.command} on {options.nodes} nodes x {ranks} ranks")
    return 0


def submit_shard(options: SubmitOptions) -> int:
    """shard: an array of `tasks` one-task jobs, then a merge job that runs after all succeeded."""
    executor = _executor(options, name="lvd-shard", nodes=1, ranks_per_node=1, gpus_per_node=0)
    if options.dry_run:
        print(_script(executor, array=options.tasks))
        return 0
    tasks = [ShardTask(options.args, task, options.tasks) for task in range(options.tasks)]
    jobs = executor.submit_array(tasks)
    array_id = jobs[0].job_id.split("_")[0]
    for job in jobs:
        _report(job, f"lvd shard task {job.job_id}")
    executor.update_parameters(slurm_job_name="lvd-shard-merge", slurm_dependency=f"afterok:{array_id}")
    merge_job = executor.submit(ShardMerge(options.args, options.tasks))
    _report(merge_job, f"lvd shard merge (after array {array_id})")
    return 0


def build_parser(defaults: dict[str, str]) -> argparse.ArgumentParser:
    """`lvd submit`'s parser: slurm/env.sh's values (`defaults`) where it sets them, else the
    defaults of SubmitOptions."""
    default = functools.partial(field_default, SubmitOptions)
    parser = argparse.ArgumentParser(
        prog="lvd submit",
        description="Submit lvd train / shard / sample to Slurm through submitit (defaults from slurm/env.sh).",
        epilog="example: lvd submit train --nodes 2 --gpus-per-node 8 --partition gpu --time 1440 -- --config configs/x.yaml run.dir=/shared/x",
    )
    add = parser.add_argument
    add("command", choices=("train", "shard", "sample"), help="the lvd subcommand to run in the job")
    add("--nodes", type=int, default=default("nodes"), help="nodes (train, sample)")
    add(
        "--gpus-per-node",
        type=int,
        default=int(defaults.get("LVD_GPUS_PER_NODE", default("gpus_per_node"))),
        help="one rank per GPU; 0 = one rank per node (CPU)",
    )
    add(
        "--partition",
        default=defaults.get("LVD_PARTITION", default("partition")),
        help="Slurm partition (env.sh: LVD_PARTITION)",
    )
    add(
        "--account",
        default=defaults.get("LVD_ACCOUNT", default("account")),
        help="Slurm account (env.sh: LVD_ACCOUNT)",
    )
    add(
        "--time",
        type=parse_minutes,
        default=default("time_min"),
        help="time limit per run: minutes, h:m:s or d-h:m:s",
    )
    add(
        "--cpus-per-task",
        type=int,
        default=int(defaults.get("LVD_CPUS_PER_TASK", default("cpus_per_task"))),
        help="CPU cores per rank",
    )
    add("--tasks", type=int, default=default("tasks"), help="shard: array tasks (input slices)")
    add(
        "--sp",
        type=int,
        default=1,
        help="train, sample: sequence-parallel degree; must divide the ranks of a node (SP inside a node, "
        "data parallel across nodes); passed on as train.sp_size=N / --sp N",
    )
    add("--sp-ring", type=int, default=1, help="train, sample: ring degree inside --sp (train.sp_ring / --sp-ring)")
    add(
        "--signal-lead",
        type=int,
        default=int(defaults.get("LVD_SIGNAL_LEAD_S", default("signal_lead_s"))),
        help="seconds of warning before the time limit",
    )
    add(
        "--logs",
        default=default("logs"),
        help="folder for job scripts and logs, on a shared filesystem (%%j = job id)",
    )
    add("--dry-run", action="store_true", help="print the sbatch script instead of submitting it")
    parser.usage = "lvd submit {train,shard,sample} [options] -- <the subcommand's own arguments>"
    return parser


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(lvd submit's arguments, the subcommand's arguments after the first `--`)."""
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1 :]


def main(argv: list[str]) -> int:
    defaults = read_cluster_env()
    own, sub_args = split_argv(argv)
    args = build_parser(defaults).parse_args(own)
    for name in ("nodes", "tasks", "cpus_per_task", "time"):
        if getattr(args, name) < 1:
            print(f"lvd submit: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    try:
        sub_args = list(
            with_sequence_parallel(args.command, tuple(sub_args), args.sp, args.sp_ring, _ranks_per_node(args.gpus_per_node))
        )
    except ValueError as err:
        print(f"lvd submit: {err}", file=sys.stderr)
        return 2
    options = SubmitOptions(
        command=args.command,
        args=tuple(sub_args),
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        partition=args.partition,
        account=args.account,
        time_min=args.time,
        cpus_per_task=args.cpus_per_task,
        tasks=args.tasks,
        signal_lead_s=args.signal_lead,
        logs=args.logs,
        python=defaults.get("LVD_PYTHON", field_default(SubmitOptions, "python")),
        dry_run=args.dry_run,
    )
    return submit_shard(options) if options.command == "shard" else submit_ranks(options)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
