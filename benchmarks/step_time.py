"""Sync training step time: hpcdistill's path (Horovod DistributedOptimizer over a process set) vs
PyTorch DDP on gloo, same model, batch, optimizer and ranks.

    OMP_NUM_THREADS=1 mpirun --allow-run-as-root -np 2 .venv/bin/python benchmarks/step_time.py

One job, both implementations, alternating phase by phase (H D D H H D ...): each phase builds a
fresh replica of the same initial model and runs `--warmup` untimed then `--steps` timed steps on a
fixed synthetic batch of the dataset's shape (digits: 32 x 1x8x8 images, 10 classes; text: 32 x 64
token ids, vocabulary 96), per rank. A step is zero_grad, forward, cross-entropy, backward, optimizer
step (SGD with momentum for `mlp`, AdamW for `charlm`, as `hpcdistill train` picks them).

- Horovod: `hpcdistill.strategies.sync.SyncUpdater` (hvd.DistributedOptimizer with the group's
  process set), Horovod initialised by hpcdistill.comm.topology's `init_horovod` on the group's
  communicator, which for one group is the world.
  Horovod is initialised at the start of each of its phases and shut down at the end, because its
  background thread keeps polling while idle (measured here: 20-27 % of a core per rank) and would
  otherwise slow the DDP phases down.
- DDP: `torch.nn.parallel.DistributedDataParallel` over `torch.distributed` with the gloo backend,
  initialised once from the MPI environment (MASTER_ADDR=127.0.0.1, a free port chosen by rank 0,
  rank and world size from mpi4py).

The time of a phase is that of its slowest rank; the table gives the median over repetitions and
the ratio to DDP of the median step times (< 1: faster than DDP), and the same for the fastest
phase of each ("best": what an idle machine approaches when other work adds noise), and the CPU
time per step of a rank's process (all its threads: Horovod's background thread, gloo's).
`--cycle-times 0.2,...` adds Horovod variants with HOROVOD_CYCLE_TIME (ms) set.
"""

from __future__ import annotations

import argparse
import copy
import os
import socket
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from hpcdistill.comm.topology import init_horovod, init_mpi  # noqa: E402
from hpcdistill.models import count_parameters, resolve_model  # noqa: E402

from _common import machine, median, table  # noqa: E402

SHAPES = {  # model -> (kind, input_shape, classes)
    "mlp": ("image", (1, 8, 8), 10),
    "cnn": ("image", (1, 8, 8), 10),
    "charlm": ("sequence", (64,), 96),
}


def make_batch(model_name: str, batch: int, seed: int):
    kind, shape, classes = SHAPES[model_name]
    g = torch.Generator().manual_seed(seed)
    if kind == "image":
        return torch.randn(batch, *shape, generator=g), torch.randint(0, classes, (batch,), generator=g)
    x = torch.randint(0, classes, (batch, *shape), generator=g)
    return x, torch.randint(0, classes, (batch, *shape), generator=g)


def make_optimizer(kind: str, params):
    if kind == "sequence":
        return torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def loss_of(model, x, y):
    z = model(x)
    return F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1))


def timed_phase(world, one, warmup, steps) -> tuple[float, float]:
    """(wall seconds per step of the slowest rank, CPU seconds per step of the process, all its
    threads, mean over ranks)."""
    for _ in range(warmup):
        one()
    world.Barrier()
    t, c = time.perf_counter(), time.process_time()
    for _ in range(steps):
        one()
    dt, dc = (time.perf_counter() - t) / steps, (time.process_time() - c) / steps
    return world.allreduce(dt, op=MPI.MAX), world.allreduce(dc) / world.Get_size()


