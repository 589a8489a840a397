# Launch logic shared by slurm/*.sbatch and `lvd submit` (sourced inside a job, never run).
#
# One Slurm task per rank: one per GPU on GPU nodes, one per node on CPU nodes. srun starts the
# ranks, so Slurm tracks, signals and accounts every rank process itself; each rank reads
# SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID and meets the others at MASTER_ADDR:MASTER_PORT
# (trainer.engine.init_distributed, sampler.distributed). Compared with torchrun per node,
# this needs no second rendezvous (c10d store, --node_rank) and no extra launcher process
# between Slurm's signals and the ranks.

# shellcheck source=slurm/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

# The exit code of a run that checkpointed on a signal (common.launch.PREEMPTED_EXIT_CODE).
LVD_PREEMPTED_EXIT_CODE=75

# lvd_rendezvous: export MASTER_ADDR (first node of the job), MASTER_PORT (from the job id, so a
# requeued job reuses it and two jobs sharing a node differ) and LVD_TASKS_PER_NODE.
lvd_rendezvous() {
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  MASTER_PORT=${LVD_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
  if [ "${SLURM_GPUS_ON_NODE:-0}" -gt 0 ]; then
    LVD_TASKS_PER_NODE=$SLURM_GPUS_ON_NODE
  else
    LVD_TASKS_PER_NODE=${SLURM_NTASKS_PER_NODE:-1}
  fi
  export MASTER_ADDR MASTER_PORT LVD_TASKS_PER_NODE
  echo "lvd: job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0}: ${SLURM_NNODES} nodes x ${LVD_TASKS_PER_NODE} ranks, rendezvous ${MASTER_ADDR}:${MASTER_PORT}"
}

# lvd_srun_ranks CMD...: run CMD as every rank. Each rank logs its node first. When one rank
# ends, the others get 120 s to end on their own (a preempted rank exits a moment before its
# peers) before srun stops them, so a crashed rank never leaves the job hanging.
lvd_srun_ranks() {
  srun --nodes="$SLURM_NNODES" --ntasks-per-node="$LVD_TASKS_PER_NODE" \
    --ntasks=$((SLURM_NNODES * LVD_TASKS_PER_NODE)) --kill-on-bad-exit=0 --wait=120 \
    bash -c 'echo "lvd: rank $SLURM_PROCID of $SLURM_NTASKS on $SLURMD_NODENAME"; exec "$@"' lvd-rank "$@"
}

# lvd_run_requeueable CMD...: lvd_srun_ranks CMD, resumable across preemption and time limits.
# USR1 to the batch shell (sbatch --signal=B:USR1@N, or scancel --signal=USR1 --batch) is
# forwarded to every rank, which finishes its step, checkpoints and exits with the preempted
# code; the job then requeues itself and the next start resumes from the run folder.
lvd_run_requeueable() {
  _lvd_run_ranks 'echo "lvd: USR1: asking the ranks to checkpoint"; scancel --signal=USR1 "$SLURM_JOB_ID"' "$@"
}

# lvd_run_resumable CMD...: the same for programs that keep their progress on disk as they go
# (lvd sample's <out>.parts/): on USR1 the job requeues at once, which stops the ranks, and the
# next start continues from the last saved unit.
lvd_run_resumable() {
  _lvd_run_ranks 'echo "lvd: USR1: requeueing job $SLURM_JOB_ID"; scontrol requeue "$SLURM_JOB_ID"' "$@"
}

# _lvd_run_ranks ON_USR1 CMD...: run the ranks in the background so the USR1 trap (the fixed
# command ON_USR1) runs at once; requeue when they exit with the preempted code.
_lvd_run_ranks() {
  local on_usr1=$1 srun_pid code
  shift
  lvd_rendezvous
  lvd_srun_ranks "$@" &
  srun_pid=$!
  # shellcheck disable=SC2064 # ON_USR1 is fixed text from this file, expanded now on purpose
  trap "$on_usr1" USR1
  # `wait` returns early (>128) whenever a trapped signal arrives: wait again until srun ends.
  while true; do
    wait "$srun_pid"
    code=$?
    kill -0 "$srun_pid" 2>/dev/null || break
  done
  trap - USR1
  if [ "$code" -eq "$LVD_PREEMPTED_EXIT_CODE" ]; then
    echo "lvd: ranks checkpointed and stopped (exit $code): requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  echo "lvd: ranks finished with exit code $code"
  exit "$code"
}
