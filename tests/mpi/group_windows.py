"""Two groups of 3 allocate RMA windows on their own communicators at the same start-up moment,
many times over (the osc/rdma backing-file clash between sibling communicators), then each rank
accumulates 10**world_rank into its group's vector: the sums show the windows are the group's own."""

import json
import sys

import numpy as np

from hpcdistill.comm.rma import MPI, ShardedVector, in_turn
from hpcdistill.comm.wait import polite_barrier

world = MPI.COMM_WORLD
group = world.Get_rank() // 3
gc = world.Split(group, world.Get_rank())
vectors = [in_turn(world, group, 2, lambda: ShardedVector(gc, [0], 16, np.float64)) for _ in range(int(sys.argv[2]))]
vec = vectors[-1]
vec.accumulate(np.full(16, 10.0 ** world.Get_rank()))
polite_barrier(gc)
out = np.empty(16)
vec.get(out)
rows = world.gather({"rank": world.Get_rank(), "group": group, "sum": float(out[0])})
for v in vectors:
    v.free()
if world.Get_rank() == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(rows, f)
