"""k of G peers (HPCDISTILL_PEERS): step time and exchange-file bytes read per exchange, for G groups of
one rank with k = 1, 2 and G-1, from real `hpcdistill train` runs.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/codistill_peers.py [--groups 2,4,8] [--reps 2]

For each G, the k values run in the same sweep, alternating order repetition by repetition (ABAB ...),
so that noise hits them alike; the ratio column is against k = G-1 (every peer: the default) at the
same G. Step time: median over all LOG_EVERY-step intervals after burn-in (metrics records) of every
group and repetition. Bytes read per exchange: summary.json's codistill.exchange_bytes_read (the files
each group's leader opened) / exchanges (refreshes at exchange steps), per group; "files" divides it
by the size of one exchange file. Teachers per step: k, the number of teacher forward passes.
With G ranks on 2 cores (G > 2 oversubscribes), the absolute step times measure contention as much
as work; the ratios at one G are the result.
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

from codistill_overhead import step_times, wait_all  # noqa: E402

from hpcdistill.launch import HPCDISTILL, job_env, mpirun_command  # noqa: E402

from _common import human_bytes, machine, median, prepared, table  # noqa: E402


def run(groups: int, k: int, root: Path, tag: str, common: dict) -> dict:
    run_dir, log = root / tag, root / f"{tag}.log"
    env = job_env(**common, HPCDISTILL_MODE="codistill", HPCDISTILL_GROUPS=groups, HPCDISTILL_PEERS=k,
                  HPCDISTILL_RUN_DIR=run_dir)
    with open(log, "w") as out:
        proc = subprocess.Popen(mpirun_command(groups, HPCDISTILL, "train"), env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    wait_all([proc], [log])
    summary = json.loads((run_dir / "summary.json").read_text())
    size = next((run_dir / "exchange" / "group-0").glob("step-*.h5")).stat().st_size
    return {"run": run_dir, "summary": summary, "file": size}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--groups", default="2,4,8")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--exchange-every", type=int, default=20)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--model", default="mlp")
    p.add_argument("--json", action="store_true", help="print one JSON object last")
    p.add_argument("--data-dir", default=os.environ.get("HPCDISTILL_DATA_DIR", "datasets"))
    args = p.parse_args()
    data_dir = prepared(args.data_dir)
    burn_in = args.exchange_every
    common = dict(HPCDISTILL_DATA_DIR=data_dir, HPCDISTILL_STEPS=args.steps, HPCDISTILL_RESUME="never",
                  HPCDISTILL_MODEL=args.model, HPCDISTILL_EXCHANGE_EVERY=args.exchange_every,
                  HPCDISTILL_BURN_IN=burn_in, HPCDISTILL_LOG_EVERY=10, HPCDISTILL_EVAL_EVERY=10 * args.steps,
                  HPCDISTILL_CHECKPOINT_EVERY=10 * args.steps, HPCDISTILL_TENSORBOARD="false")
    Path("runs").mkdir(exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="bench-peers-", dir=Path("runs").resolve()))
    t0 = time.perf_counter()
    rows, out = [], {}
    try:
        for groups in (int(g) for g in args.groups.split(",")):
            ks = sorted({k for k in (1, 2, groups - 1) if 1 <= k <= groups - 1})
            res = {k: {"intervals": [], "bytes": [], "file": 0, "acc": []} for k in ks}
            for rep in range(args.reps):
                for k in (ks if rep % 2 == 0 else ks[::-1]):
                    r = run(groups, k, root, f"g{groups}-k{k}-{rep}", common)
                    c = r["summary"]["codistill"]
                    for g in range(groups):
                        res[k]["intervals"] += step_times(r["run"] / f"metrics-g{g}.jsonl", burn_in)[0]
                    res[k]["bytes"].append(c["exchange_bytes_read"] / max(1, c["exchanges"]))
                    res[k]["file"] = r["file"]
                    res[k]["acc"] += [x["test_accuracy"] for x in r["summary"]["groups"]]
                    print(f"  G={groups} k={k} rep {rep} done at {time.perf_counter() - t0:.0f} s, load "
                          f"{os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
                    shutil.rmtree(r["run"], ignore_errors=True)
            base = median(res[groups - 1]["intervals"])
            for k in ks:
                step, per_exchange = median(res[k]["intervals"]), median(res[k]["bytes"])
                rows.append([str(groups), str(k), f"{step * 1e3:.2f}", f"{step / base:.2f}",
                             human_bytes(per_exchange), f"{per_exchange / res[k]['file']:.2f}",
                             f"{median(res[k]['acc']):.4f}"])
                out[f"G={groups} k={k}"] = {"step_ratio": round(step / base, 3),
                                            "files_per_exchange": round(per_exchange / res[k]["file"], 3)}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"# k of G peers: digits, {args.model}, {args.steps} steps, exchange every {args.exchange_every}, "
          f"G groups of 1 rank (mpirun -np G), {args.reps} interleaved repetitions")
    print(f"# {machine()}; {time.perf_counter() - t0:.0f} s")
    print(table(["G", "k", "ms/step (median)", "ratio to k=G-1", "read per exchange per group",
                 "files", "test acc"], rows))
    if args.json:
        print(json.dumps({"peers": out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
