# Cluster settings for every lvd Slurm job: the one file to edit for a new cluster.
#
# Sourced inside each job by slurm/launch.sh (so by every slurm/*.sbatch template and by the
# scripts `lvd submit` writes), and read by `lvd submit` for its defaults. Source it before a
# plain `sbatch` too: sbatch reads SBATCH_PARTITION / SBATCH_ACCOUNT from the environment.
# A value already set in the environment wins, so `LVD_PARTITION=gpu sbatch ...` needs no edit.

# Code and virtualenv: paths every node sees (a shared filesystem).
export LVD_ROOT=${LVD_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
export LVD_PYTHON=${LVD_PYTHON:-$LVD_ROOT/.venv/bin/python}

# Where jobs run. Empty: the cluster's default partition / the user's default account.
LVD_PARTITION=${LVD_PARTITION:-}
LVD_ACCOUNT=${LVD_ACCOUNT:-}
# GPUs per node for `lvd submit` (0 = CPU nodes with gloo, as on the local test cluster).
LVD_GPUS_PER_NODE=${LVD_GPUS_PER_NODE:-0}
# CPU cores per rank (data-loader workers + 1).
LVD_CPUS_PER_TASK=${LVD_CPUS_PER_TASK:-1}
# Seconds of warning before the time limit (sbatch --signal=B:USR1@N, submitit's USR2@N):
# enough for one training step plus a checkpoint save.
LVD_SIGNAL_LEAD_S=${LVD_SIGNAL_LEAD_S:-120}

# NCCL (GPU nodes only; gloo on CPU ignores these). Empty values are left unset.
# Socket interface between nodes, e.g. ib0 or eth0 (see `ip -br addr` on a compute node).
LVD_NCCL_SOCKET_IFNAME=${LVD_NCCL_SOCKET_IFNAME:-}
# InfiniBand adapters, e.g. mlx5; set NCCL_IB_DISABLE=1 below on Ethernet-only clusters.
LVD_NCCL_IB_HCA=${LVD_NCCL_IB_HCA:-}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0}
# A rank that fails aborts the collective in the others instead of leaving them to hang.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}

# One thread per rank unless the job gave it more cores.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

[ -n "$LVD_PARTITION" ] && export SBATCH_PARTITION=$LVD_PARTITION
[ -n "$LVD_ACCOUNT" ] && export SBATCH_ACCOUNT=$LVD_ACCOUNT
[ -n "$LVD_NCCL_SOCKET_IFNAME" ] && export NCCL_SOCKET_IFNAME=$LVD_NCCL_SOCKET_IFNAME
[ -n "$LVD_NCCL_IB_HCA" ] && export NCCL_IB_HCA=$LVD_NCCL_IB_HCA
export LVD_PARTITION LVD_ACCOUNT LVD_GPUS_PER_NODE LVD_CPUS_PER_TASK LVD_SIGNAL_LEAD_S
true
