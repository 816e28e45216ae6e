"""HDF5 checkpoint write/read throughput (the real path) vs raw binary write/read of the same bytes.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/checkpoint_io.py [--dir DIR]
    (also runs under `mpirun -np 1`; only one process does I/O)

For model sizes of about 1, 10 and 100 MB (a state dict of float32 weight matrices and biases, as
hpcdistill.checkpoints.capture produces them), alternating repetition by repetition:

- hpcdistill: `write_h5` (HDF5 into a hidden temporary file, sha256 over keys/dtypes/shapes/bytes,
  fsync, rename, fsync of the directory) and `read_h5` (signature and format checks, every
  dataset read, sha256 verified);
- raw: the same arrays' bytes written one after the other into a temporary file, fsync, rename,
  fsync of the directory (the same durability and atomicity), and read back into fresh arrays.

Reads are timed warm (the file in the page cache, as a peer reads a just-published file on a local
disk) and cold (its pages dropped first with posix_fadvise(DONTNEED), as after a trip through a
shared filesystem; this drops only that file's pages). The directory defaults to ./runs/.bench-io
(the disk run directories live on). Throughput is model bytes / median seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from hpcdistill.checkpoints import read_h5, write_h5  # noqa: E402

from _common import machine, median, table  # noqa: E402


def make_state(nbytes: int, seed: int = 0) -> dict:
    """Square-ish weight matrices plus biases, about nbytes of float32 in all, in 8 layers."""
    rng = np.random.default_rng(seed)
    per = nbytes // 4 // 8
    width = max(8, int(per ** 0.5))
    arrays = {}
    for i in range(8):
        rows = max(1, per // width)
        arrays[f"model/layers.{i}.weight"] = rng.standard_normal((rows, width), dtype=np.float32)
        arrays[f"model/layers.{i}.bias"] = rng.standard_normal(rows, dtype=np.float32)
    return arrays


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def raw_write(path: Path, arrays: dict) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as f:
        for a in arrays.values():
            f.write(memoryview(np.ascontiguousarray(a)).cast("B"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def raw_read(path: Path, layout: list) -> dict:
    out = {}
    with open(path, "rb", buffering=0) as f:
        for key, shape, dtype in layout:
            a = np.empty(shape, dtype)
            view = memoryview(a).cast("B")
            got = 0
            while got < len(view):
                n = f.readinto(view[got:])
                if not n:
                    raise EOFError(path)
                got += n
            out[key] = a
    return out


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default="runs/.bench-io")
    p.add_argument("--sizes-mb", default="1,10,100")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    if int(os.environ.get("OMPI_COMM_WORLD_RANK", "0")) != 0:
        return 0
    root = Path(args.dir).resolve() / f"run-{os.getpid()}"
    root.mkdir(parents=True, exist_ok=True)
    meta = {"step": 100, "arch": {"name": "bench"}, "mode": "sync"}
    rows, t0 = [], time.perf_counter()
    try:
        for mb in (float(s) for s in args.sizes_mb.split(",")):
            arrays = make_state(int(mb * 2**20))
            nbytes = sum(a.nbytes for a in arrays.values())
            layout = [(k, a.shape, a.dtype) for k, a in arrays.items()]
            h5_path, raw_path = root / "ckpt.h5", root / "ckpt.bin"
            t = {k: [] for k in ("h5_w", "raw_w", "h5_r", "raw_r", "h5_rc", "raw_rc", "sha")}
            for rep in range(args.reps):
                order = ("h5", "raw") if rep % 2 == 0 else ("raw", "h5")
                for impl in order:
                    if impl == "h5":
                        t["h5_w"].append(timed(lambda: write_h5(h5_path, arrays, meta)))
                        t["h5_r"].append(timed(lambda: read_h5(h5_path)))
                        drop_cache(h5_path)
                        t["h5_rc"].append(timed(lambda: read_h5(h5_path)))
                    else:
                        t["raw_w"].append(timed(lambda: raw_write(raw_path, arrays)))
                        t["raw_r"].append(timed(lambda: raw_read(raw_path, layout)))
                        drop_cache(raw_path)
                        t["raw_rc"].append(timed(lambda: raw_read(raw_path, layout)))
                t["sha"].append(timed(lambda: [hashlib.sha256(memoryview(a).cast("B")).digest()
                                              for a in arrays.values()]))
            arrays_back, _ = read_h5(h5_path)
            assert all(np.array_equal(arrays[k], arrays_back[k]) for k in arrays)
            m = {k: median(v) for k, v in t.items()}
            bw = lambda s: f"{nbytes / s / 1e6:.0f}"  # noqa: E731
            rows.append([f"{nbytes / 2**20:.1f} MB", bw(m["raw_w"]), bw(m["h5_w"]), f"{m['raw_w'] / m['h5_w']:.2f}",
                         bw(m["raw_r"]), bw(m["h5_r"]), f"{m['raw_r'] / m['h5_r']:.2f}",
                         bw(m["raw_rc"]), bw(m["h5_rc"]), f"{m['raw_rc'] / m['h5_rc']:.2f}",
                         f"{m['sha'] * 1e3:.1f}", f"{os.path.getsize(h5_path) / nbytes:.4f}"])
            print(f"  {mb:g} MB done at {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        try:
            root.parent.rmdir()  # only if no other run is using it
        except OSError:
            pass
    print("# checkpoint I/O: hpcdistill write_h5/read_h5 (HDF5, sha256, fsync, rename) vs raw bytes (fsync, rename)")
    print(f"# {machine()}")
    print(f"# directory {Path(args.dir).resolve()} ({fs_type(Path(args.dir).resolve())}); median of {args.reps} "
          f"interleaved repetitions; MB/s = 1e6 bytes of model per second; {time.perf_counter() - t0:.0f} s")
    print(table(["model", "raw write", "h5 write", "h5/raw", "raw read", "h5 read", "h5/raw",
                 "raw cold read", "h5 cold read", "h5/raw", "sha256 ms", "h5 file/bytes"], rows))
    return 0


def fs_type(path: Path) -> str:
    best, kind = "", "?"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, fstype = line.split()[:3]
                if str(path).startswith(mnt) and len(mnt) > len(best):
                    best, kind = mnt, f"{fstype} on {dev}"
    except OSError:
        pass
    return kind


if __name__ == "__main__":
    sys.exit(main())
