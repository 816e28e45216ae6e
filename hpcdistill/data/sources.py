"""Where samples come from: the dataset registry.

`HPCDISTILL_DATASET` names either a prepared HDF5 dataset under DATA_DIR (a built-in one from `data
prepare`, or one a user made with `data import`) or a user's factory `package.module:callable`, called
as `factory(split, **HPCDISTILL_DATASET_ARGS)` for split in train/val/test and returning a map-style
torch Dataset of (x, y) pairs with an integer attribute `num_classes`. Either way the rest of the job
sees a `DataSource`: the three splits as map-style datasets, and what the model needs to know (kind,
classes, input shape from the first sample). The loader (`data/loader.py`) does the rest.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from hpcdistill.config import MAX_CLASSES
from hpcdistill.data.builtin import dataset_info
from hpcdistill.data.format import CHUNK_BYTES, SPLITS, DataError
from hpcdistill.imports import is_import_path, json_object, load_callable

SHUFFLE_WINDOW_BLOCKS = 16  # HDF5 chunks a rank shuffles together (its chunk cache holds them: 4 MB)
CACHE_CHUNKS = 2 * (SHUFFLE_WINDOW_BLOCKS + 2)  # chunks of x each process's HDF5 chunk cache holds


class Batch(tuple):
    """(x, y) already batched by the dataset itself (HDF5 reads a batch's rows in one go)."""


def collate(samples):
    if isinstance(samples, Batch):
        return tuple(samples)
    return torch.utils.data.default_collate(samples)


class H5Split(Dataset):
    """One split file of a prepared dataset, read by row ranges through HDF5's chunk cache.

    The file is opened lazily in each process (DataLoader workers fork; an h5py handle must not cross
    a fork), with a chunk cache big enough for a rank's shuffle window, so that a block-shuffled epoch
    reads each chunk once."""

    def __init__(self, path: Path, *, kind: str, rows: int, x_scale: float = 1.0):
        self.path, self.kind, self.rows, self.x_scale = Path(path), kind, rows, float(x_scale)
        self._handle = None  # (pid, h5py.File, x, y)

    def __len__(self) -> int:
        return self.rows

    def __getstate__(self):
        return {**self.__dict__, "_handle": None}

    def _datasets(self) -> tuple[h5py.Dataset, h5py.Dataset]:
        # The chunk cache belongs to an open dataset object: keep x and y open, or every batch re-reads
        # its chunks (measured: 68x the file per rank per epoch instead of 1/4).
        if self._handle is None or self._handle[0] != os.getpid():
            # rdcc_w0=0: plain LRU. HDF5's default evicts fully read chunks first, which re-read 22% more here.
            f = h5py.File(self.path, "r", rdcc_nbytes=CACHE_CHUNKS * CHUNK_BYTES, rdcc_nslots=10007, rdcc_w0=0)
            self._handle = (os.getpid(), f, f["x"], f["y"])
        return self._handle[2], self._handle[3]

    def __getitems__(self, items) -> Batch:
        idx = np.fromiter((i for i, _ in items), np.int64, len(items))
        order = np.argsort(idx, kind="stable")
        x_ds, y_ds = self._datasets()
        xs, ys = read_rows(x_ds, idx[order]), read_rows(y_ds, idx[order])
        x, y = np.empty_like(xs), np.empty_like(ys)
        x[order], y[order] = xs, ys
        if self.kind == "sequence":
            return Batch((torch.from_numpy(x.astype(np.int64)), torch.from_numpy(y.astype(np.int64))))
        x = torch.from_numpy(x.astype(np.float32, copy=False))
        if self.x_scale != 1.0:
            x.mul_(self.x_scale)
        return Batch((x, torch.from_numpy(y.astype(np.int64))))

    def __getitem__(self, i: int):
        x, y = self.__getitems__([(int(i), None)])
        return x[0], y[0]

    def labels(self) -> np.ndarray:
        with h5py.File(self.path, "r") as f:
            return f["y"][:]


def read_rows(ds, rows: np.ndarray) -> np.ndarray:
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


class Seeded(Dataset):
    """A user's dataset whose every sample is drawn with torch/numpy/python RNGs seeded from the
    sample's (seed, epoch, index) key: random augmentation is then the same with 0 or 8 loader
    workers, and the same after a resume as without the stop. The caller's RNG streams are restored
    after each batch (with 0 workers the batch is fetched in the training process)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, items):
        saved = torch.get_rng_state(), np.random.get_state(), random.getstate()
        try:
            out = []
            for i, key in items:
                if key is not None:
                    # the CPU generator alone: torch.manual_seed also seeds CUDA, XPU and MTIA lazily,
                    # formatting a stack trace for each (1.7 ms a sample: 0.36x a plain loop's speed)
                    torch.default_generator.manual_seed(key)
                    np.random.seed(key % 2**32)
                    random.seed(key)
                out.append(self.dataset[i])
            return out
        finally:
            torch.set_rng_state(saved[0])
            np.random.set_state(saved[1])
            random.setstate(saved[2])

    def __getitem__(self, i: int):
        return self.dataset[i]


@dataclass
class DataSource:
    """A dataset's three splits and what a model must know of them."""

    name: str
    kind: str                      # "image": fixed-shape inputs, one label each · "sequence": a label per token
    num_classes: int               # classes, or the vocabulary size for "sequence"
    input_shape: tuple[int, ...]
    sizes: dict[str, int]
    chunk_rows: int                # rows per HDF5 chunk of x (the unit of I/O); 0 for a user's dataset
    make: Callable[[str], Dataset] = field(repr=False)
    vocab: str | None = None
    path: Path | None = None       # prepared HDF5 datasets only
    _cache: dict = field(default_factory=dict, repr=False)

    def dataset(self, split: str) -> Dataset:
        if split not in self._cache:
            self._cache[split] = self.make(split)
        return self._cache[split]

    def labels(self, split: str) -> np.ndarray:
        """Every label of a split (classification only), without the inputs where the dataset allows."""
        ds = self.dataset(split)
        inner = getattr(ds, "dataset", ds)
        if isinstance(inner, H5Split):
            return inner.labels()
        targets = getattr(inner, "targets", None)
        if targets is not None and len(targets) == len(inner):
            return np.asarray(targets, np.int64).reshape(-1)
        return np.array([int(inner[i][1]) for i in range(len(inner))], np.int64)


_USER_SOURCES: dict[tuple[str, str], "DataSource"] = {}  # a user's factory is called once per split and process


def open_source(name: str, data_dir, args_json: str | None = None, *, verify: bool = False) -> DataSource:
    """The DataSource HPCDISTILL_DATASET names. Raises DataError (or ConfigError for the import path)
    with what to do; `verify` re-hashes a prepared dataset's files."""
    if is_import_path(name):
        args = json_object(args_json, "HPCDISTILL_DATASET_ARGS")
        key = (name, json.dumps(args, sort_keys=True))
        if key not in _USER_SOURCES:  # the pre-flight check built it already: once per process
            _USER_SOURCES[key] = _user_source(name, args)
        return _USER_SOURCES[key]
    if args_json and json_object(args_json, "HPCDISTILL_DATASET_ARGS"):
        raise DataError(f"HPCDISTILL_DATASET_ARGS is set but HPCDISTILL_DATASET={name!r} is a prepared dataset, "
                        "which takes no arguments; unset it or name a dataset factory (package.module:callable)")
    info = dataset_info(data_dir, name, verify=verify)
    with h5py.File(info.file("train"), "r") as f:
        block = int(f["x"].chunks[0]) if f["x"].chunks else 1
        x_scale = float(f.attrs.get("x_scale", 1.0))

    def make(split: str) -> Dataset:
        return H5Split(info.file(split), kind=info.kind, rows=info.sizes[split], x_scale=x_scale)

    return DataSource(name=name, kind=info.kind, num_classes=info.num_classes, input_shape=info.input_shape,
                      sizes=dict(info.sizes), chunk_rows=block, make=make, vocab=info.vocab, path=info.path)


def _user_source(path: str, args: dict) -> DataSource:
    factory = load_callable(path, "HPCDISTILL_DATASET")
    where = f"HPCDISTILL_DATASET={path}"
    made: dict[str, Dataset] = {}
    described = []
    for split in SPLITS:
        try:
            ds = factory(split, **args)
        except Exception as exc:  # noqa: BLE001 - the user's factory may raise anything
            first = (str(exc).splitlines() or [""])[0]
            raise DataError(f"{where}: factory({split!r}, **{args}) raised {type(exc).__name__}: {first}; fix the "
                            "factory or HPCDISTILL_DATASET_ARGS") from None
        described.append(_describe(ds, split, where))
        made[split] = ds
    kinds = {d[0] for d in described}
    shapes = {d[2] for d in described}
    classes = {d[1] for d in described}
    if len(kinds) > 1 or len(shapes) > 1 or len(classes) > 1:
        raise DataError(f"{where}: the splits disagree: " + ", ".join(
            f"{s} kind {k}, num_classes {c}, sample shape {sh}" for s, (k, c, sh, _) in zip(SPLITS, described)))
    kind, num_classes, shape, _ = described[0]
    return DataSource(name=path, kind=kind, num_classes=num_classes, input_shape=shape,
                      sizes={s: d[3] for s, d in zip(SPLITS, described)}, chunk_rows=0,
                      make=lambda split: Seeded(made[split]))


def _describe(ds, split: str, where: str) -> tuple[str, int, tuple[int, ...], int]:
    """(kind, num_classes, input shape, length) of a user's split, checked on its first sample."""
    if not (hasattr(ds, "__getitem__") and hasattr(ds, "__len__")):
        raise DataError(f"{where}: factory({split!r}) returned a {type(ds).__name__}, not a map-style "
                        "torch.utils.data.Dataset (it needs __getitem__ and __len__)")
    classes = getattr(ds, "num_classes", None)
    if not (isinstance(classes, (int, np.integer)) and not isinstance(classes, bool) and 2 <= classes <= MAX_CLASSES):
        raise DataError(f"{where}: the {split} dataset's num_classes attribute is {classes!r}; set it to the "
                        f"number of classes (an int in 2..{MAX_CLASSES}) on the dataset object")
    n = len(ds)
    if n < 1:
        raise DataError(f"{where}: the {split} split is empty")
    try:
        sample = ds[0]
        x, y = sample
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"{where}: sample 0 of the {split} split is not an (x, y) pair "
                        f"({type(exc).__name__}: {exc})") from None
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if y.dtype.is_floating_point or y.dtype == torch.bool or y.ndim > 1:
        raise DataError(f"{where}: the {split} label of sample 0 is a {y.dtype} tensor of shape {tuple(y.shape)}; "
                        "expected an integer class (or a 1-D sequence of token ids)")
    kind = "sequence" if y.ndim == 1 else "image"
    if kind == "sequence" and x.dtype.is_floating_point:
        raise DataError(f"{where}: sample 0 has a label per token but float inputs; token data needs integer x")
    if not (0 <= int(y.min()) and int(y.max()) < classes):
        raise DataError(f"{where}: sample 0 of {split} has label(s) outside [0, {classes})")
    return kind, int(classes), tuple(int(s) for s in x.shape), n
