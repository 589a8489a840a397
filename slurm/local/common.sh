# Shared by up.sh and down.sh (sourced, not run).
# Slurm's own SLURM_CONF variable moves the config (daemons and clients all read it).
SLURM_CONF_PATH=${SLURM_CONF:-/etc/slurm/slurm.conf}
# Marks what up.sh wrote: the first line of slurm.conf and the n1 n2 line of /etc/hosts.
MARKER='# lvd-local-slurm'
NODE_NAMES=(n1 n2)
MUNGE_PIDFILE=/run/munge/munged.pid

# serialise: hold a lock on fd 9 for the rest of the script, so parallel test sessions do not start
# daemons twice; a nested call (up.sh running down.sh) inherits it. Daemons are started with
# 9>&- so they do not keep the lock.
serialise() {
  [ -n "${LVD_SLURM_LOCKED:-}" ] && return 0
  exec 9>/tmp/lvd-slurm.lock
  flock -w 300 9 || die "another up.sh or down.sh held /tmp/lvd-slurm.lock for 300 s"
  export LVD_SLURM_LOCKED=1
}

die() {
  echo "$(basename "$0"): error: $*" >&2
  exit 1
}

note() { echo "$(basename "$0"): $*"; }

require_root() { [ "$(id -u)" = 0 ] || die "run as root (it installs packages and starts system daemons)"; }

# is_ours FILE: FILE was written by up.sh (its first line carries our marker).
is_ours() { head -n1 "$1" 2>/dev/null | grep -q "^$MARKER"; }

# state_dir_of_conf: the state directory an installed lvd slurm.conf points at.
state_dir_of_conf() { dirname "$(sed -n 's/^SlurmctldPidFile=//p' "$SLURM_CONF_PATH")"; }

# proc_running PID: the process exists and is not a zombie (pid 1 here may never reap it).
proc_running() { [ -r "/proc/$1/stat" ] && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]; }

# pid_alive FILE NAME: FILE holds the pid of a running process whose name is NAME
# (the name check guards against a stale pid file whose pid was reused).
pid_alive() {
  local pid
  [ -s "$1" ] || return 1
  pid=$(cat "$1")
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] && proc_running "$pid"
}

# stop_pid FILE NAME: SIGTERM the process, SIGKILL it after 10 s, remove the pid file.
stop_pid() {
  local pid
  if pid_alive "$1" "$2"; then
    pid=$(cat "$1")
    kill -TERM "$pid"
    for _ in $(seq 100); do
      proc_running "$pid" || break
      sleep 0.1
    done
    proc_running "$pid" && kill -KILL "$pid"
    note "stopped $2 (pid $pid)"
  fi
  rm -f "$1"
}
