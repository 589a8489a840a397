#!/usr/bin/env bash
# Bring up a real Slurm on this machine: Debian's slurmctld + 2 slurmd (nodes n1, n2 on 127.0.0.1)
# and munge, with fast scheduling and short credential expiry. Run as root. Idempotent: when the
# cluster is already up with the same config it returns at once; after down.sh it restarts.
#
#   slurm/local/up.sh                               # state, logs, pids in /var/run/lvd-slurm
#   LVD_SLURM_STATE=/tmp/s LVD_SLURM_TIMEOUT=120 slurm/local/up.sh
#
# The config goes to /etc/slurm/slurm.conf (rendered from slurm.conf.in beside this script) so
# sbatch/srun/sinfo need no extra environment (or to $SLURM_CONF when set). A slurm.conf not
# written by this script is never overwritten.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/common.sh"
require_root
serialise

STATE=${LVD_SLURM_STATE:-/var/run/lvd-slurm}
TIMEOUT=${LVD_SLURM_TIMEOUT:-60}
PACKAGES=(slurmctld slurmd slurm-client munge)

# apt_get ARGS...: apt-get that waits for a concurrent apt/dpkg (e.g. setup.sh) instead of failing.
apt_get() {
  local try
  for try in 1 2 3 4 5 6; do
    apt-get -o DPkg::Lock::Timeout=300 "$@" && return 0
    note "apt-get $1 failed (attempt $try), retrying in 10 s"
    sleep 10
  done
  die "apt-get $* kept failing"
}

install_packages() {
  local missing=() pkg
  for pkg in "${PACKAGES[@]}"; do
    [ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null)" = "install ok installed" ] || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  note "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt_get update -qq
  apt_get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# render_conf: slurm.conf for this host on stdout. Each emulated node gets this machine's CPU
# count (at least 2, so a node takes two 1-CPU jobs) and half of its memory.
render_conf() {
  local probe cpus mem_mb
  probe=$(slurmd -C | head -n1)
  cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$probe")
  mem_mb=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$probe")
  [ -n "$cpus" ] && [ -n "$mem_mb" ] || die "cannot parse 'slurmd -C': $probe"
  sed -e "s|@HOST@|$(hostname -s)|g" -e "s|@STATE@|$STATE|g" \
    -e "s|@CPUS@|$((cpus < 2 ? 2 : cpus))|g" -e "s|@MEMORY_MB@|$((mem_mb / 2))|g" \
    "$here/slurm.conf.in"
}

add_hosts_entry() {
  grep -q "$MARKER" /etc/hosts && return 0
  echo "127.0.0.1 ${NODE_NAMES[*]} $MARKER" >>/etc/hosts || die "cannot append the n1 n2 line to /etc/hosts"
}

daemons_alive() {
  local node
  pid_alive "$MUNGE_PIDFILE" munged && pid_alive "$STATE/slurmctld.pid" slurmctld || return 1
  for node in "${NODE_NAMES[@]}"; do pid_alive "$STATE/slurmd-$node.pid" slurmd || return 1; done
}

# nodes_up: every node answers and is schedulable (idle, or running jobs).
nodes_up() {
  local states
  states=$(sinfo -h -N -p debug -o '%t' 2>/dev/null) || return 1
  [ "$(grep -cE '^(idle|mix|alloc)$' <<<"$states")" -eq ${#NODE_NAMES[@]} ]
}

start_munge() {
  pid_alive "$MUNGE_PIDFILE" munged && return 0
  if [ ! -s /etc/munge/munge.key ]; then
    note "creating /etc/munge/munge.key"
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown munge:munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
  mkdir -p /run/munge
  chown munge:munge /run/munge
  runuser -u munge -- munged 9>&-
  touch "$STATE/munged.ours"
  for _ in $(seq 50); do
    munge -n </dev/null | unmunge >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  die "munged does not answer (see /var/log/munge/munged.log)"
}

# start_slurm CLEAR: start slurmctld (with -c to drop saved jobs when CLEAR=1) and any slurmd
# that is not running.
start_slurm() {
  local node
  if ! pid_alive "$STATE/slurmctld.pid" slurmctld; then
    slurmctld $([ "$1" = 1 ] && echo -c) 9>&- || die "slurmctld failed to start, see $STATE/log/slurmctld.log"
  fi
  for node in "${NODE_NAMES[@]}"; do
    pid_alive "$STATE/slurmd-$node.pid" slurmd && continue
    slurmd -N "$node" 9>&- || die "slurmd -N $node failed to start, see $STATE/log/slurmd-$node.log"
  done
}

wait_for_nodes() {
  local deadline=$((SECONDS + TIMEOUT))
  until nodes_up; do
    if [ $SECONDS -ge $deadline ]; then
      echo "--- sinfo" >&2
      sinfo -N -l >&2 || true
      sinfo -R >&2 || true
      for log in "$STATE"/log/*.log; do
        echo "--- tail $log" >&2
        tail -n 5 "$log" >&2
      done
      die "nodes ${NODE_NAMES[*]} not up after ${TIMEOUT}s (see above and $STATE/log)"
    fi
    sleep 0.2
  done
}

print_usage() {
  cat <<EOF
Local Slurm cluster 'lvdlocal' is up: partition debug, nodes ${NODE_NAMES[*]} on 127.0.0.1.
  sinfo -N -l                                     # both nodes idle
  sbatch -N 2 --ntasks-per-node=1 --wrap 'srun printenv SLURMD_NODENAME'
  squeue; scontrol show job <id>                  # no accounting: no sacct
  config $SLURM_CONF_PATH, state and logs in $STATE/log, stop with $here/down.sh
EOF
}

main() {
  if [ -e "$SLURM_CONF_PATH" ] && ! is_ours "$SLURM_CONF_PATH"; then
    die "$SLURM_CONF_PATH was not written by this script; move it away to use the local cluster"
  fi
  install_packages
  local conf changed=0
  conf=$(render_conf)
  [ "$conf" = "$(cat "$SLURM_CONF_PATH" 2>/dev/null)" ] || changed=1
  add_hosts_entry
  if [ $changed = 0 ] && daemons_alive && nodes_up; then
    note "already up"
    return 0
  fi
  if [ $changed = 1 ] && [ -e "$SLURM_CONF_PATH" ]; then
    note "config changed: restarting"
    "$here/down.sh"
  fi
  mkdir -p "$STATE/ctld" "$STATE/log" "$(dirname "$SLURM_CONF_PATH")"
  for node in "${NODE_NAMES[@]}"; do mkdir -p "$STATE/spool/$node"; done
  [ $changed = 1 ] && printf '%s\n' "$conf" >"$SLURM_CONF_PATH"
  start_munge
  start_slurm $changed
  wait_for_nodes
  print_usage
}

main "$@"
