"""Build the topology for N groups and report, per rank, what it sees (rank 0 writes JSON to argv[2])."""

import json
import sys

import torch

from hpcdistill.comm.topology import build_topology

groups = int(sys.argv[1])
topo = build_topology(groups)
import horovod.torch as hvd  # noqa: E402  (initialised by build_topology)

summed = hvd.allreduce(torch.tensor([float(10 ** topo.rank)]), op=hvd.Sum, process_set=topo.process_set).item()
row = {"rank": topo.rank, "group": topo.group, "group_rank": topo.group_rank, "group_size": topo.group_size,
       "group_ranks": topo.group_ranks, "leader": topo.is_leader, "leader_world_rank": topo.leader_world_rank,
       "allreduce": summed, "group_comm_size": topo.group_comm.Get_size(),
       "in_leaders_comm": topo.leaders_comm is not None, "device": str(topo.device), "tag": topo.tag()}
rows = topo.world.gather(row, root=0)
if topo.rank == 0:
    with open(sys.argv[2], "w") as f:
        json.dump(rows, f)