def run_horovod(world, base, kind, x, y, warmup, steps, cycle_ms=None) -> float:
    import horovod.torch as hvd

    from hpcdistill.strategies.sync import SyncUpdater

    if cycle_ms is None:
        os.environ.pop("HOROVOD_CYCLE_TIME", None)
    else:
        os.environ["HOROVOD_CYCLE_TIME"] = str(cycle_ms)
    init_horovod(world)  # what comm.topology does for a single group (the group is the world)
    model = copy.deepcopy(base)
    updater = SyncUpdater(SimpleNamespace(group_comm=world, process_set=hvd.global_process_set),
                          model, make_optimizer(kind, model.parameters()))

    def one():
        updater.step(model, lambda: (loss := loss_of(model, x, y), {"loss": loss}), lr=0.01)

    result = timed_phase(world, one, warmup, steps)
    hvd.shutdown()
    return result


def run_ddp(world, base, kind, x, y, warmup, steps) -> float:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(copy.deepcopy(base))
    opt = make_optimizer(kind, model.parameters())

    def one():
        for g in opt.param_groups:
            g["lr"] = 0.01
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()

    return timed_phase(world, one, warmup, steps)


def main() -> int:
    global MPI
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="mlp,charlm")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--phase-seconds", type=float, default=1.0, help="about how long one timed phase runs")
    p.add_argument("--cycle-times", default="",
                   help="extra Horovod variants with HOROVOD_CYCLE_TIME set to these ms (comma-separated)")
    args = p.parse_args()

    MPI = init_mpi()
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    import torch.distributed as dist

    port = None
    if rank == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    port = world.bcast(port, root=0)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=size)

    results = []
    t_all = time.perf_counter()
    for name in args.models.split(","):
        kind, shape, classes = SHAPES[name]
        torch.manual_seed(0)
        base = resolve_model(name, kind=kind).build(shape, classes)
        x, y = make_batch(name, args.batch_size, seed=1 + rank)
        # calibrate: steps per phase so that a phase lasts about --phase-seconds
        probe = run_ddp(world, base, kind, x, y, 2, 3)[0]
        steps = max(5, min(1000, int(args.phase_seconds / probe)))
        steps = world.bcast(steps, root=0)
        impls = ["ddp", "horovod"] + [f"horovod@{c}" for c in args.cycle_times.split(",") if c]
        times = {i: [] for i in impls}
        cpu = {i: [] for i in impls}
        for rep in range(args.reps):
            for impl in (impls if rep % 2 == 0 else impls[::-1]):
                if impl == "ddp":
                    dt, dc = run_ddp(world, base, kind, x, y, args.warmup, steps)
                else:
                    cycle = float(impl.split("@")[1]) if "@" in impl else None
                    dt, dc = run_horovod(world, base, kind, x, y, args.warmup, steps, cycle)
                times[impl].append(dt)
                cpu[impl].append(dc)
            if rank == 0:
                print(f"  {name} rep {rep}: " + ", ".join(f"{i} {times[i][-1] * 1e3:.2f} ms" for i in impls),
                      file=sys.stderr, flush=True)
        td, bd = median(times["ddp"]), min(times["ddp"])
        for impl in impls:
            t, b = median(times[impl]), min(times[impl])
            label = "DDP (gloo)" if impl == "ddp" else (
                "Horovod (hpcdistill)" if impl == "horovod" else f"Horovod, HOROVOD_CYCLE_TIME={impl.split('@')[1]}")
            results.append([name, f"{count_parameters(base):,}", label, str(steps), f"{t * 1e3:.2f}",
                            f"{t / td:.2f}", f"{b * 1e3:.2f}", f"{b / bd:.2f}", f"{median(cpu[impl]) * 1e3:.2f}"])
    elapsed = time.perf_counter() - t_all
    if rank == 0:
        print(f"# step time: Horovod {__import__('horovod').__version__} (hpcdistill SyncUpdater) vs "
              f"torch {torch.__version__} DDP/gloo")
        print(f"# {machine(size)}")
        print(f"# {size} ranks, batch {args.batch_size} per rank, median of {args.reps} interleaved phases "
              f"(steps each as in the table); {elapsed:.0f} s")
        print(table(["model", "params", "implementation", "steps/phase", "ms/step", "vs DDP", "best ms/step",
                     "best vs DDP", "CPU ms/step"], results))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
