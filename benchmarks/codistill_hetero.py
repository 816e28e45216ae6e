"""Two groups of different architectures (HPCDISTILL_GROUP_MODELS): does each gain from codistilling
over training alone on the same steps and data?

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/codistill_hetero.py [--models mlp:cnn-small] [--seeds 0,1,2]

"Alone" is the same job with HPCDISTILL_DISTILL_WEIGHT=0: the same groups, data split, steps, seeds
and exchanges, without the distillation term. Test accuracy per group, mean over the seeds, and the
difference (codistill - alone) with its spread over seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hpcdistill.launch import HPCDISTILL, job_env, mpirun_command  # noqa: E402

from _common import machine, prepared, table  # noqa: E402


def accuracies(root: Path, tag: str, common: dict, weight: float) -> list[float]:
    run = root / tag
    proc = subprocess.run(mpirun_command(2, HPCDISTILL, "train"), capture_output=True, text=True,
                          env=job_env(**common, HPCDISTILL_DISTILL_WEIGHT=weight, HPCDISTILL_RUN_DIR=run))
    if proc.returncode != 0:
        raise SystemExit(f"{tag} failed:\n{proc.stderr[-3000:]}")
    groups = json.loads((run / "summary.json").read_text())["groups"]
    shutil.rmtree(run, ignore_errors=True)
    return [g["test_accuracy"] for g in sorted(groups, key=lambda g: g["group"])]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="mlp:cnn-small")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--json", action="store_true")
    p.add_argument("--data-dir", default=os.environ.get("HPCDISTILL_DATA_DIR", "datasets"))
    args = p.parse_args()
    data_dir = prepared(args.data_dir)
    models = args.models.split(":")
    common = dict(HPCDISTILL_MODE="codistill", HPCDISTILL_GROUPS=2, HPCDISTILL_GROUP_MODELS=args.models,
                  HPCDISTILL_DATA_DIR=data_dir, HPCDISTILL_STEPS=args.steps, HPCDISTILL_RESUME="never",
                  HPCDISTILL_TENSORBOARD="false")
    Path("runs").mkdir(exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="bench-hetero-", dir=Path("runs").resolve()))
    co, alone = [], []
    try:
        for seed in args.seeds.split(","):
            env = {**common, "HPCDISTILL_SEED": seed}
            co.append(accuracies(root, f"co-{seed}", env, 0.5))
            alone.append(accuracies(root, f"alone-{seed}", env, 0.0))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows, out = [], {}
    for g, name in enumerate(models):
        diffs = [c[g] - a[g] for c, a in zip(co, alone)]
        rows.append([f"group {g}: {name}", f"{statistics.mean(a[g] for a in alone):.4f}",
                     f"{statistics.mean(c[g] for c in co):.4f}", f"{statistics.mean(diffs):+.4f}",
                     f"{min(diffs):+.4f} .. {max(diffs):+.4f}"])
        out[name] = round(statistics.mean(diffs), 4)
    print(f"# heterogeneous codistillation: GROUP_MODELS={args.models}, digits, 2 groups of 1 rank, {args.steps} "
          f"steps, seeds {args.seeds}; alone = DISTILL_WEIGHT=0")
    print(f"# {machine(2)}")
    print(table(["group", "alone test acc", "codistill test acc", "gain (mean)", "gain (min .. max)"], rows))
    if args.json:
        print(json.dumps({"gain": out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
