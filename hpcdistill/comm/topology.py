"""World -> groups -> Horovod process sets, leaders and devices.

A codistillation's groups may live in one job or in several (GROUP_OFFSET, LOCAL_GROUPS): a job's
world is split among its own groups only, numbered across the codistillation; jobs meet only in the
exchange directory. Codistillation splits MPI_COMM_WORLD into equal, contiguous groups (contiguous so that a group
tends to share a node and its allreduce stays on the fast links). Each group gets its own MPI
sub-communicator (for RMA windows and broadcasts) and its own Horovod on it (for gradient
allreduce; the group is that Horovod's process set). Rank 0 of each group is its leader: the only
rank that touches the exchange directory
and the only one that speaks in the logs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch


@dataclass
class Topology:
    world: "object"            # MPI.Comm
    rank: int
    size: int
    num_groups: int            # the codistillation's groups, in every job of it
    group: int                 # this rank's group, numbered across the codistillation
    group_comm: "object"       # MPI.Comm of this rank's group
    group_rank: int
    group_size: int
    group_ranks: list[int]     # world ranks of this group, in group-rank order
    local_rank: int
    device: torch.device
    process_set: "object" = field(default=None, repr=False)   # hvd.ProcessSet of this group
    leaders_comm: "object" = field(default=None, repr=False)  # leaders only (None elsewhere)
    group_offset: int = 0      # the first group this job trains (a codistillation spanning jobs)
    local_groups: int = 0      # how many groups this job trains (0: num_groups)

    def __post_init__(self):
        self.local_groups = self.local_groups or self.num_groups

    @property
    def local_group(self) -> int:
        """This rank's group among the job's own groups (0 .. local_groups-1)."""
        return self.group - self.group_offset

    @property
    def is_leader(self) -> bool:
        return self.group_rank == 0

    @property
    def leader_world_rank(self) -> int:
        return self.group_ranks[0]

    def tag(self) -> str:
        """Log prefix naming the group and the ranks: "[g1 r0/2 w2]"."""
        return f"[g{self.group} r{self.group_rank}/{self.group_size} w{self.rank}]"


def init_mpi():
    """Initialise MPI with MPI_THREAD_MULTIPLE (Horovod's background thread needs it).

    Open MPI busy-polls while waiting; with more ranks than cores (laptops, CI, a straggler test)
    the waiting ranks then starve the working ones (measured here: a 2-group codistill run on 4 ranks
    and 2 cores took 27 s instead of 6 s). Yielding when idle costs next to nothing when a rank has
    its core to itself, so it is the default; export OMPI_MCA_mpi_yield_when_idle=0 to opt out.
    """
    os.environ.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
    import mpi4py

    mpi4py.rc.thread_level = "multiple"
    from mpi4py import MPI

    return MPI


def build_topology(local_groups: int, *, offset: int = 0, num_groups: int | None = None,
                   horovod: bool = True, device: str = "auto") -> Topology:
    """Split this job's world into `local_groups` groups, numbered from `offset` among the `num_groups`
    of the codistillation (default: this job trains them all), and set Horovod up on them (collective)."""
    MPI = init_mpi()
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    if size % local_groups:
        raise ValueError(f"world size {size} is not divisible by {local_groups} groups")
    num_groups = num_groups or local_groups
    per = size // local_groups
    group = offset + rank // per
    group_comm = world.Split(color=rank // per, key=rank)
    node_comm = world.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local_rank = node_comm.Get_rank()
    node_comm.Free()
    leaders_comm = world.Split(color=0 if rank % per == 0 else MPI.UNDEFINED, key=rank)
    if leaders_comm == MPI.COMM_NULL:
        leaders_comm = None
    topo = Topology(
        world=world, rank=rank, size=size, num_groups=num_groups, group=group,
        group_comm=group_comm, group_rank=group_comm.Get_rank(), group_size=per,
        group_ranks=list(range((group - offset) * per, (group - offset + 1) * per)), local_rank=local_rank,
        device=_device(local_rank, device), leaders_comm=leaders_comm, group_offset=offset, local_groups=local_groups,
    )
    if horovod:
        topo.process_set = init_horovod(group_comm)
    return topo


def cuda_visible() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def _device(local_rank: int, want: str = "auto") -> torch.device:
    """HPCDISTILL_DEVICE: "auto" is one GPU per local rank where CUDA is visible, else the CPU; "cuda"
    without a visible GPU was refused before MPI started (preflight)."""
    if want != "cpu" and cuda_visible():
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
        return dev
    # Two ranks per core on small machines: more intra-op threads only oversubscribe.
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    return torch.device("cpu")


def init_horovod(group_comm):
    """Each group its own Horovod, on its MPI sub-communicator: the group is Horovod's process set.

    Registering one process set per group on a world-wide Horovod couples the groups: its background
    thread negotiates across the whole world every cycle, so stopping one rank of group 1 for 2 s
    stalled group 0's allreduce for 2 s (docs/benchmarks.md, (e)). Codistillation exists so that
    groups do not wait for each other; nothing in the loop needs a world-wide Horovod (world-wide
    steps use MPI directly). With one group, the group communicator is the world.
    """
    import horovod.torch as hvd

    from hpcdistill.comm.horovod_env import apply_defaults

    apply_defaults()  # tuned knobs where the user set no HOROVOD_* variable (comm/horovod_env.py)
    hvd.init(comm=group_comm)
    return hvd.global_process_set
