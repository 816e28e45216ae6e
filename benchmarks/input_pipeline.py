"""Input pipeline (issue 11, item 3): the block-shuffled TrainStream vs the old whole-epoch shard reader.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/input_pipeline.py [--gb 1.0 | --quick] [--reps 5] [--json]

One process, rank 0 of a group of `size` ranks (the other ranks are not started: each rank's reads
are its own, and the sampler computes any rank's rows without the others), batch 64, one group.
Two datasets, made in a temporary directory (under --dir, default the system's temp directory, local
disk here) and deleted at the end:

- `digits`, prepared with `hpcdistill.data.prepare` (1257 train rows, 2 HDF5 chunks: the loader
  falls back to a full row shuffle there, since shuffle_block() is 1);
- `big`: a generated image dataset, float32 x of shape (N, 3, 32, 32) (12 KB a row, 21 rows per
  256 KB chunk), N = GB * 2**30 / 12288 rows (87,381 for 1 GB), random labels of 10 classes, written
  block by block with `write_split_blocks` (memory stays at a block), plus 1000-row val and test.

Three readers, alternated repetition by repetition (order rotated):

- old: `ShardReader` as it was at commit 27d5885 (hpcdistill/data/shard.py), copied below verbatim:
  each epoch a permutation of all the group's rows, rank r takes perm[r::size], and the epoch's rows
  are read at once (sorted, one slice per chunk touched) into memory, batches served from there;
- new w0: `TrainStream` (block-shuffled `ShardSampler` under a DataLoader), no loader workers;
- new w2: the same with 2 loader workers (forked processes, each with its own file handle and
  HDF5 chunk cache).

Figures, per repetition and reader, on a fresh reader each time:

- samples/s over whole epochs (never a prefix: the old reader reads its whole epoch at the first
  batch): "epoch 1" is the first epoch of a fresh reader (it opens the file, forks the workers of
  w2, and the old reader faults in fresh memory for its epoch's rows: on this VM first-touched
  memory costs ~2 s per GB), "steady" the epochs after it (digits: epochs 2-11, big: epoch 2);
- bytes read per rank per epoch: the `rchar` delta of /proc/self/io plus that of every child
  process (the DataLoader workers: /proc/<pid>/io of each, a forked process's counters start at 0),
  as a fraction of train.h5's size. rchar counts what the process read through read(2) (also
  from the page cache, and a few KB of pipe traffic between the workers and the trainer);
- page cache: the timed passes are WARM: train.h5 is read once sequentially just before each
  pass, so the file is in the page cache (it was also just written). The "cold" figures are a
  second epoch (so no first-touch memory costs) before which train.h5's pages were dropped with
  posix_fadvise(POSIX_FADV_DONTNEED) (no root needed; only that file's clean pages); /proc
  `read_bytes` (bytes fetched from the block device, read-ahead included) shows what came from
  the disk;
- bytes at size 4 (rank 0 of 4): one warm epoch of each reader;
- big only, a diagnostic of the loader workers' traffic: what one of 2 workers reads (every other
  batch) through a chunk cache like H5Split's, with HDF5's default preemption policy and with
  plain LRU (rdcc_w0 = 0).

Sampling quality (no I/O: the samplers' orders only): for a class-SORTED train file of 87,381 rows
(the 1 GiB file's, whatever --gb; 10 classes, rows ordered by label: the worst case for a block
shuffle) and a randomly ordered one (what `data import` writes), the mean total-variation distance
between each batch's label histogram and the file's, over 3 epochs of rank 0 of 2, batch 64:
`ShardSampler` with block = 1 (full row shuffle, what small files get) vs block = the chunk's rows
(what TrainStream uses on a file with more than CACHE_CHUNKS chunks), for the big file's chunks
(21 rows) and for chunks of 1024 rows (64 float32 per row).
A digits training comparison is not made: digits has 2 chunks, so its loader always shuffles rows.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from hpcdistill.data import ShardSampler, TrainStream, open_source, prepare  # noqa: E402
from hpcdistill.data.format import CHUNK_BYTES, DataError, read_split_attrs, write_split_blocks  # noqa: E402
from hpcdistill.data.loader import shuffle_block  # noqa: E402
from hpcdistill.data.sources import CACHE_CHUNKS, SHUFFLE_WINDOW_BLOCKS, read_rows  # noqa: E402

from _common import human_bytes, machine, median, table  # noqa: E402

OLD_COMMIT = "27d5885"

# ---- the baseline: `git show 27d5885:hpcdistill/data/shard.py`, lines 17-138, verbatim ------------
# (ShardReader and the helpers it uses; eval_batches left out; imports above)

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

# ---- end of the verbatim copy ------------------------------------------------------------------

BATCH = 64
CLASSES = 10
IMAGE = (3, 32, 32)
READERS = ("old", "new w0", "new w2")
QUALITY_ROWS = 2**30 // (4 * 3 * 32 * 32)  # the sampling-quality files: the 1 GiB file's 87,381 rows, whatever --gb


# -- I/O counters ------------------------------------------------------------------------------

def _proc_io(pid) -> tuple[int, int]:
    """(rchar, read_bytes) of a process; (0, 0) if it is gone."""
    try:
        with open(f"/proc/{pid}/io") as f:
            d = dict(line.split(":") for line in f)
    except OSError:
        return 0, 0
    return int(d["rchar"]), int(d["read_bytes"])


def _children() -> list[int]:
    pids = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                pids += [int(p) for p in f.read().split()]
        except OSError:
            pass
    return pids


def io_now() -> dict[int, tuple[int, int]]:
    """This process's and its children's (rchar, read_bytes), by pid."""
    return {pid: _proc_io(pid) for pid in ["self", *_children()]}


def io_delta(before: dict, after: dict) -> tuple[int, int]:
    """Summed over this process and its children; a child not there before started at 0."""
    r = b = 0
    for pid, (rc, rb) in after.items():
        rc0, rb0 = before.get(pid, (0, 0))
        r, b = r + rc - rc0, b + rb - rb0
    return r, b


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(16 << 20):
            pass


def drop_pages(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# -- the readers ---------------------------------------------------------------------------------

def make_reader(kind: str, data_dir: Path, name: str, size: int):
    if kind == "old":
        return ShardReader(data_dir / name / "train.h5", batch_size=BATCH, rank=0, size=size, seed=1)
    workers = int(kind.rsplit("w", 1)[1])
    return TrainStream(open_source(name, data_dir), batch_size=BATCH, rank=0, size=size, seed=1, workers=workers)


def run_pass(kind: str, data_dir: Path, name: str, *, size: int, epochs: int,
             drop_before: int | None = None) -> list[tuple[float, int, int]]:
    """(seconds, rchar, read_bytes) for each of `epochs` whole epochs of a fresh reader; train.h5 is
    read once first (warm), and its pages are dropped before epoch `drop_before` (0-based) if given."""
    path = data_dir / name / "train.h5"
    gc.collect()
    warm(path)
    reader = make_reader(kind, data_dir, name, size)
    out = []
    try:
        for epoch in range(epochs):
            if epoch == drop_before:
                drop_pages(path)
            before = io_now()
            t = time.perf_counter()
            for _ in range(reader.steps_per_epoch):
                reader.next_batch()
            dt = time.perf_counter() - t
            out.append((dt, *io_delta(before, io_now())))  # workers still alive (persistent)
    finally:
        del reader
        gc.collect()
    return out


def worker_cache_pattern(data_dir: Path, name: str) -> dict:
    """Bytes (fraction of train.h5) that ONE of 2 loader workers reads in an epoch of rank 0 of 2:
    every other batch of the sampler, read the way H5Split reads (read_rows of the sorted rows, x and
    y), through a chunk cache of CACHE_CHUNKS chunks as H5Split opens it (HDF5's default preemption,
    rdcc_w0 = 0.75: chunks read in full are evicted first) and with rdcc_w0 = 0 (plain LRU)."""
    path = data_dir / name / "train.h5"
    sampler = TrainStream(open_source(name, data_dir), batch_size=BATCH, rank=0, size=2, seed=1).sampler
    batches = [np.sort(np.array([i for i, _ in b])) for b in sampler][0::2]
    out = {}
    for label, extra in (("hdf5_default_w0", {}), ("lru_w0_0", {"rdcc_w0": 0.0})):
        with h5py.File(path, "r", rdcc_nbytes=CACHE_CHUNKS * CHUNK_BYTES, rdcc_nslots=10007, **extra) as f:
            x, y = f["x"], f["y"]
            before = io_now()
            for rows in batches:
                read_rows(x, rows), read_rows(y, rows)
            out[label] = io_delta(before, io_now())[0] / path.stat().st_size
    return out


def steps_of(data_dir: Path, name: str, size: int) -> int:
    return TrainStream(open_source(name, data_dir), batch_size=BATCH, rank=0, size=size, seed=1).steps_per_epoch


def measure_dataset(data_dir: Path, name: str, *, reps: int, steady: int) -> dict:
    """All figures of one dataset (see the module docstring)."""
    path = data_dir / name / "train.h5"
    file_bytes = path.stat().st_size
    steps = steps_of(data_dir, name, 2)
    with h5py.File(path, "r") as f:
        rows, chunk_rows = f["x"].shape[0], f["x"].chunks[0]
    res = {"train_h5_bytes": file_bytes, "rows": rows, "chunk_rows": chunk_rows,
           "chunks": -(-rows // chunk_rows), "shuffle_block": shuffle_block(rows, chunk_rows, 1),
           "steps_per_epoch_size2": steps, "steady_epochs": steady, "readers": {}}
    per = {k: {"epoch1_s": [], "steady_s": [], "epoch1_rchar": [], "steady_rchar": [],
               "cold_s": [], "cold_rchar": [], "cold_read_bytes": []} for k in READERS}
    for rep in range(reps):
        order = READERS[rep % 3:] + READERS[:rep % 3]
        for kind in order:
            p = run_pass(kind, data_dir, name, size=2, epochs=1 + steady)
            per[kind]["epoch1_s"].append(p[0][0])
            per[kind]["epoch1_rchar"].append(p[0][1])
            per[kind]["steady_s"].append(sum(e[0] for e in p[1:]) / steady)
            per[kind]["steady_rchar"].append(sum(e[1] for e in p[1:]) / steady)
        for kind in order:
            _, c = run_pass(kind, data_dir, name, size=2, epochs=2, drop_before=1)
            per[kind]["cold_s"].append(c[0])
            per[kind]["cold_rchar"].append(c[1])
            per[kind]["cold_read_bytes"].append(c[2])
    samples = steps * BATCH
    for kind in READERS:
        m = {k: median(v) for k, v in per[kind].items()}
        res["readers"][kind] = {
            "epoch1_samples_s": samples / m["epoch1_s"], "steady_samples_s": samples / m["steady_s"],
            "cold_samples_s": samples / m["cold_s"],
            "epoch1_samples_s_reps": [round(samples / s) for s in per[kind]["epoch1_s"]],
            "steady_samples_s_reps": [round(samples / s) for s in per[kind]["steady_s"]],
            "bytes_epoch1_frac": m["epoch1_rchar"] / file_bytes, "bytes_steady_frac": m["steady_rchar"] / file_bytes,
            "cold_rchar_frac": m["cold_rchar"] / file_bytes, "cold_disk_frac": m["cold_read_bytes"] / file_bytes}
    res["size4"] = {}
    for kind in READERS:
        (e,) = run_pass(kind, data_dir, name, size=4, epochs=1)
        res["size4"][kind] = {"bytes_epoch1_frac": e[1] / file_bytes}
    old = res["readers"]["old"]
    res["ratios_new_over_old"] = {
        kind: {"epoch1_samples_s": r["epoch1_samples_s"] / old["epoch1_samples_s"],
               "steady_samples_s": r["steady_samples_s"] / old["steady_samples_s"],
               "cold_samples_s": r["cold_samples_s"] / old["cold_samples_s"],
               "bytes_epoch1_size2": r["bytes_epoch1_frac"] / old["bytes_epoch1_frac"],
               "bytes_steady_size2": (r["bytes_steady_frac"] / old["bytes_steady_frac"]),
               "bytes_epoch1_size4": res["size4"][kind]["bytes_epoch1_frac"] / res["size4"]["old"]["bytes_epoch1_frac"]}
        for kind, r in res["readers"].items() if kind != "old"}
    return res


# -- the datasets --------------------------------------------------------------------------------

def write_big(data_dir: Path, gb: float, seed: int = 0) -> Path:
    """A generated image dataset of about `gb` GiB of float32 train rows, written block by block."""
    row_bytes = 4 * int(np.prod(IMAGE))
    n = max(1000, int(gb * 2**30) // row_bytes)
    for split, rows in (("train", n), ("val", 1000), ("test", 1000)):
        rng = np.random.default_rng([seed, len(split)])
        y = rng.integers(0, CLASSES, rows)

        def xb(rows=rows, rng=rng, step=2048):
            for a in range(0, rows, step):
                yield rng.random((min(step, rows - a), *IMAGE), dtype=np.float32)

        write_split_blocks(data_dir / "big", split, xb(), (y[a:a + 2048] for a in range(0, rows, 2048)), rows=rows,
                           x_shape=IMAGE, x_dtype=np.float32, y_shape=(), y_dtype=np.int64, name="big", kind="image",
                           num_classes=CLASSES, source="benchmarks/input_pipeline.py (random)")
    return data_dir / "big"


# -- sampling quality ----------------------------------------------------------------------------

def batch_tv(labels: np.ndarray, block: int, *, size: int = 2, epochs: int = 3) -> float:
    """Mean total-variation distance between a batch's label histogram and the file's, rank 0."""
    s = ShardSampler(len(labels), batch_size=BATCH, rank=0, size=size, seed=1, block=block)
    ref = np.bincount(labels, minlength=CLASSES) / len(labels)
    tvs = []
    for epoch in range(epochs):
        rows = s.epoch_rows(epoch)[: s.steps_per_epoch * BATCH].reshape(-1, BATCH)
        lab = labels[rows]
        hist = (lab[..., None] == np.arange(CLASSES)).mean(axis=1)
        tvs.append(0.5 * np.abs(hist - ref).sum(axis=1))
    return float(np.concatenate(tvs).mean())


def sampling_quality(n: int, chunk_rows: list[int]) -> dict:
    sorted_labels = np.repeat(np.arange(CLASSES), -(-n // CLASSES))[:n]
    shuffled = sorted_labels[np.random.default_rng(7).permutation(n)]
    out = {"rows": n, "batch": BATCH, "classes": CLASSES, "rows_per_class": n // CLASSES, "cases": []}
    for order, labels in (("sorted", sorted_labels), ("random", shuffled)):
        full = batch_tv(labels, 1)
        for cr in chunk_rows:
            assert shuffle_block(n, cr, 1) == cr, (n, cr)  # TrainStream would block-shuffle this file
            blk = batch_tv(labels, cr)
            out["cases"].append({"file_order": order, "chunk_rows": cr, "tv_full_shuffle": full,
                                 "tv_block_shuffle": blk, "ratio_block_over_full": blk / full})
    return out


# -- output --------------------------------------------------------------------------------------

def print_dataset(title: str, r: dict, reps: int) -> None:
    size = human_bytes(r["train_h5_bytes"])
    print(f"\n## {title}: train.h5 {size}, {r['rows']:,} rows, {r['chunks']:,} chunks of {r['chunk_rows']} rows; "
          f"shuffle_block {r['shuffle_block']}; rank 0 of 2: {r['steps_per_epoch_size2']} batches of {BATCH} an epoch; "
          f"median of {reps}; steady = " + (f"mean of epochs 2-{1 + r['steady_epochs']}" if r["steady_epochs"] > 1
                                             else "epoch 2") + "\n")
    rows = []
    for kind, m in r["readers"].items():
        ratio = r["ratios_new_over_old"].get(kind)
        rows.append([kind, f"{m['epoch1_samples_s']:,.0f}", f"{m['steady_samples_s']:,.0f}",
                     f"{m['cold_samples_s']:,.0f}",
                     "1.00" if ratio is None else f"{ratio['epoch1_samples_s']:.2f}",
                     "1.00" if ratio is None else f"{ratio['steady_samples_s']:.2f}",
                     "1.00" if ratio is None else f"{ratio['cold_samples_s']:.2f}",
                     f"{m['bytes_epoch1_frac']:.3f}", f"{m['bytes_steady_frac']:.3f}", f"{m['cold_disk_frac']:.3f}",
                     f"{r['size4'][kind]['bytes_epoch1_frac']:.3f}",
                     " ".join(map(str, m["steady_samples_s_reps"]))])
    print(table(["reader", "epoch 1 samples/s", "steady samples/s", "cold samples/s", "epoch 1 vs old",
                 "steady vs old", "cold vs old", "read/file, size 2", "steady read/file", "cold disk/file",
                 "read/file, size 4", "steady samples/s per rep"], rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gb", type=float, default=1.0, help="size of the generated train.h5 in GiB (default 1.0)")
    ap.add_argument("--quick", action="store_true", help="a 0.2 GiB file (overrides --gb)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dir", default=None, help="parent of the temporary directory (local disk)")
    ap.add_argument("--json", action="store_true", help="print one JSON object of all figures as the last line")
    args = ap.parse_args()
    gb = 0.2 if args.quick else args.gb
    torch.set_num_threads(1)
    t0 = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="hpcdistill-input-", dir=args.dir))
    try:
        prepare("digits", tmp)
        tg = time.time()
        write_big(tmp, gb)
        gen_s = time.time() - tg
        print("# input pipeline: TrainStream (block-shuffled ShardSampler, DataLoader) vs ShardReader of "
              f"{OLD_COMMIT}; "
              f"batch {BATCH}, rank 0 of 2 (and of 4 for bytes), one group, torch {torch.__version__}, h5py "
              f"{h5py.__version__} (HDF5 {h5py.version.hdf5_version})")
        print(f"# {machine()}")
        print(f"# {tmp} ({gb:g} GiB generated in {gen_s:.0f} s); timed passes with train.h5 in the page cache (read "
              "once just before); cold = a reader's 2nd epoch with train.h5's pages dropped first (posix_fadvise "
              "DONTNEED); read = rchar of the process and its loader workers / file size, disk = read_bytes / "
              "file size")
        digits = measure_dataset(tmp, "digits", reps=args.reps, steady=10)
        print_dataset("digits", digits, args.reps)
        big = measure_dataset(tmp, "big", reps=args.reps, steady=1)
        print_dataset(f"big ({gb:g} GiB)", big, args.reps)
        big["worker_cache"] = worker_cache_pattern(tmp, "big")
        print(f"\none of 2 workers (every other batch), read/file: {big['worker_cache']['hdf5_default_w0']:.3f} with "
              f"H5Split's chunk cache (HDF5 default rdcc_w0 0.75), {big['worker_cache']['lru_w0_0']:.3f} with "
              "rdcc_w0 = 0 (LRU); all batches of the epoch in one process: 0.5")
        quality = sampling_quality(QUALITY_ROWS, [big["chunk_rows"], CHUNK_BYTES // 256])
        print(f"\n## sampling quality: mean total-variation distance between a batch's label histogram and the "
              f"file's; {quality['rows']:,} rows, {CLASSES} classes, rank 0 of 2, batch {BATCH}, 3 epochs; block "
              f"shuffle windows of {SHUFFLE_WINDOW_BLOCKS} chunks (CACHE_CHUNKS {CACHE_CHUNKS})\n")
        print(table(["file order", "chunk rows", "full row shuffle", "block shuffle", "block / full"],
                    [[c["file_order"], c["chunk_rows"], f"{c['tv_full_shuffle']:.3f}", f"{c['tv_block_shuffle']:.3f}",
                      f"{c['ratio_block_over_full']:.2f}"] for c in quality["cases"]]))
        print(f"\n# {time.time() - t0:.0f} s in all")
        if args.json:
            print(json.dumps({"benchmark": "input_pipeline", "old_commit": OLD_COMMIT, "gb": gb, "batch": BATCH,
                              "reps": args.reps, "machine": machine(), "generate_s": gen_s,
                              "digits": digits, "big": big, "sampling_quality": quality,
                              "seconds": time.time() - t0}))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
