#!/usr/bin/env bash
# The main job end to end on the embedded default: set up, prepare the digits dataset, train two
# codistilling groups of two ranks each with local mpirun (a local directory is the "parallel
# filesystem" for the teacher exchange), then distill the two group models into a smaller student,
# train the same student alone, and print a report. Everything lands in ./runs/demo-*.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
source .venv/bin/activate
export OMP_NUM_THREADS=1 HPCDISTILL_DATA_DIR="$ROOT/datasets"
MPIRUN=(mpirun --oversubscribe -np 4)
[ "$(id -u)" = 0 ] && MPIRUN=(mpirun --allow-run-as-root --oversubscribe -np 4)

hpcdistill doctor
hpcdistill data prepare digits
HPCDISTILL_MODE=codistill HPCDISTILL_GROUPS=2 HPCDISTILL_RUN_DIR=runs/demo-codistill HPCDISTILL_RESUME=never \
  "${MPIRUN[@]}" hpcdistill train
HPCDISTILL_MODE=distill HPCDISTILL_TEACHERS=runs/demo-codistill HPCDISTILL_MODEL=mlp-small \
  HPCDISTILL_TEMPERATURE=4 HPCDISTILL_DISTILL_WEIGHT=0.7 HPCDISTILL_RUN_DIR=runs/demo-distill HPCDISTILL_RESUME=never \
  "${MPIRUN[@]}" hpcdistill train
# the same student trained alone, same data and steps: the report says how much of the teacher-student
# gap distillation closed
HPCDISTILL_MODE=sync HPCDISTILL_MODEL=mlp-small HPCDISTILL_RUN_DIR=runs/demo-student-alone HPCDISTILL_RESUME=never \
  "${MPIRUN[@]}" hpcdistill train
hpcdistill report runs/demo-codistill runs/demo-distill runs/demo-student-alone
