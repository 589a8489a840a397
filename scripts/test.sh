#!/usr/bin/env bash
# The test command (README, .ci/run): lint, then the whole default suite, with the local Slurm
# cluster up for the `slurm` tests. Any failure, including "no tests collected" (pytest exit
# code 5), fails the command. Extra arguments go to pytest (e.g. -k trainer).
#
#   ./scripts/test.sh           # the default suite (what CI runs): -m "not extended"
#   ./scripts/test.sh --fast    # the fast lane: -m "not slow and not extended" (no rank
#                               # launches, no Slurm, no demo, no memorisation chain), without
#                               # bringing Slurm up
#   ./scripts/test.sh --all     # everything, the `extended` tests too (about 10 more minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false
fast=0
case "${1:-}" in
  --fast) fast=1; shift; set -- -m "not slow and not extended" "$@" ;;
  --all) shift ;;
  *) set -- -m "not extended" "$@" ;;
esac
.venv/bin/ruff check .
slurm_up=0
if [ "$fast" = 0 ] && [ -x slurm/local/up.sh ] && [ "$(id -u)" = 0 ] && [ "${LVD_SKIP_SLURM:-0}" != 1 ]; then
  slurm/local/up.sh
  slurm_up=1
  trap 'slurm/local/down.sh || true' EXIT
fi
set +e
.venv/bin/python -m pytest --durations=15 "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "test.sh: pytest collected no tests: failing" >&2; exit 1; fi
[ "$slurm_up" = 1 ] || [ "$fast" = 1 ] || echo "test.sh: note: local Slurm not started (not root, or LVD_SKIP_SLURM=1)" >&2
exit "$rc"
