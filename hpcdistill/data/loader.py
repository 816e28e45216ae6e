"""Each rank's batches: a deterministic, resumable, block-shuffled sampler under a torch DataLoader.

Every rank computes the same orders from the seed, so no coordination is needed. Per epoch a group's
rows are taken in *blocks* (an HDF5 dataset's chunks; single rows for a user's in-memory dataset):

    1. disjoint split: the blocks are dealt to the groups once (seeded); shared: every group has all;
    2. each epoch the group's blocks are permuted (seed, group, epoch) and the rows in that order are
       cut into `size` equal contiguous parts, rank r taking part r (so a rank touches about 1/size of
       the blocks, and reads about 1/size of the file, not nearly all of it);
    3. inside its part a rank shuffles rows within windows of SHUFFLE_WINDOW_BLOCKS blocks, whose
       chunks stay in HDF5's chunk cache, so that a batch mixes 16 chunks rather than one;
    4. batches are drop_last, and every rank of a group takes the same number of steps.

The position is (epoch, batch): a stream restored to it serves the very batches it would have served
without the stop. Each sample also gets a key from (seed, epoch, row) that seeds the RNGs a user's
dataset draws its augmentation from (`sources.Seeded`), so resumed runs are bit-identical.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from hpcdistill.data.format import DataError
from hpcdistill.data.sources import CACHE_CHUNKS, SHUFFLE_WINDOW_BLOCKS, DataSource, collate

DATA_SPLITS = ("disjoint", "shared")
_PARTITION, _EPOCH, _WINDOW, _SAMPLE = 1, 2, 3, 4  # seed-stream tags: independent orders


def _check_rank(rank: int, size: int, batch_size: int) -> None:
    if not (size >= 1 and 0 <= rank < size):
        raise DataError(f"rank {rank} is outside 0..size-1 for size {size}")
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}; set HPCDISTILL_BATCH_SIZE")


def sample_keys(seed: int, epoch: int, rows: np.ndarray) -> np.ndarray:
    """A 63-bit RNG seed per (seed, epoch, row): splitmix64 of the three, vectorised."""
    with np.errstate(over="ignore"):
        z = (np.uint64(seed % 2**64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(epoch) * np.uint64(0xBF58476D1CE4E5B9)
             + rows.astype(np.uint64) + np.uint64(0x94D049BB133111EB))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(1)).astype(np.int64)


class ShardSampler:
    """A batch sampler of (row, key) pairs for one rank of one group (see the module docstring)."""

    def __init__(self, rows: int, *, batch_size: int, rank: int, size: int, group: int = 0, num_groups: int = 1,
                 split: str = "disjoint", seed: int = 0, block: int = 1, keep: np.ndarray | None = None,
                 window_blocks: int = SHUFFLE_WINDOW_BLOCKS):
        _check_rank(rank, size, batch_size)
        if not (num_groups >= 1 and 0 <= group < num_groups):
            raise DataError(f"group {group} is outside 0..num_groups-1 for num_groups {num_groups}")
        if split not in DATA_SPLITS:
            raise DataError(f"data split {split!r} is not one of {DATA_SPLITS}; set HPCDISTILL_DATA_SPLIT")
        self.rows, self.block = int(rows), max(1, int(block))
        self.batch_size, self.rank, self.size, self.group = batch_size, rank, size, group
        self.seed = int(seed) % 2**64
        self.window = self.block * max(1, window_blocks)
        self.keep = keep  # bool per row, or None: rows left out (omitted classes)
        blocks = -(-self.rows // self.block)
        if split == "disjoint":
            perm = np.random.default_rng([self.seed, _PARTITION]).permutation(blocks)
            self.group_blocks = np.sort(np.array_split(perm, num_groups)[group])
        else:
            self.group_blocks = np.arange(blocks)
        self.group_rows = len(self._rows_of(self.group_blocks))
        self.samples_per_epoch = self.group_rows // size
        self.steps_per_epoch = self.samples_per_epoch // batch_size
        if self.steps_per_epoch == 0:
            raise DataError(
                f"group {group} has {self.group_rows} samples ({split} split over {num_groups} group(s)), "
                f"{self.samples_per_epoch} per rank over {size} rank(s), fewer than the batch size {batch_size}; "
                f"set HPCDISTILL_BATCH_SIZE to at most {max(1, self.samples_per_epoch)}, or use fewer ranks or "
                "groups, or HPCDISTILL_DATA_SPLIT=shared")
        self.epoch, self.start = 0, 0

    def _rows_of(self, blocks: np.ndarray) -> np.ndarray:
        rows = (blocks[:, None] * self.block + np.arange(self.block)).reshape(-1)
        rows = rows[rows < self.rows]
        return rows[self.keep[rows]] if self.keep is not None else rows

    def epoch_rows(self, epoch: int) -> np.ndarray:
        """This rank's rows for `epoch`, in serving order (batches use a prefix: drop_last)."""
        rng = np.random.default_rng([self.seed, _EPOCH, self.group, epoch])
        rows = self._rows_of(self.group_blocks[rng.permutation(len(self.group_blocks))])
        n = self.samples_per_epoch
        part = rows[self.rank * n:(self.rank + 1) * n].copy()
        if self.block > 1:  # block order alone leaves a chunk's rows together: shuffle within windows
            wrng = np.random.default_rng([self.seed, _WINDOW, self.group, self.rank, epoch])
            for a in range(0, len(part), self.window):
                part[a:a + self.window] = part[a:a + self.window][wrng.permutation(len(part[a:a + self.window]))]
        return part

    def set_position(self, epoch: int, batch: int) -> None:
        self.epoch, self.start = epoch, batch

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start

    def __iter__(self):
        rows = self.epoch_rows(self.epoch)[: self.steps_per_epoch * self.batch_size]
        keys = sample_keys(self.seed, self.epoch, rows)
        b = self.batch_size
        for i in range(self.start, self.steps_per_epoch):
            yield list(zip(rows[i * b:(i + 1) * b].tolist(), keys[i * b:(i + 1) * b].tolist()))


