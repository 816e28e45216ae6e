"""DC-ASGD's pull and push against a plain memory copy of the same bytes.

    OMP_NUM_THREADS=1 mpirun --allow-run-as-root -np 3 .venv/bin/python benchmarks/rma_pullpush.py

Rank 0 hosts a float32 vector in an MPI window (`hpcdistill.comm.rma.ShardedVector`, the weights
window of async mode); ranks 1.. are workers. For each size (the models' parameter counts, then
larger), a worker times, alternating repetition by repetition:

- copy: `np.copyto(dst, src)` of the same bytes in its own memory (the limit a pull can approach);
- pull: `ShardedVector.get` (Lock shared, Get, Unlock: what a worker does before computing);
- add:  `np.add(dst, src, out=dst)` (the arithmetic a push does, in local memory);
- push: `ShardedVector.accumulate` (Lock shared, Accumulate SUM, Unlock: the update).

Two phases: worker 1 alone (the others wait), then every worker at once (contention on the host's
memory and on the accumulate's per-element atomicity). The table gives medians per operation, the
ratio to the local baseline (pull/copy and push/add; 1.0 = at the copy limit) and GB/s.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from hpcdistill.comm.rma import MPI, ShardedVector  # noqa: E402
from hpcdistill.comm.wait import polite_barrier  # noqa: E402

from _common import human_bytes, machine, median, table  # noqa: E402

SIZES = [3_466, 85_002, 429_664, 1_829_088, 8_000_000]  # mlp-small, mlp, charlm, charlm-large, 8M (30.5 MB)


def timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def measure(vec: ShardedVector, n: int, reps: int, inner: int) -> dict[str, float]:
    """Median seconds per operation; `inner` operations per timed sample (small sizes are short)."""
    src = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    dst = np.empty_like(src)
    delta = np.full(n, 1e-7, np.float32)
    ops = {
        "copy": lambda: np.copyto(dst, src),
        "pull": lambda: vec.get(dst),
        "add": lambda: np.add(dst, src, out=dst),
        "push": lambda: vec.accumulate(delta),
    }
    samples = {k: [] for k in ops}
    for _ in range(reps):  # interleaved: copy, pull, add, push, copy, ...
        for name, op in ops.items():
            op()  # warm (first touch, lock set-up)
            samples[name] += [t / inner for t in timed(lambda: [op() for _ in range(inner)], 1)]
    return {k: median(v) for k, v in samples.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="float32 element counts")
    args = ap.parse_args()
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    if size < 2:
        print("run under mpirun with at least 2 ranks (1 host + workers)", file=sys.stderr)
        return 2
    workers = world.Split(0 if rank else MPI.UNDEFINED, rank)
    t_all = time.perf_counter()
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        vec = ShardedVector(world, [0], n)
        inner = max(1, int(2_000_000 // max(n, 1)))
        results = {}
        for phase in ("alone", "together"):
            if rank == 0:
                polite_barrier(world)  # the host only keeps MPI progressing
                continue
            active = phase == "together" or rank == 1
            res = measure(vec, n, args.reps, inner) if active else None
            got = workers.gather(res, root=0)
            if rank == 1:
                results[phase] = [r for r in got if r is not None]
            polite_barrier(world)
        if rank == 1:
            nbytes = 4 * n
            for phase, per_worker in results.items():
                m = {k: median([r[k] for r in per_worker]) for k in per_worker[0]}
                gbs = lambda t: f"{nbytes / t / 1e9:.2f}"  # noqa: E731
                rows.append([human_bytes(nbytes), f"{n:,}", f"{phase} ({len(per_worker)})",
                             f"{m['copy'] * 1e6:.1f}", f"{m['pull'] * 1e6:.1f}", f"{m['pull'] / m['copy']:.2f}",
                             f"{m['add'] * 1e6:.1f}", f"{m['push'] * 1e6:.1f}", f"{m['push'] / m['add']:.2f}",
                             gbs(m["copy"]), gbs(m["pull"]), gbs(m["push"])])
        vec.free()
    if rank == 1:
        print(f"# RMA pull/push vs local memory: hpcdistill ShardedVector "
              f"(MPI.Win.Allocate, Lock/Get|Accumulate/Unlock), "
              f"{MPI.Get_library_version().replace(chr(0), '').splitlines()[0].strip()}")
        print(f"# {machine(size)}")
        print(f"# 1 host (rank 0), {size - 1} worker(s); float32; median of {args.reps} interleaved repetitions "
              f"(per-worker medians, then the median over workers); {time.perf_counter() - t_all:.0f} s")
        print()
        print(table(["bytes", "elements", "workers", "copy us", "pull us", "pull/copy", "add us", "push us",
                     "push/add", "copy GB/s", "pull GB/s", "push GB/s"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
