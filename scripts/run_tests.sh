#!/usr/bin/env bash
# The whole test suite: lint, bring up a real single-node Slurm (stopped again by PID at the end,
# only the daemons this script started), then pytest.
set -euo pipefail
VENV="${1:-.venv}"
cd "$(dirname "$0")/.."
export PATH="$PWD/$VENV/bin:$PATH"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/evo2_hydra/torch_extensions}"
export DS_ACCELERATOR=cpu

# Bringing Slurm up installs and starts daemons, which needs root. Without root, say so in one
# line (unless a cluster is already up), instead of failing deep inside apt.
if [ "$(id -u)" -ne 0 ] && ! sinfo -h >/dev/null 2>&1; then
  echo "error: make test brings up a local Slurm and needs root (sudo make test); without root, 'make test-fast' runs everything except the Slurm tests" >&2
  exit 2
fi

ruff check .
ruff format --check .
python scripts/render_help.py --check

if [ "$(id -u)" -eq 0 ] && [ -x scripts/slurm_cluster.sh ]; then
  started=$(mktemp)
  bash scripts/slurm_cluster.sh start --record "$started"
  trap 'bash scripts/slurm_cluster.sh stop --record "$started"; rm -f "$started"' EXIT
fi

python -m pytest -q tests
