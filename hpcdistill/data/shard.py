"""Each rank's view of a split: an endless, resumable batch stream for training; slices for evaluation.

Every rank computes the same permutations from the seed, so no coordination is needed: a group's
ranks split each epoch's permutation round-robin, and each rank reads only its own rows.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import torch

from hpcdistill.data.format import CHUNK_BYTES, DataError, read_split_attrs

DATA_SPLITS = ("disjoint", "shared")
EVAL_BLOCK_BYTES = 32 * 2**20  # rows read per file open in eval_batches
_PARTITION, _EPOCH = 1, 2  # seed-stream tags, so the group partition and epoch orders are independent


def _x_dtype(kind: str):
    return np.int64 if kind == "sequence" else np.float32


def _check_rank(rank: int, size: int, batch_size: int) -> None:
    if not (size >= 1 and 0 <= rank < size):
        raise DataError(f"rank {rank} is outside 0..size-1 for size {size}")
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}; set HPCDISTILL_BATCH_SIZE")


class ShardReader:
    """Infinite batch stream of one rank's shard of a (train) split file.

    split="disjoint" gives each of `num_groups` groups a fixed part of the rows (seeded); "shared"
    gives every group all rows. Each epoch the group's rows are permuted (seeded by seed, group and
    epoch, the same on the group's ranks) and rank r takes perm[r::size], trimmed so every rank of
    the group takes the same number of steps. Batches are drop_last.
    `exclude_labels` leaves classes out (Hinton et al.'s omitted-class transfer set); it reads the
    label column, never the inputs, of the other rows.
    """

    def __init__(self, path_h5, *, batch_size: int, rank: int, size: int, group: int = 0,
                 num_groups: int = 1, split: str = "disjoint", seed: int = 0, exclude_labels=()):
        _check_rank(rank, size, batch_size)
        if not (num_groups >= 1 and 0 <= group < num_groups):
            raise DataError(f"group {group} is outside 0..num_groups-1 for num_groups {num_groups}")
        if split not in DATA_SPLITS:
            raise DataError(f"data split {split!r} is not one of {DATA_SPLITS}; set HPCDISTILL_DATA_SPLIT")
        self.path = Path(path_h5)
        attrs = read_split_attrs(self.path)
        self.kind = attrs["kind"]
        self.batch_size, self.rank, self.size, self.group = batch_size, rank, size, group
        self._seed = int(seed) % 2**64
        n = attrs["rows"]
        if split == "disjoint":
            perm = np.random.default_rng([self._seed, _PARTITION]).permutation(n)
            self.group_indices = np.sort(np.array_split(perm, num_groups)[group])
        else:
            self.group_indices = np.arange(n)
        if len(exclude_labels):
            if self.kind != "image":
                raise DataError(f"{self.path}: leaving classes out (HPCDISTILL_OMIT_CLASSES) needs a "
                                f"classification dataset, not a {self.kind!r} one")
            with h5py.File(self.path, "r") as f:
                labels = f["y"][:]
            self.group_indices = self.group_indices[~np.isin(labels[self.group_indices], list(exclude_labels))]
        self.samples_per_epoch = len(self.group_indices) // size
        self.steps_per_epoch = self.samples_per_epoch // batch_size
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{self.path}: group {group} has {len(self.group_indices)} samples ({split} split over "
                f"{num_groups} group(s)), {self.samples_per_epoch} per rank over {size} rank(s), fewer than "
                f"the batch size {batch_size}; set HPCDISTILL_BATCH_SIZE to at most "
                f"{max(1, self.samples_per_epoch)}, or use fewer ranks or groups, or HPCDISTILL_DATA_SPLIT=shared")
        self.epoch = 0
        self.position = 0  # samples of this epoch already served
        self._loaded_epoch = None
        self._x = self._y = None

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This rank's row indices for `epoch`, in serving order (batches use a prefix: drop_last)."""
        rng = np.random.default_rng([self._seed, _EPOCH, self.group, epoch])
        perm = self.group_indices[rng.permutation(len(self.group_indices))]
        return perm[: self.samples_per_epoch * self.size][self.rank:: self.size]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.batch_size
        if self.position + b > self.steps_per_epoch * b:
            self.epoch, self.position = self.epoch + 1, 0
        if self._loaded_epoch != self.epoch:
            self._load(self.epoch)
        a, self.position = self.position, self.position + b
        return (torch.from_numpy(self._x[a:a + b].astype(_x_dtype(self.kind))),
                torch.from_numpy(self._y[a:a + b].astype(np.int64)))

    def _load(self, epoch: int) -> None:
        """Read this epoch's rows (only those batches will use) in sorted order, then un-sort."""
        idx = self.epoch_indices(epoch)[: self.steps_per_epoch * self.batch_size]
        order = np.argsort(idx, kind="stable")
        rows = idx[order]
        with h5py.File(self.path, "r") as f:
            xs, ys = _read_rows(f["x"], rows), _read_rows(f["y"], rows)
        self._x, self._y = np.empty_like(xs), np.empty_like(ys)
        self._x[order], self._y[order] = xs, ys
        self._loaded_epoch = epoch

    def state(self) -> dict:
        """Where the stream is (JSON-able); load_state() on a fresh reader continues from here."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state(self, state: dict) -> None:
        try:
            epoch, position = int(state["epoch"]), int(state["position"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"data reader state {state!r} lacks integer 'epoch' and 'position' "
                            f"(checkpoint from another version?); start without resuming") from None
        if epoch < 0 or not 0 <= position <= self.samples_per_epoch:
            raise DataError(f"data reader state {state!r} does not fit this shard ({self.samples_per_epoch} "
                            f"samples per epoch); was the checkpoint written for another dataset or layout?")
        self.epoch, self.position = epoch, position


def _read_rows(ds, rows: np.ndarray) -> np.ndarray:
    """Rows `rows` (sorted) of an HDF5 dataset, one slice per chunk they touch.

    HDF5 reads whole chunks anyway, so reading the span of the wanted rows inside each chunk costs no
    extra I/O, and it is far faster than per-row fancy indexing; only the wanted rows are kept."""
    out = np.empty((len(rows), *ds.shape[1:]), ds.dtype)
    if len(rows) == 0:
        return out
    step = ds.chunks[0] if ds.chunks else max(1, CHUNK_BYTES // max(1, ds[:1].nbytes))
    cuts = np.flatnonzero(np.diff(rows // step)) + 1
    for s, e in zip(np.r_[0, cuts], np.r_[cuts, len(rows)]):
        lo = rows[s]
        out[s:e] = ds[lo: rows[e - 1] + 1][rows[s:e] - lo]
    return out


def eval_batches(path_h5, *, batch_size: int, rank: int = 0, size: int = 1):
    """Yield (x, y) batches over this rank's contiguous slice of a split, last batch possibly short.

    The slices of ranks 0..size-1 together cover the split exactly once, so summing losses and
    counts across ranks gives the exact split metric; ranks may get different numbers of batches."""
    _check_rank(rank, size, batch_size)
    path = Path(path_h5)
    attrs = read_split_attrs(path)
    n, dtype = attrs["rows"], _x_dtype(attrs["kind"])
    lo, hi = n * rank // size, n * (rank + 1) // size
    block = batch_size * max(1, EVAL_BLOCK_BYTES // (batch_size * max(1, attrs["row_bytes"])))
    for a in range(lo, hi, block):
        with h5py.File(path, "r") as f:  # not held open while the caller works on the batches
            xs, ys = f["x"][a:min(a + block, hi)], f["y"][a:min(a + block, hi)]
        for i in range(0, len(xs), batch_size):
            yield (torch.from_numpy(xs[i:i + batch_size].astype(dtype)),
                   torch.from_numpy(ys[i:i + batch_size].astype(np.int64)))
