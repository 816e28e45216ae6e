"""Built-in datasets made from real data already on the machine, and import of a user's own arrays.

Nothing is downloaded: `digits` ships inside scikit-learn and `text` is cut from the Python
standard library's sources, so `hpcdistill data prepare` works on compute nodes without internet.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import sysconfig
from pathlib import Path

import numpy as np

from hpcdistill.data.format import DataError, dataset_info, write_split

BUILTIN_DATASETS = {
    "digits": "scikit-learn's 1797 handwritten digits, 8x8 grey images, 10 classes",
    "text": "character-level language modelling on the Python standard library's sources, 64-char windows",
}

SEQ_LEN = 64
CORPUS_CHARS = 4_000_000
MIN_CORPUS_CHARS = 1_000_000
REPLACEMENT = "\x1a"  # ASCII SUB stands for every character outside printable ASCII and "\n"
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
MIN_PER_SPLIT = 10


def prepare(name: str, data_dir, *, seed: int = 0, force: bool = False) -> tuple[Path, bool]:
    """Write DATA_DIR/NAME/{train,val,test}.h5 for a built-in dataset; return the directory and
    whether it was written (False: valid existing files were kept).

    Valid existing files are kept (so every job script may call this) unless `force`."""
    builders = {"digits": _digits, "text": _text}
    if name not in builders:
        raise DataError(f"no built-in dataset {name!r} (built-ins: {', '.join(BUILTIN_DATASETS)}); "
                        f"for your own arrays run `hpcdistill data import {name} --x X.npy --y Y.npy`")
    path = Path(data_dir) / name
    if not force:
        try:
            dataset_info(data_dir, name)
            return path, False
        except DataError:
            pass  # missing or damaged: build it
    for split, (x, y), attrs in builders[name](seed):
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


def import_arrays(name: str, x_path, y_path, data_dir, *, val_fraction: float = 0.1,
                  test_fraction: float = 0.1, seed: int = 0) -> Path:
    """Turn a user's x.npy (N, ...) numbers and y.npy (N,) class labels into a dataset; return its dir.

    The split is a seeded random permutation; x is stored as float32 (kind "image")."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise DataError(f"dataset name {name!r} must be letters, digits, '.', '_' or '-' (it becomes a "
                        f"directory name); choose another name")
    if name in BUILTIN_DATASETS:
        raise DataError(f"{name!r} is a built-in dataset (`hpcdistill data prepare {name}`); import your "
                        f"arrays under another name")
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DataError(f"val_fraction={val_fraction} and test_fraction={test_fraction} must each be in "
                        f"(0, 1) and sum to less than 1")
    x, y = _load_npy(x_path, "x"), _load_npy(y_path, "y")
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
    if len(y) and y.min() < 0:
        raise DataError(f"{y_path}: labels must be non-negative (found {int(y.min())}); map your classes "
                        f"to 0..C-1, e.g. with np.unique(y, return_inverse=True)[1]")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise DataError(f"{x_path}: x holds NaN or infinite values (after conversion to float32); clean "
                        f"or rescale them before importing")
    n = len(y)
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    sizes = {"train": n - n_val - n_test, "val": n_val, "test": n_test}
    if min(sizes.values()) < MIN_PER_SPLIT:
        raise DataError(f"{x_path} has {n} samples, which splits into {sizes}; every split needs at least "
                        f"{MIN_PER_SPLIT}: supply more samples or change the val/test fractions")
    num_classes = int(y.max()) + 1
    if num_classes < 2:
        raise DataError(f"{y_path}: all labels are 0; classification needs at least two classes")
    perm = np.random.default_rng(seed).permutation(n)
    rows_of = {"val": perm[:n_val], "test": perm[n_val:n_val + n_test], "train": perm[n_val + n_test:]}
    source = (f"imported from {Path(x_path).resolve()} and {Path(y_path).resolve()}; random split "
              f"val {val_fraction} / test {test_fraction}, seed {seed}")
    path = Path(data_dir) / name
    for split in ("train", "val", "test"):
        rows = np.sort(rows_of[split])
        write_split(path, split, x[rows], y[rows].astype(np.int64), name=name, kind="image",
                    num_classes=num_classes, source=source)
    return path


def _load_npy(path, what: str) -> np.ndarray:
    path = Path(path)
    try:
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{what} file {path} does not exist; pass the path of a .npy file") from None
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise DataError(f"{path} holds Python objects (it needs pickle, which is refused for safety); "
                            f"save a plain numeric array, e.g. np.save(path, np.asarray({what}, "
                            f"dtype=np.float32))") from None
        raise DataError(f"{path} is not a readable .npy file ({e}); write it with np.save") from None
    except OSError as e:
        raise DataError(f"{path} is not a readable .npy file ({e}); write it with np.save") from None
    if not isinstance(arr, np.ndarray):
        arr.close()
        raise DataError(f"{path} is an .npz archive; save the {what} array alone with np.save(path, {what})")
    return arr
