"""Built-in datasets made from real data already on the machine, and import of a user's own arrays.

Nothing is downloaded: `digits` ships inside scikit-learn and `text` is cut from the Python
standard library's sources, so `hpcdistill data prepare` works on compute nodes without internet.
"""

from __future__ import annotations

import hashlib
import math
import mmap
import os
import re
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import h5py
import numpy as np

from hpcdistill.atomic import fsync_dir
from hpcdistill.config import MAX_CLASSES
from hpcdistill.data.format import (
    CHUNK_BYTES,
    SPLITS,
    DataError,
    DatasetInfo,
    read_split_attrs,
    write_split,
    write_split_blocks,
)


@dataclass(frozen=True)
class BuiltinDataset:
    about: str
    build: Callable  # seed -> yields (split, (x, y), attributes)


SEQ_LEN = 64
CORPUS_CHARS = 4_000_000
MIN_CORPUS_CHARS = 1_000_000
REPLACEMENT = "\x1a"  # ASCII SUB stands for every character outside printable ASCII and "\n"
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
MIN_PER_SPLIT = 10
IMPORT_KINDS = ("image", "text")
_INT64_MAX = int(np.iinfo(np.int64).max)
_FOLIO = 512 * mmap.PAGESIZE  # the largest page-cache folio a page fault may map (a PMD: 2 MiB on x86-64)
_WINDOW = 4 * 2**20  # a gather reads this much of a mapped file at a time, then releases it


def prepare(name: str, data_dir, *, seed: int = 0, force: bool = False) -> tuple[Path, bool]:
    """Write DATA_DIR/NAME/{train,val,test}.h5 for a built-in dataset; return the directory and
    whether it was written (False: valid existing files were kept).

    Valid existing files are kept (so every job script may call this) unless `force`."""
    if name not in BUILTIN_DATASETS:
        raise DataError(f"no built-in dataset {name!r} (built-ins: {', '.join(BUILTIN_DATASETS)}); "
                        f"for your own arrays run `hpcdistill data import {name} --x X.npy --y Y.npy`")
    path = Path(data_dir) / name
    if not force:
        try:
            dataset_info(data_dir, name)
            return path, False
        except DataError:
            pass  # missing or damaged: build it
    for split, (x, y), attrs in BUILTIN_DATASETS[name].build(seed):
        write_split(path, split, x, y, name=name, **attrs)
    return path, True


