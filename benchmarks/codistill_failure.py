"""The cost of losing a group: wall time to finish a 2-group codistillation when one group's job is
killed once (`kill -9` of a rank) and started again at once (what a requeue does), as a ratio to the
same codistillation without a failure, for the two designs side by side:

- across jobs: each group its own `mpirun -np 1` (HPCDISTILL_GROUP_OFFSET 0 and 1, one exchange dir and
  id); the kill takes down group 1's job only, group 0 trains on; group 1 resumes from its checkpoint.
- one job: both groups in one `mpirun -np 2`; the kill takes down the job, so both groups restart
  from their checkpoints (the single-job design of before).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/codistill_failure.py [--steps 1500] [--reps 2]

The kill comes when group 1 has logged step `--kill-at` (checkpoints every `--checkpoint-every`, so
kill-at mod checkpoint-every steps are lost). Wall time: from the first launch to the end of the last
job (both groups done), and to the end of group 0's job (the group that did not fail). Failure-free
and failed runs of both designs alternate repetition by repetition (ABAB ...).
On this 2-core machine the surviving job of the across-jobs design has both cores while the other
restarts; on a cluster each job keeps its own nodes, so the survivor gains nothing: the ratio then
comes from what the failure costs the failed group alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hpcdistill.launch import HPCDISTILL, job_env, mpirun_command, rank_pids  # noqa: E402

from _common import machine, median, prepared, table  # noqa: E402


def launch(np_: int, env: dict, log: Path) -> subprocess.Popen:
    with open(log, "a") as out:
        return subprocess.Popen(mpirun_command(np_, HPCDISTILL, "train"), env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def logged_step(metrics: Path) -> int:
    try:
        return max((json.loads(x).get("step", 0) for x in metrics.read_text().splitlines() if x), default=0)
    except (FileNotFoundError, ValueError):
        return 0


def kill_rank(mpirun: subprocess.Popen, rank: int) -> None:
    """kill -9 the process of world rank `rank` among mpirun's children, and wait for the job to end."""
    os.kill(rank_pids(mpirun.pid)[rank], signal.SIGKILL)
    mpirun.wait(timeout=120)
    time.sleep(2)  # the other ranks of the job end after mpirun (their pids free the claims)


def wait_ok(procs, what: str, logs) -> list[float]:
    """Wait for every job; the perf_counter time at which each ended (polled every 50 ms)."""
    ends: dict[int, float] = {}
    while len(ends) < len(procs):
        for i, p in enumerate(procs):
            if i not in ends and p.poll() is not None:
                ends[i] = time.perf_counter()
                if p.returncode != 0:
                    raise SystemExit(f"{what}: a job failed (exit {p.returncode}); {logs[i]}:\n"
                                     f"{Path(logs[i]).read_text()[-3000:]}")
        time.sleep(0.05)
    return [ends[i] for i in range(len(procs))]


def run(design: str, fail: bool, root: Path, tag: str, common: dict, kill_at: int) -> tuple[float, float]:
    """(wall seconds until both groups are done, seconds until group 0 is done)."""
    d = root / tag
    exchange = dict(HPCDISTILL_EXCHANGE_DIR=d / "exchange", HPCDISTILL_EXCHANGE_ID=tag.replace("_", "-"))
    t0 = time.perf_counter()
    if design == "jobs":
        envs = [job_env(**common, **exchange, HPCDISTILL_GROUP_OFFSET=g, HPCDISTILL_RUN_DIR=d / f"job{g}")
                for g in (0, 1)]
        logs = [d.with_name(f"{tag}-{g}.log") for g in (0, 1)]
        procs = [launch(1, envs[g], logs[g]) for g in (0, 1)]
        if fail:
            metrics = d / "job1" / "metrics-g1.jsonl"
            while logged_step(metrics) < kill_at:
                time.sleep(0.05)
            kill_rank(procs[1], 0)
            procs[1] = launch(1, envs[1], logs[1])
        ends = wait_ok(procs, tag, logs)
        return max(ends) - t0, ends[0] - t0
    else:
        env = job_env(**common, **exchange, HPCDISTILL_RUN_DIR=d / "job")
        log = d.with_name(f"{tag}.log")
        proc = launch(2, env, log)
        if fail:
            metrics = d / "job" / "metrics-g1.jsonl"
            while logged_step(metrics) < kill_at:
                time.sleep(0.05)
            kill_rank(proc, 1)
            proc = launch(2, env, log)
        (end,) = wait_ok([proc], tag, [log])
        return end - t0, end - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--kill-at", type=int, default=790)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print one JSON object last")
    p.add_argument("--data-dir", default=os.environ.get("HPCDISTILL_DATA_DIR", "datasets"))
    args = p.parse_args()
    data_dir = prepared(args.data_dir)
    common = dict(HPCDISTILL_MODE="codistill", HPCDISTILL_GROUPS=2, HPCDISTILL_DATA_DIR=data_dir,
                  HPCDISTILL_STEPS=args.steps, HPCDISTILL_CHECKPOINT_EVERY=args.checkpoint_every,
                  HPCDISTILL_LOG_EVERY=10, HPCDISTILL_EVAL_EVERY=10 * args.steps, HPCDISTILL_TENSORBOARD="false")
    Path("runs").mkdir(exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="bench-failure-", dir=Path("runs").resolve()))
    t0 = time.perf_counter()
    walls = {(d, f): [] for d in ("jobs", "one") for f in (False, True)}
    survivor = {(d, f): [] for d in ("jobs", "one") for f in (False, True)}
    cases = list(walls)
    try:
        for rep in range(args.reps):
            for design, fail in (cases if rep % 2 == 0 else cases[::-1]):
                tag = f"{design}-{'fail' if fail else 'ok'}-{rep}"
                wall, first = run(design, fail, root, tag, common, args.kill_at)
                walls[(design, fail)].append(wall)
                survivor[(design, fail)].append(first)
                print(f"  {tag}: {walls[(design, fail)][-1]:.1f} s (at {time.perf_counter() - t0:.0f} s, load "
                      f"{os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    names = {"jobs": "across jobs (a job per group)", "one": "one job (both groups)"}
    rows, out = [], {}
    for design in ("jobs", "one"):
        ok, bad = median(walls[(design, False)]), median(walls[(design, True)])
        ok0, bad0 = median(survivor[(design, False)]), median(survivor[(design, True)])
        rows.append([names[design], f"{ok:.1f}", f"{bad:.1f}", f"{bad / ok:.2f}", f"{ok0:.1f}", f"{bad0:.1f}",
                     f"{bad0 / ok0:.2f}"])
        out[design] = {"both_groups": round(bad / ok, 3), "surviving_group": round(bad0 / ok0, 3)}
    print(f"# losing a group once: 2 groups of 1 rank, digits, mlp, {args.steps} steps, checkpoint every "
          f"{args.checkpoint_every}, kill -9 at step {args.kill_at} of group 1, restarted at once; "
          f"{args.reps} interleaved repetitions")
    print(f"# {machine(2)}; {time.perf_counter() - t0:.0f} s")
    print(table(["design", "both done s, no failure", "one failure", "ratio", "group 0 done s, no failure",
                 "one failure", "ratio"], rows))
    if args.json:
        print(json.dumps({"failure_over_no_failure": out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
