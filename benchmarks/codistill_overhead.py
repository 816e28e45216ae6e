"""Codistillation overhead: step time of codistill vs sync on the same per-group ranks, and the
share of wall time spent publishing and loading teacher checkpoints, from real `hpcdistill train` runs.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/codistill_overhead.py [--dataset digits] [--reps 3]

This script is the driver: it launches the jobs with mpirun itself, alternating the two designs:

- codistill: `HPCDISTILL_MODE=codistill HPCDISTILL_GROUPS=2 mpirun -np 2`: 2 groups of 1 rank,
  each on its own data, distilling toward the other's published checkpoint;
- sync (the baseline): two `HPCDISTILL_MODE=sync mpirun -np 1` jobs started at the same moment:
  1 rank per group as in the codistill job, and the same 2 processes competing for the same 2
  cores, so the difference is what codistillation adds;
- control: codistill with HPCDISTILL_CODISTILL_TARGET=label-smoothing, the same 2 groups x 1 rank
  job without teachers or exchanges: it separates the cost of running as groups of a larger world
  (a Horovod process set per group, whose allreduce goes through Horovod's background thread even
  for 1 rank, since hvd.DistributedOptimizer only skips its hooks when the whole world is 1 rank)
  from the cost of the teachers (their forward passes, the distillation term, the exchanges).

All jobs run with `--bind-to none` (Open MPI binds to cores when np <= 2, and two -np 1 jobs would
both be pinned to core 0), default settings otherwise (EXCHANGE_EVERY, BURN_IN, EVAL_EVERY,
CHECKPOINT_EVERY, batch size) and the same seed. Step time is taken after burn-in, from the metrics
records (one every LOG_EVERY steps): "median interval" is the median over all LOG_EVERY-step
intervals of every group and repetition (robust to bursts of load from other work on the machine;
the intervals holding an evaluation, checkpoint or exchange are the minority), "whole span" is the
time from step BURN_IN to the last step over those steps (everything included), median over groups
and repetitions. Exchange share = summary.json's codistill.exchange_seconds (publish + load, summed
over the groups' leaders) / groups / wall_seconds, and the same over the training-loop time only
(wall_seconds includes MPI and Horovod start-up).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hpcdistill.launch import HPCDISTILL, job_env, mpirun_command  # noqa: E402

from _common import machine, median, prepared, table  # noqa: E402


def launch(np_: int, env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(mpirun_command(np_, HPCDISTILL, "train"), env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)


def wait_all(procs, logs) -> None:
    for p, log in zip(procs, logs):
        if p.wait(timeout=600) != 0:
            raise SystemExit(f"job failed (exit {p.returncode}); log {log}:\n{Path(log).read_text()[-3000:]}")


def step_times(metrics: Path, start: int) -> tuple[list, float, float]:
    """From a metrics file: the seconds per step of every interval between consecutive training
    records from step `start` on, the mean seconds per step over that whole span, and the loop's
    seconds (first to last training record)."""
    recs = [json.loads(x) for x in metrics.read_text().splitlines()]
    train = [r for r in recs if "loss" in r]
    steady = [r for r in train if r["step"] >= start]
    per = [(b["time"] - a["time"]) / (b["step"] - a["step"]) for a, b in zip(steady, steady[1:])]
    span = (steady[-1]["time"] - steady[0]["time"]) / (steady[-1]["step"] - steady[0]["step"])
    return per, span, train[-1]["time"] - train[0]["time"]


DESIGNS = {
    "sync": "sync: 2 jobs x (mpirun -np 1) at once",
    "control": "codistill, label-smoothing target: -np 2, 2 groups x 1",
    "codistill": "codistill (peers): -np 2, 2 groups x 1",
}


def run_design(design: str, root: Path, tag: str, common: dict) -> list:
    """Launch one design's job(s); return one dict per group: run dir, metrics file, summary."""
    if design == "sync":
        runs = [root / f"{tag}-{i}" for i in range(2)]
        logs = [root / f"{tag}-{i}.log" for i in range(2)]
        # two independent 1-rank jobs on the same 2 cores (the same data seed each: the same work)
        procs = [launch(1, job_env(**common, HPCDISTILL_MODE="sync", HPCDISTILL_RUN_DIR=r), log)
                 for r, log in zip(runs, logs)]
        wait_all(procs, logs)
        return [{"metrics": r / "metrics.jsonl", "summary": json.loads((r / "summary.json").read_text()), "group": 0}
                for r in runs]
    run, log = root / tag, root / f"{tag}.log"
    extra = {"HPCDISTILL_CODISTILL_TARGET": "label-smoothing"} if design == "control" else {}
    wait_all([launch(2, job_env(**common, **extra, HPCDISTILL_MODE="codistill", HPCDISTILL_GROUPS=2,
                                HPCDISTILL_RUN_DIR=run), log)], [log])
    summary = json.loads((run / "summary.json").read_text())
    return [{"metrics": run / f"metrics-g{g}.jsonl", "summary": summary, "group": g} for g in range(2)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="digits")
    p.add_argument("--model", default=None, help="HPCDISTILL_MODEL (default: the dataset's default)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--designs", default="sync,control,codistill")
    p.add_argument("--data-dir", default=os.environ.get("HPCDISTILL_DATA_DIR", "datasets"))
    p.add_argument("--keep", action="store_true", help="keep the run directories")
    p.add_argument("--exchange-every", type=int, default=None, help="HPCDISTILL_EXCHANGE_EVERY (default: the default)")
    p.add_argument("--json", action="store_true", help='print last one JSON object {"codistill_over_sync": x, '
                   '"exchange_share_of_wall": y} (x: median step time ratio, y: a fraction)')
    args = p.parse_args()
    data_dir = prepared(args.data_dir, args.dataset)
    from hpcdistill.config import Settings

    defaults = Settings()
    burn_in = defaults.burn_in
    Path("runs").mkdir(exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="bench-codistill-", dir=Path("runs").resolve()))
    common = dict(HPCDISTILL_DATA_DIR=data_dir, HPCDISTILL_DATASET=args.dataset, HPCDISTILL_STEPS=args.steps,
                  HPCDISTILL_RESUME="never", **({"HPCDISTILL_MODEL": args.model} if args.model else {}),
                  **({"HPCDISTILL_EXCHANGE_EVERY": args.exchange_every} if args.exchange_every else {}))
    designs = args.designs.split(",")
    res = {d: {"intervals": [], "span": [], "wall": [], "acc": []} for d in designs}
    ex = {"seconds": [], "share_wall": [], "share_loop": [], "published": [], "loaded": []}
    t0 = time.perf_counter()
    try:
        for rep in range(args.reps):
            order = designs if rep % 2 == 0 else designs[::-1]
            for design in order:
                groups = run_design(design, root, f"{design}-{rep}", common)
                loops = []
                for g in groups:
                    per, span, loop = step_times(g["metrics"], burn_in)
                    res[design]["intervals"] += per
                    res[design]["span"].append(span)
                    loops.append(loop)
                    res[design]["acc"].append(
                        next(x for x in g["summary"]["groups"] if x["group"] == g["group"])["test_accuracy"])
                res[design]["wall"] += sorted({g["summary"]["wall_seconds"] for g in groups})
                if design == "codistill":
                    s = groups[0]["summary"]
                    c, n = s["codistill"], s["num_groups"]
                    ex["seconds"].append(c["exchange_seconds"] / n)
                    ex["share_wall"].append(c["exchange_seconds"] / n / s["wall_seconds"])
                    ex["share_loop"].append(c["exchange_seconds"] / n / median(loops))
                    ex["published"].append(c["exchanges_published"])
                    ex["loaded"].append(c["teachers_loaded"])
                print(f"  rep {rep} {design} done at {time.perf_counter() - t0:.0f} s, load "
                      f"{os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    base = res[designs[0]]
    b_med, b_span = median(base["intervals"]), median(base["span"])
    rows = []
    for d in designs:
        r = res[d]
        med, span = median(r["intervals"]), median(r["span"])
        rows.append([DESIGNS[d], f"{med * 1e3:.2f}", f"{med / b_med:.2f}", f"{span * 1e3:.2f}", f"{span / b_span:.2f}",
                     f"{median(r['wall']):.1f}", f"{median(r['acc']):.4f}"])
    print(f"# codistill overhead: `hpcdistill train` on {args.dataset} ({args.model or 'default model'}), "
          f"{args.steps} steps, default settings (exchange every {args.exchange_every or defaults.exchange_every}, "
          f"burn-in {burn_in}, "
          f"eval every {defaults.eval_every}, checkpoint every {defaults.checkpoint_every}, log every "
          f"{defaults.log_every}, batch {defaults.batch_size})")
    print(f"# {machine(2)}")
    print(f"# {args.reps} interleaved repetitions x 2 groups; {time.perf_counter() - t0:.0f} s"
          + (f"; run directories kept in {root}" if args.keep else ""))
    print(table(["design", "ms/step (median interval)", "ratio", "ms/step (whole span)", "ratio", "wall s",
                 "test acc"], rows))
    if ex["seconds"]:
        print()
        print(table(["exchange s per group", "share of wall", "share of training loop", "published (2 groups)",
                     "teachers loaded"],
                    [[f"{median(ex['seconds']):.3f}", f"{median(ex['share_wall']) * 100:.2f} %",
                      f"{median(ex['share_loop']) * 100:.2f} %", f"{median(ex['published']):.0f}",
                      f"{median(ex['loaded']):.0f}"]]))
    if args.json:
        out = {}
        for design in ("codistill", "control"):
            if design in res and "sync" in res:
                ratio = median(res[design]["intervals"]) / median(res["sync"]["intervals"])
                out[f"{design}_over_sync"] = round(ratio, 3)
        if ex["share_wall"]:
            out["exchange_share_of_wall"] = round(median(ex["share_wall"]), 5)
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
