"""The on-disk dataset layout: DATA_DIR/NAME/{train,val,test}.h5, self-describing and checksummed.

Each split file holds chunked datasets `x` and `y` (so a rank can read its rows without the rest)
and file attributes that say what the data is. A sha256 over the bytes of x then y lets
`dataset_info` tell a damaged or half-copied file from a good one before a job trains on it.
Files are written under a temporary name and renamed, so readers never see a partial file.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from hpcdistill.atomic import atomic_path
from hpcdistill.config import MAX_CLASSES

FORMAT = "hpcdistill-dataset"
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
KINDS = ("image", "sequence")
CHUNK_BYTES = 256 * 1024  # rows per chunk are chosen so one chunk is about this big


class DataError(Exception):
    """A dataset is missing, damaged or invalid; the message says what to do about it."""


@dataclass(frozen=True)
class DatasetInfo:
    """What a prepared dataset holds, read from its files' attributes."""

    name: str
    kind: str  # "image": classification of fixed-shape float inputs; "sequence": next-token LM
    num_classes: int  # classes, or vocabulary size for "sequence"
    input_shape: tuple[int, ...]  # shape of one sample's x
    sizes: dict[str, int]  # samples per split
    source: str
    vocab: str | None  # for "sequence": the character of each token id
    path: Path  # the dataset directory

    def file(self, split: str) -> Path:
        return self.path / f"{split}.h5"


def write_split(directory: Path, split: str, x: np.ndarray, y: np.ndarray, *, name: str, kind: str,
                num_classes: int, source: str, vocab: str | None = None) -> Path:
    """Write one split file atomically (temporary file in the same directory, fsync, rename)."""
    x, y = np.ascontiguousarray(x), np.ascontiguousarray(y)
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"{split}: x has {len(x)} rows and y {len(y)}; need the same, non-zero")
    return write_split_blocks(directory, split, _row_blocks(x), _row_blocks(y), rows=len(x),
                              x_shape=x.shape[1:], x_dtype=x.dtype, y_shape=y.shape[1:], y_dtype=y.dtype,
                              name=name, kind=kind, num_classes=num_classes, source=source, vocab=vocab)


