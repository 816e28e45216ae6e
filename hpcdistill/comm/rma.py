"""MPI one-sided (RMA) windows for asynchronous training: parameter shards, counters, clocks, flags.

Everything here is passive-target: the ranks that own the memory ("hosts") never take part in an
access; workers Lock / Get / Accumulate / Unlock on their own schedule. All windows are allocated
with ``MPI.Win.Allocate`` on one communicator (a group's), which is collective: every rank of the
communicator constructs every window, and ranks that host nothing allocate 0 bytes.

- ``ShardedVector``: a flat float32 vector (the model's parameters) cut into contiguous shards, one
  per host rank. ``get`` (shared locks), ``accumulate`` (shared locks, element-wise atomic SUM),
  ``put`` and ``snapshot`` (exclusive locks, taken in increasing host order: a consistent copy).
  ``accumulate(then=f)`` runs f (counter updates) before it releases its shared locks and
  ``snapshot(also=f)`` runs f (counter reads) under its exclusive locks: a snapshot's counters count
  exactly the updates that are in its copy.
- ``AtomicInt64Array``: a small int64 array on one rank, read and written only with atomic RMA
  (Fetch_and_op, Get_accumulate with NO_OP, Accumulate with REPLACE): the global version counter
  (fetch-and-add), per-worker clocks, finished flags and the stop flag.

Buffers are flat numpy views: one MPI call per host shard, never one per parameter.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

import numpy as np

from hpcdistill.comm.shards import shard_bounds
from hpcdistill.comm.topology import init_mpi

MPI = init_mpi()

_MPI_TYPES = {np.dtype(np.float32): MPI.FLOAT, np.dtype(np.float64): MPI.DOUBLE,
              np.dtype(np.int64): MPI.INT64_T}


def in_turn(world, group: int, num_groups: int, make):
    """Run the collective `make()` (window allocation on a group's communicator) one group at a time.

    Open MPI 4.1's osc/rdma names the shared-memory file behind a window after the job id and the
    communicator's context id only (5.0 adds the pid). Sibling communicators from one Split share a
    context id, so two groups on one node allocating windows at the same moment truncate and unlink
    each other's file: "A system call failed during shared memory initialization", then a hang.
    The file is unlinked once the group has attached, so taking turns (one world barrier per group,
    at start-up only) removes the clash on every MPI.
    """
    result = None
    for g in range(num_groups):
        if g == group:
            result = make()
        if num_groups > 1:
            world.Barrier()
    return result


@contextmanager
def locked(win, host: int, kind=None):
    """One passive-target access epoch on `host` (shared lock unless `kind` says otherwise): the
    operations issued inside are complete, at the origin and the target, when it ends (Unlock)."""
    win.Lock(host, MPI.LOCK_SHARED if kind is None else kind)
    try:
        yield win
    finally:
        win.Unlock(host)


def _local_array(win, dtype, count: int) -> np.ndarray:
    """The calling rank's own window memory as a numpy array (its host shard)."""
    if count == 0:
        return np.empty(0, dtype)
    return np.frombuffer(win.tomemory(), dtype=dtype, count=count)


class ShardedVector:
    """A flat vector of `n` elements sharded contiguously over `hosts` (ranks of `comm`).

    Shard i lives on the i-th host in increasing rank order. Collective on `comm` to build and free.
    """

    def __init__(self, comm, hosts, n: int, dtype=np.float32):
        self.comm, self.n = comm, int(n)
        self.hosts = sorted(int(h) for h in hosts)
        if not self.hosts or len(set(self.hosts)) != len(self.hosts):
            raise ValueError(f"bad host list {hosts!r}")
        if self.hosts[-1] >= comm.Get_size():
            raise ValueError(f"host rank {self.hosts[-1]} is outside a communicator of {comm.Get_size()}")
        self.dtype = np.dtype(dtype)
        self.mpi_type = _MPI_TYPES[self.dtype]
        self.bounds = shard_bounds(self.n, len(self.hosts))
        me = comm.Get_rank()
        mine = self.bounds[self.hosts.index(me)] if me in self.hosts else (0, 0)
        count = mine[1] - mine[0]
        self.win = MPI.Win.Allocate(count * self.dtype.itemsize, self.dtype.itemsize, comm=comm)
        if count:
            with locked(self.win, me, MPI.LOCK_EXCLUSIVE):
                _local_array(self.win, self.dtype, count)[:] = 0
        comm.Barrier()
        self._multi = len(self.hosts) > 1

    def _targets(self):
        for host, (lo, hi) in zip(self.hosts, self.bounds):
            yield host, lo, hi

    def _check(self, buf: np.ndarray) -> None:
        if buf.dtype != self.dtype or buf.shape != (self.n,) or not buf.flags.c_contiguous:
            raise ValueError(f"expected a contiguous {self.dtype} vector of {self.n}, got {buf.dtype} {buf.shape}")

    def get(self, out: np.ndarray) -> np.ndarray:
        """Read the whole vector into `out`, one shared-lock epoch per host. Concurrent accumulates
        are not excluded: elements are read whole, but the vector may mix versions (as in Hogwild)."""
        self._check(out)
        for host, lo, hi in self._targets():
            if hi > lo:
                with locked(self.win, host):
                    self.win.Get([out[lo:hi], self.mpi_type], host)
        return out

    def accumulate(self, delta: np.ndarray, then=None):
        """w += delta, element-wise atomic against other accumulates (MPI_Accumulate, SUM).

        Shared locks on every host are held together (taken in increasing rank order, each made
        effective by a flush before the next is taken), so an exclusive `snapshot` sees either all of
        this update or none of it. `then()` (if given) runs after the accumulates are complete at the
        targets and before the locks are released: counters updated there (version, clocks) are
        atomic with the update as far as `snapshot` is concerned. Returns what `then()` returns."""
        self._check(delta)
        with ExitStack() as held:
            for host, lo, hi in self._targets():
                if hi <= lo:
                    continue
                held.enter_context(locked(self.win, host))
                self.win.Accumulate([delta[lo:hi], self.mpi_type], host, op=MPI.SUM)
                if self._multi or then is not None:
                    self.win.Flush(host)
            return then() if then is not None else None

    def put(self, values: np.ndarray) -> None:
        """Overwrite the whole vector (exclusive locks; used to initialise or restore)."""
        self._check(values)
        for host, lo, hi in self._targets():
            if hi > lo:
                with locked(self.win, host, MPI.LOCK_EXCLUSIVE):
                    self.win.Put([values[lo:hi], self.mpi_type], host)

    def snapshot(self, out: np.ndarray, also=None):
        """A consistent copy: exclusive locks on every host in increasing rank order (each made
        effective by completing its Get before the next lock), then all released. No accumulate is
        in flight on any shard while the copy is taken, so every update is in it whole or not at all.
        `also()` (if given) runs while the exclusive locks are held (read the counters that
        `accumulate(then=...)` maintains: they match the copy exactly). Returns `out`, or
        (`out`, what `also()` returns) when `also` is given."""
        self._check(out)
        with ExitStack() as held:
            for host, lo, hi in self._targets():
                if hi <= lo:
                    continue
                held.enter_context(locked(self.win, host, MPI.LOCK_EXCLUSIVE))
                self.win.Get([out[lo:hi], self.mpi_type], host)
                self.win.Flush(host)
            extra = also() if also is not None else None
        return out if also is None else (out, extra)

    def free(self) -> None:
        if self.win is not None:
            self.win.Free()
            self.win = None


class AtomicInt64Array:
    """`length` int64 slots on rank `host` of `comm`, accessed only atomically (passive target).

    fetch_add(i, v) -> old value (MPI_Fetch_and_op SUM), read(i) (Fetch_and_op NO_OP),
    read_all() (Get_accumulate NO_OP: each element read atomically), set(i, v) (Accumulate REPLACE),
    write_all(values) (exclusive lock, Put: initialisation). Collective on `comm` to build and free.
    """

    def __init__(self, comm, host: int, length: int):
        self.comm, self.host, self.length = comm, int(host), int(length)
        if not 0 <= self.host < comm.Get_size():
            raise ValueError(f"host rank {host} is outside a communicator of {comm.Get_size()}")
        here = comm.Get_rank() == self.host
        self.win = MPI.Win.Allocate(8 * self.length if here else 0, 8, comm=comm)
        if here:
            with locked(self.win, self.host, MPI.LOCK_EXCLUSIVE):
                _local_array(self.win, np.int64, self.length)[:] = 0
        comm.Barrier()
        self._one = np.ones(1, np.int64)
        self._res = np.zeros(1, np.int64)
        self._dummy = np.zeros(self.length, np.int64)

    def _slot(self, i: int) -> int:
        if not 0 <= i < self.length:
            raise IndexError(f"slot {i} outside 0..{self.length - 1}")
        return i

    def fetch_add(self, i: int, value: int = 1) -> int:
        """Atomically add `value` to slot i; return the value before the addition."""
        origin = np.array([value], np.int64)
        with locked(self.win, self.host):
            self.win.Fetch_and_op([origin, MPI.INT64_T], [self._res, MPI.INT64_T], self.host, self._slot(i),
                                  op=MPI.SUM)
        return int(self._res[0])

    def read(self, i: int) -> int:
        with locked(self.win, self.host):
            self.win.Fetch_and_op([self._one, MPI.INT64_T], [self._res, MPI.INT64_T], self.host, self._slot(i),
                                  op=MPI.NO_OP)
        return int(self._res[0])

    def read_all(self) -> np.ndarray:
        out = np.empty(self.length, np.int64)
        with locked(self.win, self.host):
            self.win.Get_accumulate([self._dummy, MPI.INT64_T], [out, MPI.INT64_T], self.host, op=MPI.NO_OP)
        return out

    def set(self, i: int, value: int) -> None:
        origin = np.array([value], np.int64)
        with locked(self.win, self.host):
            self.win.Accumulate([origin, MPI.INT64_T], self.host, target=(self._slot(i), 1, MPI.INT64_T),
                                op=MPI.REPLACE)

    def write_all(self, values) -> None:
        values = np.ascontiguousarray(values, dtype=np.int64)
        if values.shape != (self.length,):
            raise ValueError(f"expected {self.length} values, got shape {values.shape}")
        with locked(self.win, self.host, MPI.LOCK_EXCLUSIVE):
            self.win.Put([values, MPI.INT64_T], self.host)

    def free(self) -> None:
        if self.win is not None:
            self.win.Free()
            self.win = None


class CounterWindow(AtomicInt64Array):
    """One int64 counter (the global version: updates applied so far) with fetch-and-add."""

    def __init__(self, comm, host: int):
        super().__init__(comm, host, 1)

    def increment(self) -> int:
        """+1; returns the value before (the number of updates that were counted before this one)."""
        return self.fetch_add(0, 1)

    def value(self) -> int:
        return self.read(0)


class ClockWindow(AtomicInt64Array):
    """Stop flag, per-worker clocks (updates done), per-worker finished flags and the round-robin
    turn (updates pushed and pulled in turn), on one rank.

    Layout: [stop, clock_0 .. clock_{W-1}, done_0 .. done_{W-1}, turn]; worker w writes only its own
    slots and the turn when it holds it, anyone raises the stop flag, everyone reads the whole array
    with one atomic read."""

    STOP = 0

    def __init__(self, comm, host: int, workers: int):
        self.workers = int(workers)
        self.TURN = 1 + 2 * self.workers
        super().__init__(comm, host, 2 + 2 * self.workers)

    def clock_slot(self, w: int) -> int:
        return 1 + w

    def done_slot(self, w: int) -> int:
        return 1 + self.workers + w

    def split(self, values: np.ndarray, turn: bool = False) -> tuple:
        """(stop raised, clocks, done flags[, turn]) from a read_all() result."""
        w = self.workers
        parts = (bool(values[0]), values[1:1 + w], values[1 + w:1 + 2 * w].astype(bool))
        return (*parts, int(values[self.TURN])) if turn else parts

    def initial(self, clocks, turn: int = 0) -> np.ndarray:
        values = np.zeros(self.length, np.int64)
        values[1:1 + self.workers] = clocks
        values[self.TURN] = turn
        return values
