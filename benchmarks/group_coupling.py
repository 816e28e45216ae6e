"""Are codistilling groups independent under Horovod? A diagnostic, with an alternative.

    OMP_NUM_THREADS=1 mpirun --allow-run-as-root -np 2 .venv/bin/python benchmarks/group_coupling.py
    OMP_NUM_THREADS=1 mpirun --allow-run-as-root --oversubscribe -np 4 .venv/bin/python benchmarks/group_coupling.py

The world is split into 2 groups (hpcdistill.comm.topology.build_topology). The ranks of group 0
time an allreduce inside their own group, normally and while the last rank of the world (in group
1) is stopped with SIGSTOP for `--stop` seconds (then SIGCONT), the way a straggler or a preempted
node would stall. Two set-ups, one after the other in the same job:

- "process sets": hvd.init(comm=COMM_WORLD, process_sets=[one per group]), as hpcdistill did until
  commit 1dbac8e (one world-wide Horovod, a process set per group);
- "per-group init": hvd.init(comm=group_comm), each group its own Horovod, as
  hpcdistill.comm.topology does it now.

Also the CPU time that an idle Horovod costs (getrusage over `--idle` seconds of sleep, all of the
process's threads; Horovod's background thread runs a negotiation cycle every HOROVOD_CYCLE_TIME).
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from hpcdistill.comm.topology import build_topology, init_horovod  # noqa: E402

from _common import machine, table  # noqa: E402


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stop", type=float, default=2.0)
    p.add_argument("--idle", type=float, default=3.0)
    args = p.parse_args()
    topo = build_topology(2, horovod=False)
    import horovod.torch as hvd

    world, rank = topo.world, topo.rank
    pids = world.allgather(os.getpid())
    rows = []
    for setup in ("process sets", "per-group init"):
        if setup == "process sets":
            per = topo.group_size
            sets = [hvd.ProcessSet(list(range(g * per, (g + 1) * per))) for g in range(2)]
            hvd.init(comm=world, process_sets=sets)
            ps = sets[topo.group]
        else:
            ps = init_horovod(topo.group_comm)
        t = torch.ones(1024)
        for _ in range(3):
            hvd.allreduce_(t, process_set=ps, name="probe")
        # idle cost: every rank sleeps; CPU time of the whole process meanwhile
        world.Barrier()
        c0, w0 = cpu_seconds(), time.perf_counter()
        time.sleep(args.idle)
        idle = (cpu_seconds() - c0) / (time.perf_counter() - w0)
        idle_all = world.gather(idle, root=0)
        world.Barrier()
        normal = stalled = None
        if topo.group == 0:
            a = time.perf_counter()
            hvd.allreduce_(t, process_set=ps, name="probe")
            normal = time.perf_counter() - a
            if rank == 0:
                os.kill(pids[-1], signal.SIGSTOP)
                threading.Timer(args.stop, lambda: os.kill(pids[-1], signal.SIGCONT)).start()
            topo.group_comm.Barrier()
            time.sleep(0.1)
            a = time.perf_counter()
            hvd.allreduce_(t, process_set=ps, name="probe")
            stalled = time.perf_counter() - a
        world.Barrier()  # the stopped rank is back
        if rank == 0:
            rows.append([setup, f"{topo.size} ranks, groups of {topo.group_size}", f"{normal * 1e3:.2f}",
                         f"{stalled * 1e3:.1f}", f"{args.stop * 1e3:.0f}",
                         " / ".join(f"{x * 100:.0f}" for x in idle_all)])
        hvd.shutdown()
    if rank == 0:
        print(f"# group coupling: allreduce inside group 0 while a rank of group 1 is stopped; Horovod "
              f"{__import__('horovod').__version__}, "
              f"HOROVOD_CYCLE_TIME={os.environ.get('HOROVOD_CYCLE_TIME', 'default')}")
        print(f"# {machine(topo.size)}")
        print(table(["Horovod set-up", "world", "allreduce ms", "same, other group stopped: ms", "stop ms",
                     "idle CPU % of a core, per rank"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