def _digits(seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = d.target.astype(np.int64)
    idx = np.arange(len(y))
    rest, test = train_test_split(idx, test_size=360, stratify=y, random_state=seed)
    train, val = train_test_split(rest, test_size=180, stratify=y[rest], random_state=seed)
    attrs = {"kind": "image", "num_classes": 10,
             "source": f"sklearn.datasets.load_digits (scikit-learn {_sklearn_version()}): UCI optical "
                       f"recognition of handwritten digits, pixels/16; stratified split, seed {seed}"}
    for split, rows in (("train", train), ("val", val), ("test", test)):
        rows = np.sort(rows)
        yield split, (x[rows], y[rows]), attrs


AUG_SIZES = {"train": 60_000, "val": 5_000, "test": 10_000}


def _digits_aug(seed: int, source=None):
    """`digits` grown to 60k / 5k / 10k images for experiments where one test image must not be a
    quarter of a percent: every image is one of the split's own source digits (the `digits` split of
    the same seed, so no test digit is ever seen in training in any form) under a random affine map
    (rotation +-15 degrees, scale 0.9-1.1, shift +-1 pixel, bilinear) plus Gaussian noise of 0.05,
    clipped to [0, 1]. Seeded: the same files from the same seed on every machine. `source` (tests):
    another generator of the source splits in `_digits`' form."""
    from scipy.ndimage import affine_transform

    rng = np.random.default_rng([seed, 8])
    for split, (x, y), attrs in (source or _digits)(seed):
        n = AUG_SIZES[split]
        pick = np.concatenate([rng.permutation(len(y)) for _ in range(-(-n // len(y)))])[:n]
        angle = np.deg2rad(rng.uniform(-15, 15, n))
        scale = rng.uniform(0.9, 1.1, n)
        shift = rng.integers(-1, 2, (n, 2))
        out = np.empty((n, 1, 8, 8), np.float32)
        centre = np.array([3.5, 3.5])
        for k in range(n):
            c, s_ = np.cos(angle[k]) / scale[k], np.sin(angle[k]) / scale[k]
            m = np.array([[c, -s_], [s_, c]])  # output pixel -> input pixel
            offset = centre - m @ (centre + shift[k])
            out[k, 0] = affine_transform(x[pick[k], 0], m, offset=offset, order=1, mode="constant")
        out += rng.normal(0.0, 0.05, out.shape).astype(np.float32)
        np.clip(out, 0.0, 1.0, out=out)
        yield split, (out, y[pick].copy()), {
            **attrs, "source": attrs["source"] + f"; each split's digits x {n / len(y):.1f} by random affine "
                                                 "maps (rotation 15 deg, scale 0.9-1.1, shift 1 px) and noise 0.05"}


def _sklearn_version() -> str:
    import sklearn

    return sklearn.__version__


def text_corpus() -> tuple[np.ndarray, str, str]:
    """The `text` corpus as (token ids uint8, vocab, description), identical on every call.

    The .py files of the standard library, walked in sorted order (skipping tests and installed
    packages), concatenated up to CORPUS_CHARS characters."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for fn in sorted(filenames):
            if fn.endswith(".py") and total < CORPUS_CHARS:
                src = (Path(dirpath) / fn).read_text(encoding="utf-8", errors="replace")
                parts.append(src)
                total += len(src)
        if total >= CORPUS_CHARS:
            break
    text = "".join(parts)[:CORPUS_CHARS]
    if len(text) < MIN_CORPUS_CHARS:
        raise DataError(f"the Python standard library at {root} holds only {len(text)} characters of "
                        f".py source (need {MIN_CORPUS_CHARS}); prepare `text` with a full Python install")
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).copy()
    codes[((codes < 32) | (codes > 126)) & (codes != 10)] = ord(REPLACEMENT)
    chars = np.unique(codes)
    ids = np.searchsorted(chars, codes).astype(np.uint8)
    vocab = "".join(map(chr, chars))
    digest = hashlib.sha256(codes.astype(np.uint8).tobytes()).hexdigest()
    source = (f"Python {sys.version.split()[0]} standard library .py sources ({root}), first "
              f"{len(text)} characters in sorted walk order, sha256 {digest}")
    return ids, vocab, source


def text_regions(n: int) -> dict[str, tuple[int, int]]:
    """Character ranges of the corpus per split: contiguous, so val/test text is never in train."""
    a, b = int(n * 0.90), int(n * 0.95)
    return {"train": (0, a), "val": (a, b), "test": (b, n)}


def _text(seed: int):
    ids, vocab, source = text_corpus()
    attrs = {"kind": "sequence", "num_classes": len(vocab), "vocab": vocab,
             "source": source + f"; non-overlapping windows of {SEQ_LEN}, regions 90/5/5%"}
    for split, (lo, hi) in text_regions(len(ids)).items():
        region = ids[lo:hi]
        w = (len(region) - 1) // SEQ_LEN
        x = region[: w * SEQ_LEN].reshape(w, SEQ_LEN)
        y = region[1: w * SEQ_LEN + 1].reshape(w, SEQ_LEN)
        yield split, (x, y), attrs


# The single source of truth for built-in datasets: `data prepare`, the error messages and the tests
# read this table.
BUILTIN_DATASETS: dict[str, BuiltinDataset] = {
    "digits": BuiltinDataset("scikit-learn's 1797 handwritten digits, 8x8 grey images, 10 classes", _digits),
    "digits-aug": BuiltinDataset("digits grown to 60k/5k/10k by random affine maps and noise of each split's own "
                                 "digits (reproduction experiments)", _digits_aug),
    "text": BuiltinDataset("character-level language modelling on the Python standard library's sources, "
                           "64-char windows", _text),
}


def import_arrays(name: str, x_path, y_path, data_dir, *, val_fraction: float | None = None,
                  test_fraction: float | None = None, seed: int = 0, x_val=None, y_val=None, x_test=None,
                  y_test=None, kind: str = "image", num_classes: int | None = None,
                  x_scale: float | None = None) -> Path:
    """Turn a user's .npy arrays into DATA_DIR/NAME/{train,val,test}.h5; return the directory.

    kind "image": x (N, ...) numbers, y (N,) class labels; uint8 x stays uint8 (with the file attribute
    x_scale, 1/255 unless given, for the loader to apply), other x becomes float32, y int64.
    kind "text": x and y (N, L) integer token ids (y usually x shifted by one), stored as kind
    "sequence" in the smallest of uint8/uint16/int32 that holds the vocabulary (num_classes).

    With x_val, y_val, x_test and y_test (all four) the user's split is kept (val/test in file
    order); otherwise a seeded random split (val_fraction / test_fraction, 0.1 each by default).
    Train rows are written in a seeded random order. The .npy files are memory-mapped and copied
    block by block (labels, token ids and finiteness checked on the way), so memory stays at a few
    blocks whatever their size. Everything is written into DATA_DIR/.NAME.tmp-<pid> and renamed to
    DATA_DIR/NAME only when complete (replacing an older NAME then); on any error nothing is left
    and DataError says why."""
    _check_import_args(name, kind, num_classes, x_scale)
    own = {"x_val": x_val, "y_val": y_val, "x_test": x_test, "y_test": y_test}
    own_split = all(v is not None for v in own.values())
    if not own_split and any(v is not None for v in own.values()):
        missing = ", ".join("--" + k.replace("_", "-") for k, v in own.items() if v is None)
        raise DataError(f"your own split needs all four of --x-val, --y-val, --x-test, --y-test (missing "
                        f"{missing}); give them all, or none for a seeded random split")
    if own_split and (val_fraction is not None or test_fraction is not None):
        raise DataError("--val-fraction/--test-fraction size the random split; with your own --x-val/--y-val/"
                        "--x-test/--y-test there is none: drop the fractions")
    if not own_split:
        val_fraction = 0.1 if val_fraction is None else val_fraction
        test_fraction = 0.1 if test_fraction is None else test_fraction
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise DataError(f"val_fraction={val_fraction} and test_fraction={test_fraction} must each be in "
                            f"(0, 1) and sum to less than 1")
    text = kind == "text"
    data_dir = Path(data_dir)
    final = data_dir / name
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        raise DataError(f"{final} exists and is not a directory (a file or a symbolic link); move it away "
                        f"or import under another name")
    tmp = data_dir / f".{name}.tmp-{os.getpid()}"
    try:
        paths = {"train": (Path(x_path), Path(y_path))}
        if own_split:
            paths.update(val=(Path(x_val), Path(y_val)), test=(Path(x_test), Path(y_test)))
        arrays = {s: (_load_npy(xp, "x"), _load_npy(yp, "y")) for s, (xp, yp) in paths.items()}
        for s, (xp, yp) in paths.items():
            _check_pair(*arrays[s], xp, yp, text)
        x0, _ = arrays["train"]
        for s, (x, _) in arrays.items():
            if x.shape[1:] != x0.shape[1:]:
                raise DataError(f"{paths[s][0]}: rows of shape {x.shape[1:]}, but {paths['train'][0]} has rows "
                                f"of shape {x0.shape[1:]}; every split's samples must have the same shape")
        n = len(x0)
        if own_split:
            plan = {"train": ("train", np.random.default_rng(seed).permutation(n)),
                    "val": ("val", np.arange(len(arrays["val"][0]))),
                    "test": ("test", np.arange(len(arrays["test"][0])))}
            for s, (src, rows) in plan.items():
                if len(rows) < MIN_PER_SPLIT:
                    raise DataError(f"{paths[src][0]} has {len(rows)} samples for the {s} split; every split "
                                    f"needs at least {MIN_PER_SPLIT}")
            source = (f"imported from train {paths['train'][0].resolve()}, {paths['train'][1].resolve()}; val "
                      f"{paths['val'][0].resolve()}, {paths['val'][1].resolve()}; test {paths['test'][0].resolve()}, "
                      f"{paths['test'][1].resolve()} (the given split; val/test in file order); train rows in "
                      f"random order, seed {seed}")
        else:
            n_val, n_test = round(n * val_fraction), round(n * test_fraction)
            sizes = {"train": n - n_val - n_test, "val": n_val, "test": n_test}
            if min(sizes.values()) < MIN_PER_SPLIT:
                raise DataError(f"{x_path} has {n} samples, which splits into {sizes}; every split needs at "
                                f"least {MIN_PER_SPLIT}: supply more samples or change the val/test fractions")
            perm = np.random.default_rng(seed).permutation(n)
            plan = {"train": ("train", perm[n_val + n_test:]),  # random order (block-wise shuffles mix classes)
                    "val": ("train", np.sort(perm[:n_val])), "test": ("train", np.sort(perm[n_val:n_val + n_test]))}
            source = (f"imported from {Path(x_path).resolve()} and {Path(y_path).resolve()}; random split "
                      f"val {val_fraction} / test {test_fraction}, seed {seed}; train rows in random order")

        stats = {"max": -1}
        limit = num_classes if num_classes is not None else MAX_CLASSES
        extra = None
        if text:
            vocab = num_classes
            if vocab is None and any(a.dtype.itemsize > 1 for pair in arrays.values() for a in pair):
                # the stored dtype depends on the vocabulary size: find it (one read of the token files)
                vocab = 1 + max(_scan_max(a, p, "token id", stats) for s in arrays
                                for a, p in zip(arrays[s], paths[s]))
            x_store = y_store = np.dtype(_token_dtype(vocab if vocab is not None else 256))
            stored_kind = "sequence"
        else:
            xs = {s: a[0].dtype for s, a in arrays.items()}
            if len({d == np.uint8 for d in xs.values()}) > 1:
                dtypes = ", ".join(f"{s}: {d}" for s, d in xs.items())
                raise DataError(f"the x files mix uint8 with other dtypes ({dtypes}); save them with the same "
                                f"dtype so that every split is scaled alike")
            x_store, y_store = np.dtype(np.uint8 if x0.dtype == np.uint8 else np.float32), np.dtype(np.int64)
            if x_scale is None:
                x_scale = 1 / 255 if x_store == np.uint8 else 1.0
            extra = {"x_scale": float(x_scale)}
            stored_kind = "image"
        provisional = num_classes if num_classes is not None else max(stats["max"] + 1, 0)

        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        for split in SPLITS:
            src, rows = plan[split]
            (x, y), (xp, yp) = arrays[src], paths[src]
            ids = dict(limit=limit, given=num_classes is not None, stats=stats)
            write_split_blocks(
                tmp, split,
                _x_blocks(x, rows, x_store, xp, ids if text else None),
                _y_blocks(y, rows, y_store, yp, ids, "token id" if text else "label"),
                rows=len(rows), x_shape=x.shape[1:], x_dtype=x_store, y_shape=y.shape[1:], y_dtype=y_store,
                name=name, kind=stored_kind, num_classes=provisional, source=source, extra_attrs=extra)
        if stats["max"] < 1:
            what = "token ids" if text else "labels"
            raise DataError(f"{paths['train'][1]}: all {what} are 0; "
                            + ("a vocabulary needs at least two tokens" if text else
                               "classification needs at least two classes"))
        final_classes = num_classes if num_classes is not None else stats["max"] + 1
        if final_classes != provisional:
            for split in SPLITS:
                _set_num_classes(tmp / f"{split}.h5", final_classes)
        del arrays, x0  # unmap the inputs
        _move_into_place(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, DataError):
            raise
        if isinstance(exc, (ValueError, MemoryError, OSError)):
            raise DataError(f"importing {name!r} failed ({type(exc).__name__}: {exc}); nothing was written "
                            f"to {final}") from exc
        raise
    return final


def _check_import_args(name: str, kind: str, num_classes, x_scale) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise DataError(f"dataset name {name!r} must be letters, digits, '.', '_' or '-' (it becomes a "
                        f"directory name); choose another name")
    if name in BUILTIN_DATASETS:
        raise DataError(f"{name!r} is a built-in dataset (`hpcdistill data prepare {name}`); import your "
                        f"arrays under another name")
    if kind not in IMPORT_KINDS:
        raise DataError(f"kind {kind!r} is not one of {IMPORT_KINDS} (image: classification of fixed-shape "
                        f"inputs; text: integer token ids)")
    if num_classes is not None and not (isinstance(num_classes, (int, np.integer)) and not isinstance(num_classes, bool)
                                        and 2 <= num_classes <= MAX_CLASSES):
        raise DataError(f"--num-classes {num_classes!r} must be an integer in 2..{MAX_CLASSES:,} "
                        f"({'the vocabulary size' if kind == 'text' else 'the number of classes'})")
    if x_scale is not None:
        if kind != "image":
            raise DataError("--x-scale applies to images only (token ids are not scaled); drop it")
        if not (isinstance(x_scale, (int, float, np.floating)) and math.isfinite(x_scale) and x_scale > 0):
            raise DataError(f"--x-scale {x_scale!r} must be a positive finite number (the loader multiplies x by it)")


def _check_pair(x: np.ndarray, y: np.ndarray, x_path: Path, y_path: Path, text: bool) -> None:
    """Shapes and dtypes of one split's x and y (their values are checked block by block later)."""
    if text:
        if x.dtype.kind not in "iu" or x.ndim != 2:
            raise DataError(f"{x_path}: text x must be integer token ids of shape (N, L), one sequence of "
                            f"L tokens per row, got dtype {x.dtype} shape {x.shape}; e.g. np.save(path, "
                            f"ids.reshape(-1, L).astype(np.int32))")
        if y.dtype.kind not in "iu" or y.shape != x.shape:
            raise DataError(f"{y_path}: text y must be integer token ids of x's shape {x.shape} (usually the "
                            f"next token of each position), got dtype {y.dtype} shape {y.shape}")
        return
    if x.dtype.kind not in "fiub" or x.ndim < 2:
        raise DataError(f"{x_path}: x must be a numeric array of shape (N, ...) with one row per sample, "
                        f"got dtype {x.dtype} shape {x.shape}; e.g. np.save(path, x.reshape(len(x), -1)"
                        f".astype(np.float32))")
    if y.dtype.kind not in "iu" or y.ndim != 1:
        raise DataError(f"{y_path}: y must be a 1-D integer array of class labels 0..C-1, got dtype "
                        f"{y.dtype} shape {y.shape}; e.g. np.save(path, y.reshape(-1).astype(np.int64))")
    if len(x) != len(y):
        raise DataError(f"{x_path} has {len(x)} samples but {y_path} has {len(y)} labels; they must be "
                        f"the same length, row i of x labelled by y[i]")


def _token_dtype(vocab: int):
    """The smallest dtype that holds token ids 0..vocab-1 (int32 beyond uint16: MAX_CLASSES fits)."""
    return np.uint8 if vocab <= 2**8 else np.uint16 if vocab <= 2**16 else np.int32


def _block_rows(shape, dtype) -> int:
    return max(1, CHUNK_BYTES // max(1, np.dtype(dtype).itemsize * int(np.prod(shape))))


def _release(arr: np.ndarray, lo: int, hi: int) -> None:
    """Drop the mapped pages around rows lo..hi-1 of a memory-mapped array from this process's
    resident set (they stay in the page cache). A fault may map a whole large page-cache folio (up to
    _FOLIO bytes) around the byte touched, so the range is widened to whole folios."""
    mm = getattr(arr, "_mmap", None)
    if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    row_bytes = arr.itemsize * int(np.prod(arr.shape[1:]))
    begin = arr.offset - arr.offset % mmap.ALLOCATIONGRANULARITY  # where numpy's mapping starts in the file
    a = max(begin, (arr.offset + lo * row_bytes) // _FOLIO * _FOLIO) - begin
    b = min(len(mm), -(-(arr.offset + hi * row_bytes) // _FOLIO) * _FOLIO - begin)
    if b > a:
        try:
            mm.madvise(mmap.MADV_DONTNEED, a, b - a)
        except (OSError, ValueError):
            pass


def _gather(arr: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """arr[rows] as an in-memory array. The rows are read in file order, a window of the file at a
    time, and each window's pages are released right after, so the resident memory stays at about one
    block plus one window however the rows are spread over the file."""
    order = np.argsort(rows, kind="stable")
    ordered = rows[order]
    out = np.empty((len(rows), *arr.shape[1:]), arr.dtype)
    row_bytes = max(1, arr.itemsize * int(np.prod(arr.shape[1:])))
    window = ordered * row_bytes // _WINDOW
    cuts = [0, *(np.flatnonzero(np.diff(window)) + 1).tolist(), len(rows)]
    for a, b in zip(cuts[:-1], cuts[1:]):
        lo, hi = int(ordered[a]), int(ordered[b - 1]) + 1
        out[order[a:b]] = arr[lo:hi] if hi - lo == b - a else arr[ordered[a:b]]
        _release(arr, lo, hi)
    return out


def _first_row(mask: np.ndarray, rows: np.ndarray) -> int:
    return int(rows[np.argmax(mask.reshape(len(mask), -1).any(axis=1))])


def _check_ids(block: np.ndarray, rows: np.ndarray, path: Path, what: str, *, limit: int, given: bool,
               stats: dict) -> None:
    """Every id in `block` (rows `rows` of `path`) must be in [0, limit); track the largest seen."""
    if block.size == 0:
        return
    lo, hi = int(block.min()), int(block.max())
    fix = ("map your classes to 0..C-1, e.g. y = np.unique(y, return_inverse=True)[1]" if what == "label" else
           "map your tokens to 0..V-1, e.g. ids = np.unique(ids, return_inverse=True)[1]")
    if lo < 0:
        raise DataError(f"{path}: {what}s must be non-negative (found {lo} at row "
                        f"{_first_row(block < 0, rows)}); {fix}")
    if hi >= limit:
        at = f"{what} {hi} at row {_first_row(block >= limit, rows)}"
        if hi > _INT64_MAX:
            raise DataError(f"{path}: {at} does not fit int64 (uint64 values above 2**63-1 are refused, not "
                            f"wrapped around to negative numbers); {fix}")
        if hi >= MAX_CLASSES:
            raise DataError(f"{path}: {at} is beyond the bound of {MAX_CLASSES:,} "
                            f"{'classes' if what == 'label' else 'tokens'} (MAX_CLASSES): {what}s must be "
                            f"indices 0..C-1 with C <= {MAX_CLASSES:,}; {fix}")
        raise DataError(f"{path}: {at} is outside [0, {limit}) set by --num-classes {limit}; pass "
                        f"--num-classes {hi + 1} (or leave it out: max + 1), or {fix}")
    stats["max"] = max(stats["max"], hi)


def _scan_max(arr: np.ndarray, path: Path, what: str, stats: dict) -> int:
    """The largest id in `arr`, read block by block (ids are checked on the way)."""
    step = _block_rows(arr.shape[1:], arr.dtype)
    for a in range(0, len(arr), step):
        rows = np.arange(a, min(a + step, len(arr)))
        _check_ids(_gather(arr, rows), rows, path, what, limit=MAX_CLASSES, given=False, stats=stats)
    return stats["max"]


def _x_blocks(x: np.ndarray, rows: np.ndarray, store: np.dtype, path: Path, ids: dict | None):
    """Rows `rows` of x as stored (`store`), block by block; `ids` (text): check them as token ids."""
    step = _block_rows(x.shape[1:], store)
    for a in range(0, len(rows), step):
        at = rows[a:a + step]
        block = _gather(x, at)
        if ids is not None:
            _check_ids(block, at, path, "token id", **ids)
        elif block.dtype.kind == "f":
            with np.errstate(over="ignore", invalid="ignore"):
                block = block.astype(store)
            bad = ~np.isfinite(block)
            if bad.any():
                raise DataError(f"{path}: x holds NaN or infinite values (after conversion to float32), "
                                f"first in row {_first_row(bad, at)}; clean or rescale them before importing")
        yield block.astype(store, copy=False)


def _y_blocks(y: np.ndarray, rows: np.ndarray, store: np.dtype, path: Path, ids: dict, what: str):
    step = _block_rows(y.shape[1:], y.dtype)
    for a in range(0, len(rows), step):
        at = rows[a:a + step]
        block = _gather(y, at)
        _check_ids(block, at, path, what, **ids)
        yield block.astype(store)


def _set_num_classes(path: Path, num_classes: int) -> None:
    with h5py.File(path, "r+") as f:
        f.attrs["num_classes"] = int(num_classes)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename the complete tmp directory to `final`; an existing `final` is set aside first and
    removed only once the new one is in place (put back if the rename fails)."""
    fsync_dir(tmp)
    if not final.exists():
        os.rename(tmp, final)
    else:
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.rename(final, old)
        try:
            os.rename(tmp, final)
        except BaseException:
            os.rename(old, final)
            raise
        fsync_dir(final.parent)
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(final.parent)


def _load_npy(path, what: str) -> np.ndarray:
    """Memory-map a .npy file (never read whole, never unpickled)."""
    path = Path(path)
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{what} file {path} does not exist; pass the path of a .npy file") from None
    except ValueError as e:
        if "pickle" in str(e).lower() or "object" in str(e).lower():
            raise DataError(f"{path} holds Python objects (it needs pickle, which is refused for safety); "
                            f"save a plain numeric array, e.g. np.save(path, np.asarray({what}, "
                            f"dtype=np.float32))") from None
        raise DataError(f"{path} is not a readable .npy file ({e}); write it with np.save") from None
    except OSError as e:
        raise DataError(f"{path} is not a readable .npy file ({e}); write it with np.save") from None
    if not isinstance(arr, np.ndarray):
        arr.close()
        raise DataError(f"{path} is an .npz archive; save the {what} array alone with np.save(path, {what})")
    if arr.ndim > 1 and not arr.flags.c_contiguous:
        raise DataError(f"{path} is stored in Fortran (column) order, which spreads every sample over the "
                        f"whole file; save it row by row: np.save(path, np.ascontiguousarray({what}))")
    return arr


def remedy(name: str) -> str:
    """The command that (re)creates dataset `name`."""
    if name in BUILTIN_DATASETS:
        return f"run `hpcdistill data prepare {name}`"
    return (f"run `hpcdistill data import {name} --x X.npy --y Y.npy`, or `hpcdistill data prepare "
            f"NAME` for a built-in dataset ({', '.join(BUILTIN_DATASETS)})")


def dataset_info(data_dir, name: str, *, verify: bool = True) -> DatasetInfo:
    """Describe dataset `name` under `data_dir`, checking that its three split files agree.

    With `verify` (the default) every file is re-hashed, so a damaged file is caught here rather
    than mid-run; pass verify=False where only the attributes are needed (e.g. on every rank of a
    large job after one rank has verified)."""
    path = Path(data_dir) / name
    if not path.is_dir():
        raise DataError(f"dataset {name!r} not found: {path} does not exist; {remedy(name)}")
    missing = [s for s in SPLITS if not (path / f"{s}.h5").is_file()]
    if missing:
        raise DataError(f"dataset {name!r} in {path} is incomplete (missing "
                        f"{', '.join(s + '.h5' for s in missing)}); {remedy(name)}")
    splits = {s: read_split_attrs(path / f"{s}.h5", verify=verify, fix=remedy(name)) for s in SPLITS}
    first = splits["train"]
    for s, a in splits.items():
        for key in ("name", "kind", "num_classes", "input_shape", "vocab"):
            if a.get(key) != first.get(key):
                raise DataError(f"dataset {name!r}: {s}.h5 has {key}={a.get(key)!r} but train.h5 has "
                                f"{first.get(key)!r} (files from different datasets?); {remedy(name)}")
        if a.get("split") != s:
            raise DataError(f"{path / (s + '.h5')} holds split {a.get('split')!r}, not {s!r}; {remedy(name)}")
    return DatasetInfo(name=first["name"], kind=first["kind"], num_classes=int(first["num_classes"]),
                       input_shape=tuple(first["input_shape"]),
                       sizes={s: int(a["rows"]) for s, a in splits.items()},
                       source=first["source"], vocab=first.get("vocab"), path=path)
