#!/usr/bin/env bash
# Set up (idempotent), lint, and run the whole test suite: unit tests and real multi-rank mpirun runs.
# The fast tier alone (no MPI, under a minute): bash scripts/test.sh -m 'not mpi'
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
export OMP_NUM_THREADS=1
.venv/bin/ruff check .              # the linter (pyproject.toml [tool.ruff]): the tree is kept clean under it
exec .venv/bin/python -m pytest -q "$@"
