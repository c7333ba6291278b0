#!/usr/bin/env bash
# The whole test suite: lint, bring up a real single-node Slurm (stopped again by PID at the end,
# only the daemons this script started), then pytest.
set -euo pipefail
VENV="${1:-.venv}"
cd "$(dirname "$0")/.."
export PATH="$PWD/$VENV/bin:$PATH"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/evo2_hydra/torch_extensions}"
export DS_ACCELERATOR=cpu

ruff check .
ruff format --check .

if [ -x scripts/slurm_cluster.sh ]; then
  started=$(mktemp)
  bash scripts/slurm_cluster.sh start --record "$started"
  trap 'bash scripts/slurm_cluster.sh stop --record "$started"; rm -f "$started"' EXIT
fi

python -m pytest -q tests
