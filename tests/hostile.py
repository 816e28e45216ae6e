"""Hostile and foreign checkpoint files, made the way an attacker or an accident on a shared filesystem
would make them: a VALID checkpoint written the normal way (`Exchange.publish` for a peer file,
`capture` + `CheckpointManager.save` for a teacher file), then one thing added or changed with h5py.

Nothing here reads a crafted file's data back (reading some of them is the very hazard: a FIFO blocks,
a gzip bomb inflates); the rewriting helpers read only the valid file they start from.
No crafted file needs more than a few MB of disk or of
this process's memory: the 16 GiB dataset is declared and never written, the gzip bomb's 2 GiB of zeros
is one compressed chunk written 512 times.

The files made by one-thing edits keep the sha256 of the file they started from: the reader refuses
them from HDF5's metadata alone, before it hashes a byte, so their checksum never comes into play (the
tests assert each one's own code, never "checksum"). Files whose defect is in what they *say* (a tensor of another
shape, wrong JSON types, a 14 GB model record, another run) are rewritten with `write_h5`, so their
checksum is valid and only the defect can refuse them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path

import h5py
import numpy as np

from hpcdistill.checkpoints import CheckpointManager, capture, read_h5, write_h5
from hpcdistill.checkpoints.h5io import layout_dtype
from hpcdistill.exchange import Exchange

HEALTHY = {"train_loss": 1.0, "initial_loss": 2.3}
EXTRA = "extra/hostile"  # an added dataset: a teacher file may hold extra/ arrays (hashed, not kept)


# --- valid files, written the normal way ------------------------------------------------------------

def peer_file(path, model, record: dict, *, step: int, exchange_id: str | None, group: int = 1,
              num_groups: int = 2, health: dict | None = None) -> Path:
    """A valid codistillation exchange file of `group` at `step`, published by `Exchange.publish` in a
    private directory next to `path` (publishing rotates that directory), then renamed onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".publish-", dir=path.parent))
    try:
        made = Exchange(scratch, group=group, num_groups=num_groups, exchange_id=exchange_id).publish(
            step, model, arch=record, health=dict(HEALTHY if health is None else health))
        os.replace(made, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return path


def teacher_file(path, model, record: dict, *, step: int = 1, meta: dict | None = None) -> Path:
    """A valid teacher checkpoint (model tensors, model record), as a training job saves it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".save-", dir=path.parent))
    try:
        arrays, meta = capture(model, step=step, arch=record, rng=False, meta=meta)
        os.replace(CheckpointManager(scratch).save(step, arrays, meta), path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return path


# --- one thing added or changed with h5py (the sha256 attribute is left as it was) ------------------

def _replace(f: h5py.File, key: str):
    """(shape, dtype) of `key` if it exists (and unlink it: the caller puts its hostile twin there)."""
    if key in f:
        ds = f[key]
        shape, dtype = ds.shape, ds.dtype
        del f[key]
        return shape, dtype
    return None, None


def fifo(path) -> Path:
    """A named pipe: opening it for reading blocks until a writer comes, which never happens."""
    path = Path(path)
    if not path.exists():
        os.mkfifo(path)
    return path


def add_virtual_fifo(path, source_fifo, *, key: str = EXTRA, unlimited: bool = False) -> Path:
    """(a) A VIRTUAL dataset whose source file is a FIFO. Reading it (or, with an unlimited mapping, merely
    asking its shape) makes HDF5 open the FIFO: the reader blocks forever. `key` an existing tensor
    replaces it with a virtual twin of the same shape and dtype; otherwise a float32 [10] is added."""
    source_fifo = fifo(source_fifo)
    with h5py.File(path, "r+") as f:
        shape, dtype = _replace(f, key)
        shape, dtype = shape or (10,), dtype or np.dtype("<f4")
        n = int(np.prod(shape))
        if unlimited:
            layout = h5py.VirtualLayout(shape=(n,), maxshape=(None,), dtype=dtype)
            src = h5py.VirtualSource(str(source_fifo), "data", shape=(n,), maxshape=(None,))
            layout[0:h5py.h5s.UNLIMITED] = src[0:h5py.h5s.UNLIMITED]
        else:
            layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
            layout[...] = h5py.VirtualSource(str(source_fifo), "data", shape=shape)
        f.create_virtual_dataset(key, layout, fillvalue=0)
    return Path(path)


def add_external(path, target: str = "/etc/passwd", *, key: str = EXTRA) -> Path:
    """(b) A dataset whose EXTERNAL storage is a system file: reading it returns that file's bytes."""
    with h5py.File(path, "r+") as f:
        shape, dtype = _replace(f, key)
        if shape is None:
            size = os.path.getsize(target)
            shape, dtype = (size,), np.dtype("u1")
        nbytes = int(np.prod(shape)) * dtype.itemsize
        f.create_dataset(key, shape=shape, dtype=dtype, external=[(target, 0, nbytes)])
    return Path(path)


def add_huge_declared(path, *, key: str = EXTRA, nbytes: int = 16 * 2**30) -> Path:
    """(c) A contiguous dataset declaring `nbytes` (16 GiB) that is never written: HDF5 allocates
    contiguous storage late, so the file stays as small as it was, and a reader that trusts the shape
    would allocate 16 GiB (or read 16 GiB of fill value)."""
    with h5py.File(path, "r+") as f:
        _replace(f, key)
        f.create_dataset(key, shape=(nbytes // 4,), dtype="<f4")
    return Path(path)


def add_gzip_bomb(path, *, key: str = EXTRA, nbytes: int = 2 * 2**30, chunk_bytes: int = 4 * 2**20) -> Path:
    """(d) A chunked, gzip-compressed dataset of `nbytes` (2 GiB) of zeros in a few MB of file. One chunk
    of zeros is compressed once and written raw (`write_direct_chunk`) for every chunk, so this process
    holds one chunk at a time."""
    n, per_chunk = nbytes // 4, chunk_bytes // 4
    packed = zlib.compress(bytes(chunk_bytes), 9)
    with h5py.File(path, "r+") as f:
        _replace(f, key)
        ds = f.create_dataset(key, shape=(n,), dtype="<f4", chunks=(per_chunk,), compression="gzip")
        for lo in range(0, n, per_chunk):
            ds.id.write_direct_chunk((lo,), packed, filter_mask=0)
    return Path(path)


def add_soft_link(path, *, key: str = EXTRA, target: str | None = None) -> Path:
    """(i) A soft link (by default to the file's first model tensor)."""
    with h5py.File(path, "r+") as f:
        if target is None:
            target = "/" + min(k for k in _dataset_keys(f) if k.startswith("model/"))
        _replace(f, key)
        f[key] = h5py.SoftLink(target)
    return Path(path)


def add_external_link(path, other_file, *, key: str = EXTRA, target: str = "/model") -> Path:
    """(i) An external link into another file (which may be anything: another checkpoint, a FIFO)."""
    with h5py.File(path, "r+") as f:
        _replace(f, key)
        f[key] = h5py.ExternalLink(str(other_file), target)
    return Path(path)


def _dataset_keys(f: h5py.File) -> list[str]:
    keys = []
    f.visititems(lambda name, obj: keys.append(name) if isinstance(obj, h5py.Dataset) else None)
    return keys


# --- files whose defect is what they say: rewritten with write_h5 (a valid checksum) ----------------

def _reread(path) -> tuple[dict, dict]:
    """The arrays and meta of a VALID file this module just wrote (never a crafted one)."""
    return read_h5(path)


def other_shape(path, *, key: str | None = None, fix_manifest: bool = True) -> Path:
    """(e) One model tensor of another shape (the first 2-D one, transposed: same bytes) with a VALID
    checksum; the architecture record is unchanged. With `fix_manifest` the meta's tensor manifest is
    made to agree with the file (as a careful attacker would), so only the architecture can refuse it."""
    arrays, meta = _reread(path)
    if key is None:
        key = min(k for k, a in arrays.items() if k.startswith("model/") and np.ndim(a) == 2)
    arrays[key] = np.ascontiguousarray(np.asarray(arrays[key]).T)
    if fix_manifest and "manifest" in meta:
        meta["manifest"][key][0] = list(arrays[key].shape)
    write_h5(path, arrays, meta)
    return Path(path)


def rewrite_meta(path, edit) -> Path:
    """(f, g) Rewrite `path` with meta = edit(meta) (which may return any JSON value), checksum valid."""
    arrays, meta = _reread(path)
    new = edit(json.loads(json.dumps(meta)))
    write_h5(path, arrays, meta if new is None else new)
    return Path(path)


def meta_as_list(path) -> Path:
    """(f) meta is a JSON list (holding the real meta object), not an object."""
    return rewrite_meta(path, lambda m: [m])


def health_as(path, value) -> Path:
    """(f) the health record is `value` (a list, null ...) instead of an object."""
    def edit(m):
        m["health"] = value
        return m
    return rewrite_meta(path, edit)


def step_as_string(path) -> Path:
    """(f) the step is a string ("900001"), not an integer."""
    def edit(m):
        m["step"] = str(m["step"])
        return m
    return rewrite_meta(path, edit)


def arch_as_string(path) -> Path:
    """(f) the architecture record is a string, not an object."""
    def edit(m):
        m["arch"] = str(m["arch"].get("name"))
        return m
    return rewrite_meta(path, edit)


def huge_arch(path, hidden=(60000, 60000)) -> Path:
    """(g) The architecture record declares hidden sizes [60000, 60000] (an mlp of 3.6e9 parameters,
    14 GB of float32) while the file holds the normal small tensors; checksum valid."""
    def edit(m):
        m["arch"]["args"]["hidden"] = list(hidden)
        return m
    return rewrite_meta(path, edit)


def symlink_out(link, target) -> Path:
    """(j) A symbolic link in the exchange directory pointing outside it."""
    link = Path(link)
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(Path(target).resolve())
    return link


def sparse_extra(path, *, key: str = EXTRA, nbytes: int = 2**30, shape: tuple | None = None) -> Path:
    """A contiguous float32 dataset of `nbytes` (shape `shape`, default flat) of which only the last
    element is written: HDF5 allocates the whole storage and writes 4 bytes, so the file's length covers
    the dataset (a sparse file: no disk used) and a size check against the file's length passes. The
    meta's manifest lists the new dataset and the checksum is recomputed: a file with nothing wrong but
    its size."""
    shape = tuple(shape or (nbytes // 4,))
    with h5py.File(path, "r+") as f:
        _replace(f, key)
        ds = f.create_dataset(key, shape=shape, dtype="<f4")
        ds[tuple(n - 1 for n in shape)] = 1.0
    return reseal(path)


BLOCK = 16 * 2**20


def _blocks(ds, index: tuple = ()):
    """The data of `ds` in C order, in pieces of at most BLOCK bytes (a row too large for one piece is
    split along the next axis)."""
    shape = ds.shape[len(index):]
    if not shape:
        yield np.asarray(ds[index])
        return
    row = ds.dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
    if row <= BLOCK:
        rows = max(1, BLOCK // max(1, row))
        for lo in range(0, shape[0], rows):
            yield ds[index + (slice(lo, lo + rows),)]
    else:
        for i in range(shape[0]):
            yield from _blocks(ds, index + (i,))


def reseal(path) -> Path:
    """Recompute the meta manifest and the sha256 attribute of `path` as `write_h5` would, reading the
    datasets in pieces of 16 MB (for plain contiguous datasets only: never for a crafted virtual,
    external or FIFO-backed one, whose reading is the hazard)."""
    with h5py.File(path, "r+") as f:
        meta = json.loads(f.attrs["meta"])
        layout, h = {}, hashlib.sha256()
        for key in sorted(_dataset_keys(f)):
            ds = f[key]
            torch_dtype = ds.attrs.get("torch_dtype")
            torch_dtype = torch_dtype.decode() if isinstance(torch_dtype, bytes) else torch_dtype
            layout[key] = [list(ds.shape), layout_dtype(ds.dtype, torch_dtype)]
            h.update(json.dumps([key, ds.dtype.str, list(ds.shape), torch_dtype]).encode())
            if ds.ndim == 0 or ds.size == 0:
                h.update(np.ascontiguousarray(ds[()]).reshape(-1).view(np.uint8))
                continue
            for block in _blocks(ds):
                h.update(np.ascontiguousarray(block).reshape(-1).view(np.uint8))
        if isinstance(meta, dict) and "manifest" in meta:
            meta["manifest"] = layout
        meta_json = json.dumps(meta, sort_keys=True)
        h.update(meta_json.encode())
        f.attrs["meta"] = np.bytes_(meta_json.encode())
        f.attrs["sha256"] = np.bytes_(h.hexdigest().encode())
    return Path(path)


# --- every case at once ------------------------------------------------------------------------------

def _first_tensor(model) -> str:
    return "model/" + min(model.state_dict())


def peer_cases(directory, model, record: dict, *, exchange_id: str, staging, first_step: int = 900001,
               group: int = 1, num_groups: int = 2) -> dict[str, Path]:
    """Every hostile exchange file, as `group`'s files step-<first_step>.h5, step-<first_step + 1>.h5 ...
    in `directory` (an exchange directory's group-<g>/). Each starts as a valid file of `exchange_id`
    whose meta step is its name's step, so it is refused for its own defect and nothing else; each is
    made in `staging` (same filesystem, outside the exchange directory, where the FIFO behind the
    virtual dataset and the targets of the links stay) and renamed into place whole, as a reader of a
    live exchange directory must see it. Returns {case: path in directory}."""
    directory, staging = Path(directory), Path(staging)
    directory.mkdir(parents=True, exist_ok=True)
    staging.mkdir(parents=True, exist_ok=True)
    source = fifo(staging / "vds-source.fifo")
    tensor = _first_tensor(model)

    def valid(path, step, **kw):
        return peer_file(path, model, record, step=step, exchange_id=exchange_id, group=group,
                         num_groups=num_groups, **kw)

    def outside(step):  # a valid file of the right step outside the exchange directory: a link target
        return valid(staging / f"outside-{step}.h5", step)

    crafts = {
        "virtual-fifo": lambda p, s: add_virtual_fifo(valid(p, s), source, key=tensor),
        "virtual-fifo-unlimited": lambda p, s: add_virtual_fifo(valid(p, s), source, unlimited=True),
        "external-passwd": lambda p, s: add_external(valid(p, s), key=tensor),
        "huge-declared": lambda p, s: add_huge_declared(valid(p, s)),
        "gzip-bomb": lambda p, s: add_gzip_bomb(valid(p, s)),
        "other-shape": lambda p, s: other_shape(valid(p, s)),
        "meta-list": lambda p, s: meta_as_list(valid(p, s)),
        "health-list": lambda p, s: health_as(valid(p, s), [1.0, 2.3]),
        "health-null": lambda p, s: health_as(valid(p, s), None),
        "step-string": lambda p, s: step_as_string(valid(p, s)),
        "arch-string": lambda p, s: arch_as_string(valid(p, s)),
        "huge-arch": lambda p, s: huge_arch(valid(p, s)),
        "another-run": lambda p, s: peer_file(p, model, record, step=s, exchange_id=f"{exchange_id}-other",
                                              group=group, num_groups=num_groups),
        "soft-link": lambda p, s: add_soft_link(valid(p, s)),
        "external-link": lambda p, s: add_external_link(valid(p, s), outside(s), key=tensor, target="/" + tensor),
        "symlink-out": lambda p, s: symlink_out(p, outside(s)),
        "fifo": lambda p, s: fifo(p),
    }
    out = {}
    for i, (name, craft) in enumerate(crafts.items()):
        step = first_step + i
        made = craft(staging / f"{name}.h5", step)
        out[name] = directory / f"step-{step:08d}.h5"
        os.replace(made, out[name])
    return out


def teacher_cases(directory, model, record: dict) -> dict[str, Path]:
    """Every hostile teacher file (and "valid", the file they all start from) in `directory`, named
    <case>.h5 ("fifo" is a named pipe). Added datasets are extra/ arrays: a teacher reader reads those."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    source = fifo(directory / "vds-source.fifo")
    tensor = _first_tensor(model)

    def valid(name):
        return teacher_file(directory / f"{name}.h5", model, record)

    out = {"valid": valid("valid")}
    out["virtual-fifo"] = add_virtual_fifo(valid("virtual-fifo"), source)
    out["virtual-fifo-unlimited"] = add_virtual_fifo(valid("virtual-fifo-unlimited"), source, unlimited=True)
    out["external-passwd"] = add_external(valid("external-passwd"))
    out["huge-declared"] = add_huge_declared(valid("huge-declared"))
    out["gzip-bomb"] = add_gzip_bomb(valid("gzip-bomb"))
    out["other-shape"] = other_shape(valid("other-shape"))
    out["meta-list"] = meta_as_list(valid("meta-list"))
    out["arch-string"] = arch_as_string(valid("arch-string"))
    out["huge-arch"] = huge_arch(valid("huge-arch"))
    out["soft-link"] = add_soft_link(valid("soft-link"))
    out["external-link"] = add_external_link(valid("external-link"), out["valid"], key=tensor, target="/" + tensor)
    out["fifo"] = fifo(directory / "fifo.h5")
    return out
