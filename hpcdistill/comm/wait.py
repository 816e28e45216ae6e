"""Waiting on MPI without spinning: poll a nonblocking request with short, growing sleeps.

Open MPI busy-polls in blocking calls; on a machine with more ranks than cores a rank that is only
waiting (a parameter host, a group that finished first, a rank at the end-of-run barrier) would take a
core from the ranks that still work. Works on any object with a `Test()` method (an mpi4py Request,
from `comm.Ibarrier()`, `comm.Iallreduce(...)`); imports neither MPI nor RMA.
"""

from __future__ import annotations

import time


def polite_wait(req, *, first: float = 0.0005, longest: float = 0.01) -> None:
    """Complete a nonblocking request by polling it (each Test drives MPI progress) with short sleeps
    that grow from `first` to `longest` seconds: no full core spent spinning, no blind long sleep."""
    pause = first
    while not req.Test():
        time.sleep(pause)
        pause = min(longest, pause * 2)


def polite_barrier(comm, *, first: float = 0.0005, longest: float = 0.01) -> None:
    """`comm.Barrier()` that sleeps instead of spinning while it waits (see `polite_wait`)."""
    polite_wait(comm.Ibarrier(), first=first, longest=longest)
