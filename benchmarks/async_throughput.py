"""Async (DC-ASGD on RMA windows) updates per second against sync (Horovod) steps per second, with
and without a 2x straggler, from real `hpcdistill train` runs.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/async_throughput.py [--workers 2] [--reps 3]

This script is the driver: it launches the four jobs with mpirun itself and alternates them
repetition by repetition (order rotated each time), so load from other work hits all four alike:

- sync:  `HPCDISTILL_MODE=sync mpirun -np W` (every step is an allreduce over the W ranks);
- async: `HPCDISTILL_MODE=async HPCDISTILL_ASYNC_RULE=dcasgd-a mpirun -np W+1` (rank 0 hosts the
  windows and only keeps MPI progressing; W workers);
- each again with `HPCDISTILL_STRAGGLER_RANK` = the last worker and `HPCDISTILL_STRAGGLER_DELAY=1`
  (it sleeps as long as its step took: a worker 2x slower than the rest).

Same model, data, batch per worker, learning rate and seed everywhere; evaluation and checkpoints
pushed beyond the run. Throughput is read from the lead worker's metrics records (one every
LOG_EVERY steps, after the first): sync, samples/s = steps x W x batch / time; async, samples/s =
global updates (the version counter in its records) x batch / time. The lead worker is never the
straggler, so its span is the time when every worker is busy: async workers each run
HPCDISTILL_STEPS updates, and once the fast ones are done the straggler finishes alone (the
"wall" column, whole job, shows that tail). What to expect with W workers and one 2x straggler:
sync falls to 0.5x (every step waits for it), async to (W - 0.5) / W (0.75 for W = 2).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hpcdistill.launch import HPCDISTILL, job_env, mpirun_command  # noqa: E402

from _common import machine, median, table  # noqa: E402


def run_job(np_: int, settings: dict, run_dir: Path) -> dict:
    cmd = mpirun_command(np_, HPCDISTILL, "train")
    proc = subprocess.run(cmd, env=job_env(**settings, HPCDISTILL_RUN_DIR=run_dir), capture_output=True,
                          text=True, timeout=900)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "loss" in r and r.get("group", 0) == 0]
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"records": records, "summary": summary}


def samples_per_second(result: dict, mode: str, workers: int, batch: int) -> float:
    recs = result["records"][1:]  # from the first record on: start-up and the first steps excluded
    first, last = recs[0], recs[-1]
    dt = last["time"] - first["time"]
    if mode == "sync":
        return (last["step"] - first["step"]) * workers * batch / dt
    return (last["version"] - first["version"]) * batch / dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=300, help="steps per worker")
    ap.add_argument("--model", default="mlp-large")
    ap.add_argument("--delay", type=float, default=1.0, help="straggler sleep, as a fraction of its step time")
    ap.add_argument("--data-dir", default=None, help="prepared datasets (default: a temporary directory)")
    args = ap.parse_args()
    W, batch = args.workers, 32
    tmp = Path(tempfile.mkdtemp(prefix="hpcd-async-tput-"))
    data_dir = Path(args.data_dir) if args.data_dir else tmp / "data"
    if not (data_dir / "digits").exists():
        from hpcdistill.data import prepare
        prepare("digits", data_dir)
    base = {"HPCDISTILL_DATASET": "digits", "HPCDISTILL_DATA_DIR": data_dir, "HPCDISTILL_MODEL": args.model,
            "HPCDISTILL_STEPS": args.steps, "HPCDISTILL_BATCH_SIZE": batch, "HPCDISTILL_LR": 0.1,
            "HPCDISTILL_OPTIMIZER": "sgd", "HPCDISTILL_MOMENTUM": 0, "HPCDISTILL_LOG_EVERY": 10,
            "HPCDISTILL_EVAL_EVERY": 10 ** 6, "HPCDISTILL_CHECKPOINT_EVERY": 10 ** 6, "HPCDISTILL_SEED": 0,
            "HPCDISTILL_RESUME": "never"}
    jobs = {
        "sync": (W, {**base, "HPCDISTILL_MODE": "sync"}),
        "sync, 2x straggler": (W, {**base, "HPCDISTILL_MODE": "sync", "HPCDISTILL_STRAGGLER_RANK": W - 1,
                                   "HPCDISTILL_STRAGGLER_DELAY": args.delay}),
        "async": (W + 1, {**base, "HPCDISTILL_MODE": "async", "HPCDISTILL_ASYNC_RULE": "dcasgd-a"}),
        "async, 2x straggler": (W + 1, {**base, "HPCDISTILL_MODE": "async", "HPCDISTILL_ASYNC_RULE": "dcasgd-a",
                                        "HPCDISTILL_STRAGGLER_RANK": W, "HPCDISTILL_STRAGGLER_DELAY": args.delay}),
    }
    names = list(jobs)
    rate = {n: [] for n in names}
    wall = {n: [] for n in names}
    t0 = time.perf_counter()
    for rep in range(args.reps):
        for name in names[rep % 4:] + names[:rep % 4]:
            np_, settings = jobs[name]
            run_dir = tmp / f"{name.replace(', ', '-').replace(' ', '')}-{rep}"
            res = run_job(np_, settings, run_dir)
            rate[name].append(samples_per_second(res, settings["HPCDISTILL_MODE"], W, batch))
            wall[name].append(res["summary"]["wall_seconds"])
            print(f"  rep {rep} {name:22s} {rate[name][-1]:8.0f} samples/s  wall {wall[name][-1]:.1f} s",
                  file=sys.stderr)
    elapsed = time.perf_counter() - t0
    shutil.rmtree(tmp, ignore_errors=True)

    rows = []
    for name in names:
        ref = median(rate[name.split(",")[0]])
        rows.append([name, jobs[name][0], f"{median(rate[name]):.0f}", f"{median(rate[name]) / ref:.2f}",
                     " ".join(f"{r:.0f}" for r in rate[name]), f"{median(wall[name]):.1f}"])
    ideal_async = (W - 1 + 1 / (1 + args.delay)) / W
    print(f"# async vs sync throughput: hpcdistill train, digits, {args.model}, {args.steps} steps per worker, "
          f"batch {batch} per worker, {W} worker(s)")
    print(f"# {machine(W + 1)}")
    print(f"# {args.reps} repetitions of the four jobs, order rotated; {elapsed:.0f} s")
    print()
    print(table(["job", "ranks", "samples/s (median)", "vs same mode without straggler", "per repetition",
                 "wall s"], rows))
    sync_r = median(rate["sync, 2x straggler"]) / median(rate["sync"])
    async_r = median(rate["async, 2x straggler"]) / median(rate["async"])
    print()
    print(f"straggler keeps: sync {sync_r:.2f} (ideal {1 / (1 + args.delay):.2f}), async {async_r:.2f} "
          f"(ideal {ideal_async:.2f}); async/sync with the straggler: "
          f"{median(rate['async, 2x straggler']) / median(rate['sync, 2x straggler']):.2f}, "
          f"without: {median(rate['async']) / median(rate['sync']):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