def write_split_blocks(directory: Path, split: str, x_blocks, y_blocks, *, rows: int, x_shape, x_dtype,
                       y_shape, y_dtype, name: str, kind: str, num_classes: int, source: str,
                       vocab: str | None = None, extra_attrs: dict | None = None) -> Path:
    """Write one split file atomically from row blocks, so its data never has to be in memory at once.

    `x_blocks` yields arrays of shape (k, *x_shape) and dtype `x_dtype` (exactly: nothing is cast
    here), `rows` rows in all; it is consumed completely before `y_blocks` (the same for y). The
    sha256 (over x's bytes then y's, as stored) is computed from the blocks as they are written.
    `extra_attrs` adds file attributes (it may not replace the standard ones). ValueError if the
    blocks do not match the declared shape, dtype or row count; the file is then not created."""
    x_shape, y_shape = tuple(int(d) for d in x_shape), tuple(int(d) for d in y_shape)
    x_dtype, y_dtype = np.dtype(x_dtype), np.dtype(y_dtype)
    if rows <= 0:
        raise ValueError(f"{split}: {rows} rows; a split needs at least one")
    attrs = {"format": FORMAT, "format_version": FORMAT_VERSION, "name": name, "kind": kind,
             "num_classes": int(num_classes), "input_shape": np.asarray(x_shape, np.int64),
             "source": source, "split": split}
    if vocab is not None:
        attrs["vocab"] = vocab
    clash = set(extra_attrs or ()) & (set(attrs) | {"sha256", "vocab"})
    if clash:
        raise ValueError(f"extra_attrs may not set the standard attributes {sorted(clash)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{split}.h5"
    digest = hashlib.sha256()
    with atomic_path(final) as tmp:
        with h5py.File(tmp, "w") as f:
            for key, blocks, shape, dtype in (("x", x_blocks, x_shape, x_dtype), ("y", y_blocks, y_shape, y_dtype)):
                ds = f.create_dataset(key, shape=(rows, *shape), dtype=dtype, chunks=_chunk_shape(rows, shape, dtype))
                at = 0
                for block in blocks:
                    if not isinstance(block, np.ndarray) or block.dtype != dtype or block.shape[1:] != shape:
                        raise ValueError(f"{split}.{key}: a block of {type(block).__name__} "
                                         f"{getattr(block, 'dtype', '?')} {getattr(block, 'shape', '?')} does "
                                         f"not match the declared (k, *{shape}) {dtype}")
                    if at + len(block) > rows:
                        raise ValueError(f"{split}.{key}: the blocks hold more than the declared {rows} rows")
                    if len(block):
                        block = np.ascontiguousarray(block)
                        ds[at:at + len(block)] = block
                        digest.update(block)
                        at += len(block)
                if at != rows:
                    raise ValueError(f"{split}.{key}: the blocks hold {at} rows, {rows} were declared")
            attrs["sha256"] = digest.hexdigest()
            attrs.update(extra_attrs or {})
            f.attrs.update(attrs)
    return final


def _chunk_shape(rows: int, shape: tuple[int, ...], dtype: np.dtype) -> tuple[int, ...]:
    """Chunks along the first axis, about CHUNK_BYTES each."""
    row_bytes = max(1, dtype.itemsize * int(np.prod(shape)))
    return (max(1, min(rows, CHUNK_BYTES // row_bytes)), *shape)


def _row_blocks(arr: np.ndarray):
    step = _chunk_shape(len(arr), arr.shape[1:], arr.dtype)[0]
    for a in range(0, len(arr), step):
        yield arr[a:a + step]


def _blocks(ds):
    """A dataset's rows in chunk-sized blocks, so hashing a big file never holds it all in memory."""
    step = ds.chunks[0] if ds.chunks else max(1, CHUNK_BYTES // max(1, ds[:1].nbytes))
    for a in range(0, ds.shape[0], step):
        yield ds[a:a + step]


def _digest(*parts) -> str:
    """sha256 over the bytes of x then y, each given as an iterable of row blocks."""
    h = hashlib.sha256()
    for blocks in parts:
        for block in blocks:
            h.update(np.ascontiguousarray(block))
    return h.hexdigest()


class _ValueCheck:
    """Checks values as the checksum pass streams them: labels (token ids) in [0, num_classes), inputs
    finite. A label of 12 with 10 classes was an IndexError mid-run; a NaN input looked like divergence."""

    def __init__(self, path: Path, kind: str, num_classes: int, fix: str):
        self.path, self.kind, self.num_classes, self.fix = path, kind, num_classes, fix

    def blocks(self, blocks, which: str):
        row = 0
        for block in blocks:
            if which == "y" or self.kind == "sequence":
                if block.dtype.kind not in "iu":
                    raise DataError(f"{self.path}: {which} holds {block.dtype} values, expected integer labels; "
                                    f"{self.fix}")
                bad = (block < 0) | (block >= self.num_classes)
                if bad.any():
                    at = row + int(np.argwhere(bad)[0][0])
                    raise DataError(f"{self.path}: {which}[{at}] holds {block[bad][0]}, outside [0, "
                                    f"{self.num_classes}) for num_classes {self.num_classes}; {self.fix}")
            elif block.dtype.kind == "f" and not np.isfinite(block).all():
                at = row + int(np.argwhere(~np.isfinite(block))[0][0])
                raise DataError(f"{self.path}: x[{at}] holds NaN or infinite values; clean the data and import it "
                                f"again; {self.fix}")
            row += len(block)
            yield block


def read_split_attrs(path: Path, *, verify: bool = False, fix: str = "rebuild or re-import the dataset") -> dict:
    """The attributes of one split file plus `rows` and `row_bytes` (x and y of one sample);
    DataError if it is not a valid split file.

    `verify` re-hashes x and y against the stored sha256 (reads the whole file), checking on the way
    that every label is within [0, num_classes) and every float input finite."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: _plain(v) for k, v in f.attrs.items()}
            if attrs.get("format") != FORMAT:
                raise DataError(f"{path} is not an hpcdistill dataset file (format attribute "
                                f"{attrs.get('format')!r}); {fix}")
            if attrs.get("format_version") != FORMAT_VERSION:
                raise DataError(f"{path} has format_version {attrs.get('format_version')!r}, this "
                                f"hpcdistill reads {FORMAT_VERSION}; {fix}")
            if "x" not in f or "y" not in f:
                raise DataError(f"{path} lacks the x or y dataset; {fix}")
            x, y = f["x"], f["y"]
            attrs["rows"] = x.shape[0]
            attrs["row_bytes"] = x.dtype.itemsize * int(np.prod(x.shape[1:])) + y.dtype.itemsize * int(
                np.prod(y.shape[1:]))
            if y.shape[0] != x.shape[0] or tuple(x.shape[1:]) != tuple(attrs.get("input_shape", ())):
                raise DataError(f"{path}: x {x.shape} and y {y.shape} do not match input_shape "
                                f"{attrs.get('input_shape')}; {fix}")
            if attrs.get("kind") not in KINDS:
                raise DataError(f"{path}: unknown kind {attrs.get('kind')!r} (expected one of {KINDS}); {fix}")
            if verify:
                classes = attrs.get("num_classes")
                if not (isinstance(classes, int) and 2 <= classes <= MAX_CLASSES):
                    raise DataError(f"{path}: num_classes {classes!r} is not an int in 2..{MAX_CLASSES}; {fix}")
                check = _ValueCheck(path, attrs["kind"], classes, fix)
                if _digest(check.blocks(_blocks(x), "x"), check.blocks(_blocks(y), "y")) != attrs.get("sha256"):
                    raise DataError(f"{path} is damaged: its x/y bytes do not match the stored sha256; {fix}")
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"dataset file {path} does not exist; {fix}") from None
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as e:
        raise DataError(f"{path} cannot be read as a dataset file ({e}); {fix}") from None
    return attrs


def _plain(v):
    """h5py attribute values as plain Python (JSON-able) values."""
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.ndarray):
        return tuple(int(i) for i in v)
    if isinstance(v, np.generic):
        return v.item()
    return v
