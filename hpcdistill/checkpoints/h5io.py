"""The checkpoint file format: plain HDF5, checksummed, written atomically, never pickled.

Checkpoints travel between jobs and between groups over a shared filesystem, so a reader must be
able to reject any damaged or foreign file with one exception type, and a reader must never see a
half-written file. Layout (readable with plain h5py):

    /<key>                 one dataset per array; "/" in a key makes HDF5 groups ("model/fc1.weight")
    /<key>.attrs[torch_dtype]   only for torch dtypes numpy lacks (bfloat16, float8): the dataset
                           holds a same-width unsigned-integer view of the bits
    /.attrs: format="hpcdistill-checkpoint", format_version=1, meta=<JSON>, sha256=<hex>

Strings are stored as fixed-length bytes (UTF-8) so that no object/variable-length type exists in
the file. sha256 covers every dataset's key, dtype, shape, torch_dtype and bytes in sorted key order,
then the meta JSON.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from hpcdistill.atomic import atomic_path

FORMAT = "hpcdistill-checkpoint"
FORMAT_VERSION = 1
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# bool, signed/unsigned int, float, complex: nothing that needs pickle or an object reference.
_NUMERIC_KINDS = "biufc"
_UINT_OF_WIDTH = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_INT_OF_WIDTH = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}


class CheckpointError(Exception):
    """A checkpoint that cannot be used; `path` may be None when no file is involved (restore).

    `code` sorts refusals for summaries (teachers_rejected_by_reason): not-a-file, not-hdf5, truncated,
    unreadable, format, too-large, checksum, architecture, another-run, non-finite, diverged, mismatch,
    io (a transient read error: worth trying again), timeout, symlink."""

    def __init__(self, path: str | os.PathLike | None, reason: str, code: str = "format"):
        self.path = Path(path) if path is not None else None
        self.reason = reason
        self.code = code
        super().__init__(f"{self.path}: {reason}" if self.path is not None else reason)


def _to_storable(key: str, value) -> tuple[np.ndarray, str | None]:
    """Return (little-endian C-order numpy array, torch dtype name if stored as a bit view)."""
    torch_dtype = None
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided:
            raise TypeError(f"{key}: only dense tensors can be stored, not {value.layout}")
        t = value.detach().cpu().contiguous()
        try:
            value = t.numpy()
        except TypeError:  # numpy has no such dtype: keep the bits, remember the torch dtype
            torch_dtype = str(t.dtype).removeprefix("torch.")
            width = t.element_size()
            value = t.reshape(-1).view(torch.uint8).numpy().view(_UINT_OF_WIDTH[width]).reshape(t.shape)
    a = np.asarray(value)
    if a.dtype.kind not in _NUMERIC_KINDS:
        raise TypeError(f"{key}: dtype {a.dtype} is not numeric; checkpoints hold numeric arrays only "
                        f"(put strings and other values in meta)")
    return np.asarray(a, dtype=a.dtype.newbyteorder("<"), order="C"), torch_dtype


def _check_key(key: str) -> None:
    parts = key.split("/")
    if not key or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid checkpoint key {key!r}: use non-empty '/'-separated names")


def _meta_json(meta: dict) -> str:
    def default(o):
        if isinstance(o, np.generic):  # e.g. a np.float32 loss
            return o.item()
        raise TypeError(f"meta value {o!r} of type {type(o).__name__} is not JSON-serialisable")
    return json.dumps(meta, sort_keys=True, default=default)


def _digest(items: list[tuple[str, np.ndarray, str | None]], meta_json: str) -> str:
    h = hashlib.sha256()
    for key, a, torch_dtype in sorted(items, key=lambda it: it[0]):
        h.update(json.dumps([key, a.dtype.str, list(a.shape), torch_dtype]).encode())
        h.update(np.asarray(a, dtype=a.dtype.newbyteorder("<"), order="C").reshape(-1).view(np.uint8))
    h.update(meta_json.encode())
    return h.hexdigest()


def write_h5(path, arrays: dict, meta: dict) -> Path:
    """Write `arrays` (numpy or torch, any shape incl. 0-d) and JSON-able `meta` to `path` atomically.

    The data goes to a hidden temporary file in the same directory, is fsync'ed, then renamed onto
    `path`: readers see the old file or the complete new one, never a partial one. Raises TypeError
    for values that are not numeric arrays (object, string, void: anything that would need pickle).
    meta goes through JSON: tuples come back as lists and dict keys as strings.
    """
    path = Path(path)
    items = []
    for key, value in arrays.items():
        _check_key(key)
        items.append((key, *_to_storable(key, value)))
    meta_json = _meta_json(meta)
    with atomic_path(path) as tmp:
        # libver v108: superblock and object headers carry their own checksums (HDF5 >= 1.8 reads it),
        # and attributes larger than 64 KiB (big meta) are allowed.
        with h5py.File(tmp, "w", libver="v108") as f:
            for key, a, torch_dtype in items:
                ds = _write_dataset(f, key, a)
                if torch_dtype is not None:
                    ds.attrs["torch_dtype"] = np.bytes_(torch_dtype.encode())
            f.attrs["format"] = np.bytes_(FORMAT.encode())
            f.attrs["format_version"] = np.int64(FORMAT_VERSION)
            f.attrs["meta"] = np.bytes_(meta_json.encode())
            f.attrs["sha256"] = np.bytes_(_digest(items, meta_json).encode())
            f.flush()
    return path


WRITE_BLOCK = 16 * 2**20  # bytes per h5py call when writing: h5py holds its global lock for a call


def _write_dataset(f, key: str, a: np.ndarray):
    """A contiguous dataset written in pieces of about WRITE_BLOCK bytes (whole rows): a background
    write of a large model then releases h5py's lock between pieces, so the loop's own HDF5 reads
    (the input pipeline, teacher files) wait for one piece, not for the whole array."""
    if a.ndim == 0 or a.nbytes <= WRITE_BLOCK or a.shape[0] == 1:
        return f.create_dataset(key, data=a)
    ds = f.create_dataset(key, shape=a.shape, dtype=a.dtype)
    rows = max(1, WRITE_BLOCK // max(1, a[0].nbytes))
    for i in range(0, a.shape[0], rows):
        ds[i:i + rows] = a[i:i + rows]
    return ds


def _text(value, what: str, path: Path) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, str):
        return value
    raise CheckpointError(path, f"wrong format: attribute {what} is not a string")


def to_tensor(value) -> torch.Tensor:
    """A read_h5 value (numpy array, or torch tensor for bit-view dtypes) as a torch tensor."""
    return value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))


def _from_bits(a: np.ndarray, name: str, key: str, path: Path) -> torch.Tensor:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or dtype.itemsize != a.dtype.itemsize or a.dtype.kind != "u":
        raise CheckpointError(path, f"wrong format: {key} has torch_dtype={name!r} over {a.dtype}")
    return torch.from_numpy(a.view(_INT_OF_WIDTH[a.dtype.itemsize])).view(dtype)


def layout_dtype(dtype: np.dtype, torch_dtype: str | None) -> str:
    """The torch dtype name a stored dataset stands for ("float32", "bfloat16", ...)."""
    return (torch_dtype if torch_dtype is not None
            else str(torch.from_numpy(np.empty(0, dtype)).dtype).removeprefix("torch."))


ROOT_ATTRS = {"format", "format_version", "meta", "sha256"}
READ_BLOCK = 16 * 2**20       # bytes hashed per read: memory stays at what the caller keeps, plus this
READ_SECONDS = 300.0          # a read of one file that takes longer is refused (a file on a hung server)
METADATA_SECONDS = 10.0       # ... and its metadata alone (a checkpoint has a few thousand objects: < 1 s)
MAX_OBJECTS = 50_000          # groups and datasets: a model of 10,000 tensors with Adam state has ~30,000


def _read(path: Path, verify: bool, check, keep, meta_only: bool = False) -> tuple[dict, dict]:
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):  # opening a FIFO or a device would block or never end
        raise CheckpointError(path, "not a regular file", "not-a-file")
    with open(path, "rb") as fh:
        head = fh.read(len(HDF5_SIGNATURE))
    if len(head) < len(HDF5_SIGNATURE):
        raise CheckpointError(path, f"truncated ({len(head)} bytes)", "truncated")
    if head != HDF5_SIGNATURE:
        raise CheckpointError(path, "not an HDF5 file", "not-hdf5")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        truncated = "truncated" in str(e)
        raise CheckpointError(path, f"{'truncated' if truncated else 'unreadable HDF5'} ({e})",
                              "truncated" if truncated else "unreadable") from None
    deadline = time.monotonic() + READ_SECONDS
    metadata_deadline = time.monotonic() + METADATA_SECONDS
    with f:
        # The schema first, from HDF5's metadata alone: what this writer makes and nothing else.
        extra_attrs = set(f.attrs) - ROOT_ATTRS
        if extra_attrs:
            raise CheckpointError(path, f"wrong format: unexpected file attributes {sorted(extra_attrs)[:5]}")
        fmt = f.attrs.get("format")
        if fmt is None or _text(fmt, "format", path) != FORMAT:
            raise CheckpointError(path, f"not a checkpoint (format attribute {fmt!r}, expected {FORMAT!r})")
        version = f.attrs.get("format_version")
        if not isinstance(version, (int, np.integer)) or version != FORMAT_VERSION:
            raise CheckpointError(path, f"unsupported format_version {version!r} (expected {FORMAT_VERSION})")
        meta_json = _text(f.attrs.get("meta", b""), "meta", path)
        stored = _text(f.attrs.get("sha256", b""), "sha256", path)
        try:
            meta = json.loads(meta_json)
        except ValueError as e:
            raise CheckpointError(path, f"wrong format: meta is not JSON ({e})") from None
        if not isinstance(meta, dict):
            raise CheckpointError(path, f"wrong format: meta is a JSON {type(meta).__name__}, not an object")
        # Soft and external links could point anywhere (another file, a FIFO): only hard links exist here.
        links = []
        f.visit_links(lambda name: links.append(name))
        if len(links) > MAX_OBJECTS:  # opening each costs ~0.25 ms: 50,000 empty datasets stalled a reader 14 s
            raise CheckpointError(path, f"wrong format: {len(links)} objects (at most {MAX_OBJECTS})", "too-large")
        foreign = [n for n in links if not isinstance(f.get(n, getlink=True), h5py.HardLink)]
        if foreign:
            raise CheckpointError(path, f"wrong format: soft or external link {foreign[0]!r}")
        datasets = []
        for i, name in enumerate(links):
            if i % 256 == 0 and time.monotonic() > metadata_deadline:
                raise CheckpointError(path, f"its metadata took more than {METADATA_SECONDS:.0f} s to read", "timeout")
            obj = f.get(name)
            if isinstance(obj, h5py.Dataset):
                datasets.append((name, obj))
            elif not isinstance(obj, h5py.Group):
                raise CheckpointError(path, f"wrong format: {name!r} is a {type(obj).__name__}")
        layout, declared = {}, 0
        for key, ds in datasets:
            if ds.dtype.kind not in _NUMERIC_KINDS:
                raise CheckpointError(path, f"wrong format: dataset {key} has non-numeric dtype {ds.dtype}")
            # a virtual dataset (which read a FIFO and hung a job), external storage (which read a system
            # file), chunks and filters (a gzip bomb of 2 GiB in a few MB): hpcdistill writes none of these
            if ds.is_virtual or ds.external or ds.chunks is not None or ds.compression is not None:
                raise CheckpointError(path, f"wrong format: dataset {key} is virtual, external, chunked or "
                                            "compressed (hpcdistill writes plain contiguous datasets)")
            unexpected = set(ds.attrs) - {"torch_dtype"}
            if unexpected:
                raise CheckpointError(path, f"wrong format: dataset {key} has attributes {sorted(unexpected)[:5]}")
            torch_dtype = ds.attrs.get("torch_dtype")
            torch_dtype = None if torch_dtype is None else _text(torch_dtype, f"{key}.torch_dtype", path)
            layout[key] = (tuple(int(n) for n in ds.shape), layout_dtype(ds.dtype, torch_dtype), torch_dtype)
            declared += int(np.prod(ds.shape, dtype=np.float64)) * ds.dtype.itemsize
        if declared > st.st_size:  # a 16 GiB dataset declared in an 18 KB file: its data cannot be in it
            raise CheckpointError(path, f"wrong format: datasets declare {declared} bytes, the file has "
                                        f"{st.st_size}", "too-large")
        declared_layout = {k: [list(shape), dtype] for k, (shape, dtype, _) in layout.items()}
        if "manifest" in meta and meta["manifest"] != declared_layout:
            raise CheckpointError(path, "wrong format: the manifest in meta does not match the file's datasets")
        if check is not None:
            check(meta, declared_layout)
        if meta_only:
            return {}, meta
        # Then the data: every dataset hashed in blocks, only the kept ones held in memory.
        h = hashlib.sha256()
        arrays = {}
        for key, ds in sorted(datasets, key=lambda kd: kd[0]):
            torch_dtype = layout[key][2]
            h.update(json.dumps([key, ds.dtype.str, list(ds.shape), torch_dtype]).encode())
            wanted = keep is None or keep(key)
            if not wanted and ds.size:  # hashed from its stored bytes, a piece at a time, whatever its shape
                _hash_storage(h, path, fh_size=st.st_size, ds=ds, deadline=deadline)
                continue
            if ds.ndim == 0 or ds.size == 0:
                a = np.asarray(ds[()])
                h.update(a.reshape(-1).view(np.uint8))
            else:
                rows = max(1, READ_BLOCK // max(1, ds.dtype.itemsize * int(np.prod(ds.shape[1:]))))
                a = np.empty(ds.shape, ds.dtype) if wanted else None
                for lo in range(0, ds.shape[0], rows):
                    block = ds[lo:lo + rows]
                    h.update(np.ascontiguousarray(block).reshape(-1).view(np.uint8))
                    if wanted:
                        a[lo:lo + rows] = block
                    if time.monotonic() > deadline:
                        raise CheckpointError(path, f"reading took more than {READ_SECONDS:.0f} s", "timeout")
            if wanted:
                arrays[key] = a if torch_dtype is None else _from_bits(a, torch_dtype, key, path)
    h.update(meta_json.encode())
    if verify and h.hexdigest() != stored:
        raise CheckpointError(path, f"bad checksum (stored {stored[:12]}, computed {h.hexdigest()[:12]})", "checksum")
    return arrays, meta


def _hash_storage(h, path: Path, *, fh_size: int, ds, deadline: float) -> None:
    """Feed `ds`'s contiguous storage to the hash in READ_BLOCK pieces (the same bytes ds[()] gives: a
    contiguous dataset stores its elements in C order with its own byte order), holding one piece."""
    offset, nbytes = ds.id.get_offset(), ds.size * ds.dtype.itemsize
    if offset is None or offset + nbytes > fh_size:
        raise CheckpointError(path, f"wrong format: dataset {ds.name} declares data that is not in the file",
                              "too-large")
    with open(path, "rb") as fh:
        fh.seek(offset)
        while nbytes:
            piece = fh.read(min(READ_BLOCK, nbytes))
            if not piece:
                raise CheckpointError(path, f"truncated in dataset {ds.name}", "truncated")
            h.update(piece)
            nbytes -= len(piece)
            if time.monotonic() > deadline:
                raise CheckpointError(path, f"reading took more than {READ_SECONDS:.0f} s", "timeout")


def read_h5(path, *, verify: bool = True, check=None, keep=None) -> tuple[dict, dict]:
    """Read a checkpoint: ({key: array}, meta). Raises only CheckpointError for an unusable file.

    `check(meta, layout)`, with layout {key: [shape list, torch dtype name]} (the form of
    `models.manifest`), runs after the metadata is read and before any data is: it may refuse the file
    (raise CheckpointError) for what it declares, e.g. a model far larger than the one expected.
    `keep(key)` chooses the arrays returned (default all); the others are read only to be hashed.

    Values are numpy arrays, except keys stored from a torch dtype numpy lacks (bfloat16, float8),
    which come back as torch tensors of that dtype; `to_tensor` turns either into a tensor.
    """
    path = Path(path)
    try:
        return _read(path, verify, check, keep)
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(path, "no such file", "not-a-file") from None
    except OSError as e:
        transient = e.errno in (errno.EIO, errno.EAGAIN, errno.ETIMEDOUT, errno.ESTALE, errno.EINTR)
        raise CheckpointError(path, f"unreadable ({type(e).__name__}: {e})",
                              "io" if transient else "unreadable") from None
    except Exception as e:  # noqa: BLE001 - a damaged file may surface as any error inside h5py/HDF5
        raise CheckpointError(path, f"unreadable ({type(e).__name__}: {e})", "unreadable") from None


def read_meta(path) -> dict:
    """A checkpoint's meta after the same schema checks as read_h5, reading no tensor data (and so
    verifying no checksum): for listings such as `hpcdistill status`. CheckpointError if refused."""
    path = Path(path)
    try:
        return _read(path, False, None, None, meta_only=True)[1]
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - as read_h5
        raise CheckpointError(path, f"unreadable ({type(e).__name__}: {e})", "unreadable") from None


def verify_h5(path) -> str | None:
    """None if `path` is a sound checkpoint, else the reason it is not."""
    try:
        read_h5(path, verify=True)
    except CheckpointError as e:
        return e.reason
    return None