def _loader(dataset, batch_sampler, workers: int, pin: bool, persistent: bool = True) -> DataLoader:
    # Its own generator: a DataLoader draws a seed for its workers from `generator` at every iterator
    # it makes, which would otherwise shift the training process's RNG (dropout) on a resume.
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers, collate_fn=collate,
                      pin_memory=pin, persistent_workers=persistent and workers > 0,
                      prefetch_factor=2 if workers else None, generator=torch.Generator())


def shuffle_block(rows: int, chunk_rows: int, num_groups: int) -> int:
    """Rows the shuffle keeps together: whole HDF5 chunks when the file has enough of them, so that a
    rank reads its share of the file; single rows (a full shuffle) when the file is small enough for
    each process's chunk cache to hold it all (it is then read once per epoch whatever the order), or
    too few chunks to deal out evenly to the groups."""
    chunks = -(-rows // chunk_rows) if chunk_rows else 0
    return chunk_rows if chunks > max(CACHE_CHUNKS, 16 * num_groups) else 1


class TrainStream:
    """Endless training batches of one rank: next_batch(), and a position to checkpoint and restore."""

    def __init__(self, source: DataSource, *, batch_size: int, rank: int, size: int, group: int = 0,
                 num_groups: int = 1, split: str = "disjoint", seed: int = 0, exclude_labels=(),
                 workers: int = 0, device=torch.device("cpu")):
        keep = None
        if len(exclude_labels):
            if source.kind != "image":
                raise DataError(f"{source.name}: leaving classes out (HPCDISTILL_OMIT_CLASSES) needs a "
                                f"classification dataset, not a {source.kind!r} one")
            keep = ~np.isin(source.labels("train"), list(exclude_labels))
        dataset = source.dataset("train")
        self.sampler = ShardSampler(len(dataset), batch_size=batch_size, rank=rank, size=size, group=group,
                                    num_groups=num_groups, split=split, seed=seed,
                                    block=shuffle_block(len(dataset), source.chunk_rows, num_groups), keep=keep)
        # A prepared dataset's values were checked with its checksum; a user's dataset is checked per batch
        # (on the host, before the copy): a bad label was an IndexError mid-run, a NaN input looked like
        # divergence ("lower the LR").
        self.check = None if source.path is not None else (source.name, source.num_classes)
        self.device = torch.device(device)
        self.pin = self.device.type == "cuda"
        self.loader = _loader(dataset, self.sampler, workers, self.pin)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.batch_size = batch_size
        self.epoch = self.batch = 0
        self._it = None

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch, on the device (non-blocking from pinned memory on a GPU)."""
        if self.batch >= self.steps_per_epoch:
            self.epoch, self.batch, self._it = self.epoch + 1, 0, None
        if self._it is None:
            self.sampler.set_position(self.epoch, self.batch)
            self._it = iter(self.loader)
        x, y = next(self._it)
        self.batch += 1
        if self.check is not None:
            self._check(x, y)
        return x.to(self.device, non_blocking=self.pin), y.to(self.device, non_blocking=self.pin)

    def _check(self, x: torch.Tensor, y: torch.Tensor) -> None:
        name, classes = self.check
        where = f"HPCDISTILL_DATASET={name}: batch {self.batch - 1} of epoch {self.epoch} (rank-local)"
        if y.dtype.is_floating_point or int(y.min()) < 0 or int(y.max()) >= classes:
            raise DataError(f"{where} holds labels {y.min().item()}..{y.max().item()} ({y.dtype}), outside [0, "
                            f"{classes}) for its num_classes {classes}; fix the dataset's labels or num_classes")
        if x.dtype.is_floating_point and not bool(torch.isfinite(x).all()):
            raise DataError(f"{where} holds NaN or infinite inputs; fix the dataset (or its augmentation)")

    def state(self) -> dict:
        """Where the stream is (JSON-able); load_state() on a fresh stream continues from here."""
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state(self, state: dict) -> None:
        try:
            epoch = int(state["epoch"])
            # checkpoints before 0.2 counted samples ("position")
            batch = int(state["batch"]) if "batch" in state else int(state["position"]) // self.batch_size
        except (KeyError, TypeError, ValueError):
            raise DataError(f"data position {state!r} lacks integer 'epoch' and 'batch' "
                            "(checkpoint from another version?); start without resuming") from None
        if epoch < 0 or not 0 <= batch <= self.steps_per_epoch:
            raise DataError(f"data position {state!r} does not fit this shard ({self.steps_per_epoch} batches "
                            "per epoch); was the checkpoint written for another dataset or layout?")
        self.epoch, self.batch, self._it = epoch, batch, None

    def seek_step(self, step: int) -> None:
        """Position at the batch a stream that started at step 0 would serve at `step` (async resume)."""
        self.load_state({"epoch": step // self.steps_per_epoch, "batch": step % self.steps_per_epoch})


class _Contiguous:
    """Batches of (row, None) over rows lo..hi-1 in order: evaluation (no augmentation key)."""

    def __init__(self, lo: int, hi: int, batch_size: int):
        self.lo, self.hi, self.b = lo, hi, batch_size

    def __len__(self) -> int:
        return -(-(self.hi - self.lo) // self.b)

    def __iter__(self):
        for a in range(self.lo, self.hi, self.b):
            yield [(i, None) for i in range(a, min(a + self.b, self.hi))]


def eval_batches(dataset, *, batch_size: int, rank: int = 0, size: int = 1, workers: int = 0, limit: int | None = None):
    """(x, y) batches over this rank's contiguous slice of a split, the last one possibly short.

    The slices of ranks 0..size-1 together cover the split exactly once, so summing losses and
    counts across ranks gives the exact split metric; ranks may get different numbers of batches."""
    _check_rank(rank, size, batch_size)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    lo, hi = n * rank // size, n * (rank + 1) // size
    return (iter(_loader(dataset, _Contiguous(lo, hi, batch_size), workers, False, persistent=False)) if hi > lo
            else iter(()))
