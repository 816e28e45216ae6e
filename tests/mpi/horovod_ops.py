"""Horovod's collectives on the patched build (scripts/horovod-latency.patch: the loop wakes on enqueue,
synchronize() blocks on a condition variable), set up as hpcdistill does (comm.topology.init_horovod):
many named asynchronous allreduces in flight at once, grouped allreduce, broadcast, allgather, a poll
loop, join and barrier, 200 rounds; every rank checks every result. Prints "horovod ops OK <size>"."""

import torch

from hpcdistill.comm.topology import init_horovod, init_mpi

MPI = init_mpi()
init_horovod(MPI.COMM_WORLD)
import horovod.torch as hvd  # noqa: E402

rank, size = hvd.rank(), hvd.size()
total = sum(range(size))
for _ in range(200):
    handles = [hvd.allreduce_async(torch.full((k * 37 + 1,), float(rank)), op=hvd.Sum, name=f"t{k}")
               for k in range(8)]
    for h in handles:
        assert torch.all(hvd.synchronize(h) == total)
    out = hvd.grouped_allreduce([torch.full((5,), float(rank)), torch.ones(3)], op=hvd.Sum)
    assert torch.all(out[0] == total) and torch.all(out[1] == size)
    assert torch.all(hvd.broadcast(torch.full((4,), float(rank)), root_rank=0) == 0)
    assert hvd.allgather(torch.full((2,), float(rank))).tolist() == [float(i) for i in range(size) for _ in (0, 1)]
    h = hvd.allreduce_async(torch.ones(3), op=hvd.Sum, name="polled")
    while not hvd.poll(h):
        pass
    assert torch.all(hvd.synchronize(h) == size)
hvd.join()
hvd.barrier()
if rank == 0:
    print(f"horovod ops OK {size}", flush=True)
hvd.shutdown()
