"""Horovod allreduce (hpcdistill's gradient path) vs raw MPI Allreduce, same buffers, same ranks.

    OMP_NUM_THREADS=1 mpirun --allow-run-as-root -np 2 .venv/bin/python benchmarks/allreduce.py
    OMP_NUM_THREADS=1 mpirun --allow-run-as-root --oversubscribe -np 4 .venv/bin/python benchmarks/allreduce.py

The communicators come from hpcdistill.comm.topology.build_topology, as in `hpcdistill train`: with G
groups (--groups, default 2 from 4 ranks up, else 1) every rank gets the MPI sub-communicator of its
group, and Horovod is initialised on it the way topology does it (`hvd.init(comm=group_comm)`:
each group its own Horovod; with one group that is the world). For each float32 buffer size (1 KB ..
64 MB): `comm.Allreduce(MPI.IN_PLACE, buf, SUM)` (mpi4py) and `hvd.allreduce_(tensor, op=hvd.Sum)`
on the same memory (the tensor is a view of the numpy buffer), in the group (every group at once)
and in the world (COMM_WORLD vs Horovod initialised on it). Repetitions alternate raw-MPI and
Horovod phases (M H H M ...), each phase going through every size; Horovod is initialised for its
phases only and shut down after them, since its idle background thread would otherwise slow the
MPI phases down. A sample is the mean time of `iters` back-to-back
calls (about --sample-ms long, the same count for both paths), the slowest rank's; the table gives the
median over repetitions, the algorithm bandwidth
(bytes / time) and the ratio Horovod/MPI of the bandwidths (> 1: Horovod faster); the "best" columns are the fastest
sample of each (what an idle machine approaches when other work adds noise).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from hpcdistill.comm.topology import build_topology, init_horovod  # noqa: E402

from _common import human_bytes, machine, median, table  # noqa: E402


def timed(comm, fn, iters: int) -> float:
    """Mean seconds per call of the slowest rank, after a barrier lines the ranks up."""
    comm.Barrier()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    dt = (time.perf_counter() - t) / iters
    return comm.allreduce(dt, op=MPI.MAX)


def main() -> int:
    global MPI
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--groups", type=int, default=None)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--min-kb", type=int, default=1)
    p.add_argument("--max-mb", type=int, default=64)
    p.add_argument("--sample-ms", type=float, default=30.0, help="length of one timed sample")
    p.add_argument("--json", action="store_true", help='print last one JSON object {"ratio": {"1 MB": r, ...}}, '
                   "r = raw MPI time / Horovod time on the first communicator of the tables (the group, or the world)")
    args = p.parse_args()

    from mpi4py import MPI  # initialised by build_topology (thread level multiple, yield when idle)

    size = int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1"))
    groups = args.groups or (2 if size >= 4 else 1)
    topo = build_topology(groups, horovod=False)  # the communicators, as `hpcdistill train` makes them
    import horovod.torch as hvd

    world, rank = topo.world, topo.rank
    comms = [("world", world)] + ([(f"group of {topo.group_size}", topo.group_comm)] if groups > 1 else [])
    comms.reverse()  # the group first when there is one

    def horovod_for(name):
        """Initialise Horovod for one communicator as hpcdistill.comm.topology does it (each group its
        own Horovod on its sub-communicator; with one group that is the world); its process set."""
        init_horovod(world if name == "world" else topo.group_comm)
        return hvd.global_process_set

    sizes = []
    n = args.min_kb * 1024
    while n <= args.max_mb * 1024 * 1024:
        sizes.append(n)
        n *= 4
    buf = np.zeros(max(sizes) // 4, np.float32)
    tensor = torch.from_numpy(buf)

    def ops(comm, nbytes, ps=None):
        count = nbytes // 4
        view, tview = buf[:count], tensor[:count]
        if ps is None:
            return lambda: comm.Allreduce(MPI.IN_PLACE, view, op=MPI.SUM)
        return lambda: hvd.allreduce_(tview, op=hvd.Sum, process_set=ps, name=f"bench.{nbytes}")

    # correctness once per communicator (ones sum to its size on both paths), and the iterations per
    # sample: about --sample-ms of the slower path, the same count for both paths
    iters = {}
    for name, comm in comms:
        ps = horovod_for(name)
        buf[:256] = 1
        comm.Allreduce(MPI.IN_PLACE, buf[:256], op=MPI.SUM)
        ok_mpi = np.all(buf[:256] == comm.Get_size())
        buf[:256] = 1
        hvd.allreduce_(tensor[:256], op=hvd.Sum, process_set=ps, name="check")
        ok_hvd = np.all(buf[:256] == comm.Get_size())
        assert ok_mpi and ok_hvd, (name, ok_mpi, ok_hvd)
        buf[:] = 1  # written once: every page is mapped before timing
        buf[:] = 0  # zeros: sums stay 0 (no overflow, no denormals), work per element unchanged
        for nbytes in sizes:
            mpi_op, hvd_op = ops(comm, nbytes), ops(comm, nbytes, ps)
            for _ in range(2):  # warm-up (Horovod negotiates a new tensor name once, then caches it)
                mpi_op(), hvd_op()
            per_call = max(timed(world, mpi_op, 3), timed(world, hvd_op, 3))
            iters[(name, nbytes)] = world.bcast(max(1, min(200, int(args.sample_ms / 1e3 / per_call))), root=0)
        hvd.shutdown()

    # Phases alternate (M H H M M H ...), per communicator. Horovod is initialised for its phases only:
    # while it is up, its background thread keeps calling MPI every cycle (HOROVOD_CYCLE_TIME), and
    # under MPI_THREAD_MULTIPLE those calls compete with the main thread's MPI_Allreduce for MPI's
    # progress engine and for the core; the raw MPI phases run without it.
    results = {(name, nbytes): {"mpi": [], "hvd": []} for name, _ in comms for nbytes in sizes}
    t_start = time.perf_counter()
    for rep in range(args.reps):
        for name, comm in comms:
            for impl in (("mpi", "hvd") if rep % 2 == 0 else ("hvd", "mpi")):
                ps = horovod_for(name) if impl == "hvd" else None
                for nbytes in sizes:
                    fn = ops(comm, nbytes, ps)
                    fn()  # one untimed call (Horovod: the tensor name is negotiated again after init)
                    results[(name, nbytes)][impl].append(timed(world, fn, iters[(name, nbytes)]))
                if ps is not None:
                    hvd.shutdown()
        if rank == 0:
            print(f"  rep {rep} done at {time.perf_counter() - t_start:.1f} s", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - t_start
    sets = [(name, comm, None) for name, comm in comms]

    if rank == 0:
        print(f"# allreduce: Horovod {__import__('horovod').__version__} vs mpi4py {__import__('mpi4py').__version__} "
              f"({MPI.Get_library_version().replace(chr(0), '').splitlines()[0].strip()})")
        print(f"# {machine(size)}")
        print(f"# world {size} ranks, {groups} group(s); float32 SUM in place; median of {args.reps} "
              f"interleaved repetitions; {elapsed:.0f} s")
        for name, comm, _ in sets:
            rows = []
            for nbytes in sizes:
                r = results[(name, nbytes)]
                tm, th = median(r["mpi"]), median(r["hvd"])
                bm, bh = min(r["mpi"]), min(r["hvd"])
                rows.append([human_bytes(nbytes), f"{tm * 1e6:.0f}", f"{nbytes / tm / 1e9:.2f}",
                             f"{th * 1e6:.0f}", f"{nbytes / th / 1e9:.2f}", f"{tm / th:.2f}",
                             f"{bm * 1e6:.0f}", f"{bh * 1e6:.0f}", f"{bm / bh:.2f}"])
            print(f"\n## {name} ({comm.Get_size()} ranks): raw MPI vs Horovod on this communicator")
            print(table(["size", "MPI us", "MPI GB/s", "Horovod us", "Horovod GB/s", "Horovod/MPI",
                         "best MPI us", "best Horovod us", "best Horovod/MPI"], rows))
        if args.json:
            import json

            name = comms[0][0]
            print(json.dumps({"ratio": {human_bytes(n): round(median(results[(name, n)]["mpi"]) /
                                                           median(results[(name, n)]["hvd"]), 3) for n in sizes},
                              "communicator": name, "horovod_env": {k: v for k, v in sorted(os.environ.items())
                                                                    if k.startswith("HOROVOD_")}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
