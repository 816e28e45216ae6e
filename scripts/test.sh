#!/usr/bin/env bash
# Set up (idempotent), lint, and run the whole test suite: unit tests and real multi-rank mpirun runs.
# The fast tier alone (no MPI, under a minute): bash scripts/test.sh -m 'not mpi'
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
# The MPICH tier of tests/test_portability.py runs hpcdistill built against Debian's MPICH in .venv-mpich
# (apt installs MPICH beside Open MPI; Horovod is built once more, cached). HPCD_TEST_MPICH=0 skips
# building it and deselects that tier (on a machine without apt or MPICH).
if [ "${HPCD_TEST_MPICH:-1}" = 1 ]; then
  MPICC=mpicc.mpich VENV_DIR="$ROOT/.venv-mpich" bash scripts/setup.sh
else
  set -- -k "not mpich" "$@"
fi
export OMP_NUM_THREADS=1
.venv/bin/ruff check .              # the linter (pyproject.toml [tool.ruff]): the tree is kept clean under it
exec .venv/bin/python -m pytest -q "$@"
