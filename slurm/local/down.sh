#!/usr/bin/env bash
# Stop the local Slurm cluster started by up.sh: cancel every job, then stop both slurmd, slurmctld
# and (if up.sh started it) munged, each by its pid file. Idempotent; keeps config and state.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/common.sh"
require_root
serialise

# cancel_all_jobs: cancel every job and wait (up to 30 s) until the controller has none left
# running, so no job is orphaned when its slurmd stops.
cancel_all_jobs() {
  local jobs
  jobs=$(squeue -h -o '%A' 2>/dev/null) || return 0
  [ -z "$jobs" ] && return 0
  note "cancelling jobs: $(tr '\n' ' ' <<<"$jobs")"
  # shellcheck disable=SC2086
  scancel $jobs || true
  for _ in $(seq 300); do
    [ -z "$(squeue -h -o '%A' 2>/dev/null)" ] && return 0
    sleep 0.1
  done
  note "jobs still listed after 30 s: $(squeue -h -o '%A %T' | tr '\n' ' ')"
}

main() {
  if ! is_ours "$SLURM_CONF_PATH"; then
    note "no lvd local cluster config at $SLURM_CONF_PATH: nothing to stop"
    return 0
  fi
  local state node
  state=$(state_dir_of_conf)
  pid_alive "$state/slurmctld.pid" slurmctld && cancel_all_jobs
  for node in "${NODE_NAMES[@]}"; do stop_pid "$state/slurmd-$node.pid" slurmd; done
  stop_pid "$state/slurmctld.pid" slurmctld
  if [ -e "$state/munged.ours" ]; then
    stop_pid "$MUNGE_PIDFILE" munged
    rm -f "$state/munged.ours"
  fi
  note "down"
}

main "$@"
