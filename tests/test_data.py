"""The dataset layout, the built-in datasets, imports (bounded, atomic), and the values checked with the checksum."""

import re

import h5py
import numpy as np
import pytest

from hpcdistill.data import DataError, dataset_info, import_arrays, prepare
from hpcdistill.data.builtin import SEQ_LEN, _digits, _digits_aug, text_corpus, text_regions
from hpcdistill.data.format import read_split_attrs

from conftest import flip_stored_byte


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("datasets")
    prepare("digits", d)
    prepare("text", d)
    return d


def read(path):
    with h5py.File(path, "r") as f:
        return f["x"][:], f["y"][:], dict(f.attrs)


def test_digits_layout_and_values(data_dir):
    info = dataset_info(data_dir, "digits")
    assert (info.kind, info.num_classes, info.input_shape, info.vocab) == ("image", 10, (1, 8, 8), None)
    assert info.sizes == {"train": 1257, "val": 180, "test": 360}
    assert "load_digits" in info.source
    for split, n in info.sizes.items():
        x, y, attrs = read(info.file(split))
        assert attrs["format"] == "hpcdistill-dataset" and attrs["format_version"] == 1
        assert (attrs["name"], attrs["split"], attrs["kind"]) == ("digits", split, "image")
        assert len(attrs["sha256"]) == 64
        assert x.dtype == np.float32 and x.shape == (n, 1, 8, 8)
        assert y.dtype == np.int64 and y.shape == (n,)
        assert x.min() == 0.0 and x.max() == 1.0
        assert set(np.unique(y)) == set(range(10))  # stratified: every class in every split
        with h5py.File(info.file(split), "r") as f:
            assert f["x"].chunks is not None
    counts = np.bincount(read(info.file("test"))[1])
    assert counts.min() >= 35 and counts.max() <= 37


def test_digits_aug_grows_each_split_from_its_own_digits(tmp_path):
    """digits-aug: 60k / 5k / 10k images in [0, 1], every class in every split, the same bytes from the
    same seed; and made from each split's own digits only (shown with source splits told apart by
    their brightness: blank train digits, full val and test ones)."""
    prepare("digits-aug", tmp_path)
    info = dataset_info(tmp_path, "digits-aug")
    assert info.sizes == {"train": 60_000, "val": 5_000, "test": 10_000}
    assert (info.kind, info.num_classes, info.input_shape) == ("image", 10, (1, 8, 8))
    for split in ("train", "test"):
        x, y, attrs = read(info.file(split))
        assert x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0
        assert set(np.unique(y)) == set(range(10)) and "affine" in attrs["source"]
    again = tmp_path / "again"
    prepare("digits-aug", again)
    assert read_split_attrs(dataset_info(again, "digits-aug").file("test"))["sha256"] == \
        read_split_attrs(info.file("test"))["sha256"]

    def marked(seed):
        for split, (x, y), attrs in _digits(seed):
            yield split, (np.full_like(x, 0.0 if split == "train" else 1.0), y), attrs

    made = {split: x for split, (x, _), _ in _digits_aug(0, source=marked)}
    assert made["train"].mean() < 0.05 and made["test"].mean() > 0.6 and made["val"].mean() > 0.6
    assert made["train"].max() < 0.5  # noise alone: nothing of a test or val digit


def test_prepare_is_idempotent_and_rejects_unknown(data_dir):
    before = (data_dir / "digits" / "train.h5").stat().st_mtime_ns
    prepare("digits", data_dir)
    assert (data_dir / "digits" / "train.h5").stat().st_mtime_ns == before
    with pytest.raises(DataError, match="hpcdistill data import"):
        prepare("cifar", data_dir)


def test_text_windows_are_shifted_and_splits_are_separate_regions(data_dir):
    info = dataset_info(data_dir, "text")
    ids, vocab, _ = text_corpus()
    assert info.kind == "sequence" and info.input_shape == (SEQ_LEN,)
    assert info.vocab == vocab and info.num_classes == len(vocab) and list(vocab) == sorted(vocab)
    assert info.sizes["train"] > 50_000 and info.sizes["val"] > 2_000 and info.sizes["test"] > 2_000
    regions = text_regions(len(ids))
    for split, (lo, hi) in regions.items():
        x, y, _ = read(info.file(split))
        assert x.dtype == np.uint8 and x.shape == (info.sizes[split], SEQ_LEN) and y.shape == x.shape
        assert (y[:, :-1] == x[:, 1:]).all() and (y[:-1, -1] == x[1:, 0]).all()
        stream = x.reshape(-1)  # consecutive windows are consecutive corpus text, within the region
        assert lo + len(stream) < hi and (stream == ids[lo:lo + len(stream)]).all()
    assert regions["train"][1] <= regions["val"][0] and regions["val"][1] <= regions["test"][0]


def test_import_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(120, 3, 5)), rng.integers(0, 4, size=120)
    y[:4] = [0, 1, 2, 3]
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    out = import_arrays("mine", tmp_path / "x.npy", tmp_path / "y.npy", tmp_path / "data", seed=1)
    info = dataset_info(tmp_path / "data", "mine")
    assert out == info.path and info.kind == "image" and info.num_classes == 4
    assert info.input_shape == (3, 5) and info.sizes == {"train": 96, "val": 12, "test": 12}
    got = {}
    for split in ("train", "val", "test"):
        xs, ys, _ = read(info.file(split))
        assert xs.dtype == np.float32 and ys.dtype == np.int64
        for row_x, row_y in zip(xs, ys):
            got[row_x.tobytes()] = row_y
    assert len(got) == 120  # every sample exactly once, with its own label
    assert all(got[row.astype(np.float32).tobytes()] == label for row, label in zip(x, y))
    again = import_arrays("mine2", tmp_path / "x.npy", tmp_path / "y.npy", tmp_path / "data", seed=1)
    assert np.array_equal(read(again / "val.h5")[1], read(info.file("val"))[1])


def _bad_inputs():
    ok_x, ok_y = np.zeros((100, 4), np.float32), np.arange(100) % 3
    return {
        "length": (ok_x, ok_y[:90], "same length"),
        "negative": (ok_x, ok_y - 1, "non-negative"),
        "float-labels": (ok_x, ok_y.astype(np.float64), "integer"),
        "2d-labels": (ok_x, ok_y.reshape(100, 1), "1-D"),
        "objects": (np.array([{"a": 1}] * 100, dtype=object), ok_y, "pickle"),
        "strings": (np.array(["a"] * 100).reshape(100, 1), ok_y, "numeric"),
        "1d-x": (np.zeros(100), ok_y, "shape"),
        "nan": (np.full((100, 4), np.nan), ok_y, "NaN"),
        "too-few": (ok_x[:30], ok_y[:30], "at least"),
        "one-class": (ok_x, ok_y * 0, "two classes"),
    }


@pytest.mark.parametrize("case", list(_bad_inputs()))
def test_import_rejects_bad_inputs(tmp_path, case):
    x, y, message = _bad_inputs()[case]
    np.save(tmp_path / "x.npy", x, allow_pickle=True)
    np.save(tmp_path / "y.npy", y)
    with pytest.raises(DataError, match=message) as e:
        import_arrays("mine", tmp_path / "x.npy", tmp_path / "y.npy", tmp_path / "data")
    assert "x.npy" in str(e.value) or "y.npy" in str(e.value) or case == "one-class"
    assert _left_in(tmp_path / "data") == []  # neither the dataset nor its temporary directory


def test_import_rejects_missing_files_npz_and_bad_names(tmp_path):
    np.save(tmp_path / "y.npy", np.arange(100) % 2)
    np.savez(tmp_path / "x.npz", x=np.zeros((100, 2)))
    with pytest.raises(DataError, match="nope.npy does not exist"):
        import_arrays("mine", tmp_path / "nope.npy", tmp_path / "y.npy", tmp_path)
    with pytest.raises(DataError, match="npz archive"):
        import_arrays("mine", tmp_path / "x.npz", tmp_path / "y.npy", tmp_path)
    with pytest.raises(DataError, match="built-in"):
        import_arrays("digits", tmp_path / "y.npy", tmp_path / "y.npy", tmp_path)
    with pytest.raises(DataError, match="directory name"):
        import_arrays("../escape", tmp_path / "y.npy", tmp_path / "y.npy", tmp_path)


def _npy(directory, **arrays):
    """Save each array as directory/<key>.npy; return their paths."""
    for key, arr in arrays.items():
        np.save(directory / f"{key}.npy", arr)
    return {key: directory / f"{key}.npy" for key in arrays}


def _import_cli(data_dir, name, *args, seed=None):
    """`hpcdistill data import NAME --data-dir DATA_DIR ARGS...` in a subprocess."""
    import subprocess

    from hpcdistill.launch import HPCDISTILL, job_env

    env = job_env(seed=seed)
    return subprocess.run([HPCDISTILL, "data", "import", name, "--data-dir", str(data_dir), *map(str, args)],
                          env=env, capture_output=True, text=True, timeout=300)


def _left_in(data_dir):
    """What an import left in data_dir (temporary directories included)."""
    return sorted(p.name for p in data_dir.iterdir()) if data_dir.exists() else []


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_import_memory_maps_a_large_x_and_stays_bounded(tmp_path):
    import subprocess
    import sys

    n, row = 200_000, (32, 32)  # uint8, 1 KiB a row: 205 MB
    x = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.uint8, shape=(n, *row))
    for a in range(0, n, 10_000):
        i = np.arange(a, a + 10_000)
        block = np.empty((len(i), *row), np.uint8)
        block[:] = (i % 251).astype(np.uint8)[:, None, None]
        block[:, 0, :4] = i.astype("<u4").view(np.uint8).reshape(-1, 4)  # each row carries its index
        x[a:a + 10_000] = block
    x.flush()
    del x
    np.save(tmp_path / "y.npy", np.arange(n) % 10)
    np.save(tmp_path / "x0.npy", np.zeros((100, 4), np.uint8))
    np.save(tmp_path / "y0.npy", np.arange(100) % 2)
    script = (  # a small import first, so that one-time costs (HDF5's set-up) are not counted
        "import sys\n"
        "from hpcdistill.data.builtin import import_arrays\n"
        "import_arrays('small', sys.argv[4], sys.argv[5], sys.argv[3])\n"
        "def hwm():\n"
        "    with open('/proc/self/status') as f:\n"
        "        return next(int(l.split()[1]) * 1024 for l in f if l.startswith('VmHWM:'))\n"
        "try:\n"
        "    with open('/proc/self/clear_refs', 'w') as f:\n"
        "        f.write('5')  # reset the peak to the current resident size\n"
        "except OSError:\n"
        "    pass\n"
        "before = hwm()\n"
        "import_arrays('big', sys.argv[1], sys.argv[2], sys.argv[3], seed=0)\n"
        "print(hwm() - before)\n")
    proc = subprocess.run([sys.executable, "-c", script, *(tmp_path / f for f in ("x.npy", "y.npy", "data", "x0.npy",
                                                                                  "y0.npy"))],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    growth, size = int(proc.stdout.split()[-1]), (tmp_path / "x.npy").stat().st_size
    # about 20 MiB whatever the size (indices, HDF5's caches); reading x whole would be 195 MiB more
    assert growth < size // 4, f"peak resident memory grew by {growth / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB x"
    info = dataset_info(tmp_path / "data", "big")  # re-hashes the files: the streamed checksum is right
    assert info.sizes == {"train": 160_000, "val": 20_000, "test": 20_000} and info.input_shape == row
    seen = []
    for split in ("train", "val", "test"):
        with h5py.File(info.file(split), "r") as f:
            assert f["x"].dtype == np.uint8 and f.attrs["x_scale"] == pytest.approx(1 / 255)
            index = f["x"][:, 0, :4].copy().view("<u4").reshape(-1).astype(np.int64)
            assert np.array_equal(f["y"][:], index % 10)  # every row kept its own label
            assert np.array_equal(f["x"][::997, 5, 5], (index[::997] % 251).astype(np.uint8))
        seen.append(index)
    assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(n))


def test_import_keeps_the_users_own_split(tmp_path):
    rng = np.random.default_rng(4)
    arrays = {"x": rng.normal(size=(60, 3)).astype(np.float32), "y": np.arange(60) % 3,
              "xv": rng.normal(size=(15, 3)).astype(np.float32), "yv": np.arange(15) % 3,
              "xt": rng.normal(size=(12, 3)).astype(np.float32), "yt": np.arange(12)[::-1] % 3}
    p = _npy(tmp_path, **arrays)
    own = ["--x-val", p["xv"], "--y-val", p["yv"], "--x-test", p["xt"], "--y-test", p["yt"]]
    proc = _import_cli(tmp_path / "data", "mine", "--x", p["x"], "--y", p["y"], *own)
    assert proc.returncode == 0 and proc.stdout.startswith("wrote "), proc.stderr
    info = dataset_info(tmp_path / "data", "mine")
    assert info.sizes == {"train": 60, "val": 15, "test": 12} and info.num_classes == 3
    for split, xk, yk in (("val", "xv", "yv"), ("test", "xt", "yt")):
        xs, ys, _ = read(info.file(split))
        assert np.array_equal(xs, arrays[xk]) and np.array_equal(ys, arrays[yk])  # exactly, in file order
    xs, ys, attrs = read(info.file("train"))
    order = [int(np.flatnonzero((arrays["x"] == row).all(1))[0]) for row in xs]
    assert sorted(order) == list(range(60)) and order != list(range(60))  # all train rows, shuffled
    assert np.array_equal(ys, arrays["y"][order]) and "given split" in attrs["source"]
    for bad, message in ((own[:2], "all four.*missing --y-val, --x-test, --y-test"),
                         ([*own, "--val-fraction", "0.2"], "drop the fractions")):
        proc = _import_cli(tmp_path / "data", "other", "--x", p["x"], "--y", p["y"], *bad)
        assert proc.returncode == 2 and __import__("re").search(message, proc.stderr), proc.stderr
    mixed = _npy(tmp_path, xv8=np.zeros((15, 3), np.uint8))
    with pytest.raises(DataError, match="mix uint8"):
        import_arrays("other", p["x"], p["y"], tmp_path / "data", x_val=mixed["xv8"], y_val=p["yv"],
                      x_test=p["xt"], y_test=p["yt"])
    with pytest.raises(DataError, match="same shape"):
        import_arrays("other", p["x"], p["y"], tmp_path / "data", x_val=_npy(tmp_path, xv4=np.zeros((15, 4)))["xv4"],
                      y_val=p["yv"], x_test=p["xt"], y_test=p["yt"])
    with pytest.raises(DataError, match="at least 10"):
        import_arrays("other", p["x"], p["y"], tmp_path / "data", x_val=p["xv"], y_val=p["yv"],
                      **_npy(tmp_path, x_test=arrays["xt"][:5], y_test=arrays["yt"][:5]))
    assert _left_in(tmp_path / "data") == ["mine"]


def test_import_writes_train_rows_in_seeded_shuffled_order(tmp_path):
    n = 400  # sorted by class, 8 KiB rows: 32 rows per HDF5 chunk
    x = np.zeros((n, 8192), np.uint8)
    x[:, :2] = np.arange(n).astype("<u2").view(np.uint8).reshape(n, 2)
    p = _npy(tmp_path, x=x, y=np.repeat(np.arange(4), n // 4))

    def rows(name, split, **kw):
        with h5py.File(tmp_path / "data" / name / f"{split}.h5", "r") as f:
            return f["x"][:, :2].copy().view("<u2").reshape(-1), f["y"][:], f["x"].chunks[0]

    import_arrays("a", p["x"], p["y"], tmp_path / "data", seed=5)
    import_arrays("b", p["x"], p["y"], tmp_path / "data", seed=5)
    import_arrays("c", p["x"], p["y"], tmp_path / "data", seed=6)
    index, y, chunk = rows("a", "train")
    assert chunk == 32 and np.array_equal(y, index // 100)
    assert (np.diff(y) < 0).any()  # not sorted by class any more
    assert all(len(np.unique(y[a:a + chunk])) >= 2 for a in range(0, len(y), chunk))  # every chunk mixes classes
    assert np.array_equal(index, rows("b", "train")[0]) and not np.array_equal(index, rows("c", "train")[0])
    for split in ("val", "test"):
        assert (np.diff(rows("a", split)[0]) > 0).all()  # val/test stay in file order
    for name in "abc":
        dataset_info(tmp_path / "data", name)


def test_import_stores_uint8_images_as_uint8_with_x_scale(tmp_path):
    rng = np.random.default_rng(0)
    y = np.arange(100) % 5
    p = _npy(tmp_path, x8=rng.integers(0, 256, size=(100, 1, 4, 4), dtype=np.uint8), y=y,
             x16=rng.integers(-300, 300, size=(100, 6), dtype=np.int16), x64=rng.normal(size=(100, 6)))
    cases = {"u8": ("x8", {}, np.uint8, 1 / 255), "u8-scaled": ("x8", {"x_scale": 0.5}, np.uint8, 0.5),
             "i16": ("x16", {}, np.float32, 1.0), "f64": ("x64", {}, np.float32, 1.0)}
    for name, (key, kw, dtype, scale) in cases.items():
        import_arrays(name, p[key], p["y"], tmp_path / "data", seed=2, **kw)
        info = dataset_info(tmp_path / "data", name)
        assert info.kind == "image" and info.num_classes == 5
        got = []
        for split in ("train", "val", "test"):
            xs, ys, attrs = read(info.file(split))
            assert xs.dtype == dtype and ys.dtype == np.int64 and attrs["x_scale"] == pytest.approx(scale)
            got += [(r.tobytes(), int(label)) for r, label in zip(xs, ys)]
        source = np.load(p[key]).astype(dtype)
        assert sorted(got) == sorted((r.tobytes(), int(label)) for r, label in zip(source, y))
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(DataError, match="positive finite"):
            import_arrays("bad", p["x8"], p["y"], tmp_path / "data", x_scale=bad)
    with pytest.raises(DataError, match="images only"):
        import_arrays("bad", p["x16"], p["y"], tmp_path / "data", kind="text", x_scale=0.5)


def test_import_text_token_data(tmp_path):
    rng = np.random.default_rng(1)
    stream = rng.integers(0, 300, size=200 * 16 + 1)
    stream[7] = 299  # the vocabulary is 300 tokens
    x, y = stream[:-1].reshape(200, 16), stream[1:].reshape(200, 16)
    p = _npy(tmp_path, x16=x.astype(np.uint16), y16=y.astype(np.uint16), x64=x % 50, y64=y % 50,
             x8=(x % 200).astype(np.uint8), y8=(y % 200).astype(np.uint8))
    cases = {"u16": ("x16", "y16", {}, np.uint16, 300), "i64": ("x64", "y64", {}, np.uint8, 50),
             "u8": ("x8", "y8", {}, np.uint8, 200), "big": ("x64", "y64", {"num_classes": 70_000}, np.int32, 70_000)}
    for name, (xk, yk, kw, dtype, vocab) in cases.items():
        proc_args = ["--x", p[xk], "--y", p[yk], "--kind", "text"]
        if kw:
            proc_args += ["--num-classes", kw["num_classes"]]
        proc = _import_cli(tmp_path / "data", name, *proc_args)
        assert proc.returncode == 0, proc.stderr
        info = dataset_info(tmp_path / "data", name)
        assert (info.kind, info.num_classes, info.input_shape, info.vocab) == ("sequence", vocab, (16,), None)
        assert info.sizes == {"train": 160, "val": 20, "test": 20}
        pairs = []
        for split in ("train", "val", "test"):
            xs, ys, attrs = read(info.file(split))
            assert xs.dtype == ys.dtype == dtype and xs.shape == ys.shape and "x_scale" not in attrs
            pairs += [(a.tobytes(), b.tobytes()) for a, b in zip(xs.astype(np.int64), ys.astype(np.int64))]
        want = [(a.tobytes(), b.tobytes())
                for a, b in zip(np.load(p[xk]).astype(np.int64), np.load(p[yk]).astype(np.int64))]
        assert sorted(pairs) == sorted(want)
    proc = _import_cli(tmp_path / "data", "small", "--x", p["x16"], "--y", p["y16"], "--kind", "text",
                       "--num-classes", 250)
    assert proc.returncode == 2 and "token id" in proc.stderr and "x16.npy" in proc.stderr
    assert "outside [0, 250)" in proc.stderr and "--num-classes 2" in proc.stderr
    bad_shapes = {"y-shape": ("x16", "y64-short", "x's shape"), "x-float": ("xf", "y16", "integer token ids")}
    more = _npy(tmp_path, **{"y64-short": y[:, :8], "xf": x.astype(np.float32)})
    for case, (xk, yk, message) in bad_shapes.items():
        with pytest.raises(DataError, match=message):
            import_arrays(case, {**p, **more}[xk], {**p, **more}[yk], tmp_path / "data", kind="text")
    left = _left_in(tmp_path / "data")
    assert "small" not in left and not any(n.startswith(".") for n in left)


def _bad_label_cases():
    y = np.arange(40_000) % 3  # int64: two blocks of labels, the bad one in the last row
    huge = y.astype(np.uint64)
    huge[-1] = 2**64 - 1
    return {
        "over-num-classes": (y + (np.arange(40_000) == 39_999) * 5, ["--num-classes", 3],
                             ["label 5 at row 39999 is outside [0, 3)", "--num-classes 6"]),
        "1e9": (np.where(np.arange(40_000) == 39_999, 10**9, y), [],
                ["label 1000000000 at row 39999", "bound of 1,000,000 classes", "np.unique"]),
        "uint64-huge": (huge, [], ["18446744073709551615", "does not fit int64", "not wrapped"]),
        "negative": (np.where(np.arange(40_000) == 39_999, -1, y), [], ["non-negative", "found -1 at row 39999"]),
        "num-classes-too-big": (y, ["--num-classes", 2_000_000], ["integer in 2..1,000,000"]),
    }


@pytest.mark.parametrize("case", list(_bad_label_cases()))
def test_import_cli_refuses_bad_labels_with_exit_2_and_leaves_nothing(tmp_path, case):
    y, extra, messages = _bad_label_cases()[case]
    p = _npy(tmp_path, x=np.ones((len(y), 2), np.float32), y=y)
    proc = _import_cli(tmp_path / "data", "mine", "--x", p["x"], "--y", p["y"], *extra)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stderr.startswith("hpcdistill: ") and "Traceback" not in proc.stderr
    for message in messages:
        assert message in proc.stderr
    assert _left_in(tmp_path / "data") == []  # no dataset, no temporary directory


def test_failed_import_leaves_nothing_and_keeps_the_previous_dataset(tmp_path):
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(3000, 64)).astype(np.float32), np.arange(3000) % 4  # 256 B rows: 3 blocks
    bad_y, bad_x = y.copy(), x.copy()
    bad_y[-1], bad_x[-1, 3] = 9, np.inf
    p = _npy(tmp_path, x=x, y=y, bad_y=bad_y, bad_x=bad_x, x2=x[:1000], y2=y[:1000])
    data = tmp_path / "data"
    import_arrays("mine", p["x"], p["y"], data)
    before = dataset_info(data, "mine")
    digest = read(before.file("train"))[2]["sha256"]
    own = dict(x_val=p["x"], y_val=p["y"])  # train and val are written completely before test fails
    with pytest.raises(DataError, match=r"bad_y\.npy: label 9 at row 2999 is outside \[0, 4\)"):
        import_arrays("mine", p["x"], p["y"], data, num_classes=4, x_test=p["x"], y_test=p["bad_y"], **own)
    with pytest.raises(DataError, match=r"bad_x\.npy: x holds NaN or infinite.*row 2999"):
        import_arrays("mine", p["x"], p["y"], data, x_test=p["bad_x"], y_test=p["y"], **own)
    with pytest.raises(DataError, match=r"bad_x\.npy: x holds NaN or infinite.*row 2999"):
        import_arrays("fresh", p["x"], p["y"], data, x_test=p["bad_x"], y_test=p["y"], **own)
    assert _left_in(data) == ["mine"]  # the old dataset, untouched; no temporary directory
    assert read(dataset_info(data, "mine").file("train"))[2]["sha256"] == digest
    import_arrays("mine", p["x2"], p["y2"], data)  # a good re-import replaces it
    assert dataset_info(data, "mine").sizes == {"train": 800, "val": 100, "test": 100}
    assert _left_in(data) == ["mine"]
    (data / "file").write_text("not a dataset")
    with pytest.raises(DataError, match="not a directory"):
        import_arrays("file", p["x"], p["y"], data)


def test_damaged_file_is_detected_and_prepare_repairs_it(tmp_path):
    prepare("digits", tmp_path)
    flip_stored_byte(tmp_path / "digits" / "val.h5", "x", at=100)
    with pytest.raises(DataError, match=r"val\.h5 is damaged.*hpcdistill data prepare digits"):
        dataset_info(tmp_path, "digits")
    dataset_info(tmp_path, "digits", verify=False)  # attributes alone still read
    prepare("digits", tmp_path)
    assert dataset_info(tmp_path, "digits").sizes["val"] == 180


def test_missing_or_incomplete_dataset_says_what_to_run(tmp_path):
    with pytest.raises(DataError, match="run `hpcdistill data prepare digits`"):
        dataset_info(tmp_path, "digits")
    with pytest.raises(DataError, match="hpcdistill data import mine"):
        dataset_info(tmp_path, "mine")
    prepare("digits", tmp_path)
    (tmp_path / "digits" / "test.h5").unlink()
    with pytest.raises(DataError, match="missing test.h5"):
        dataset_info(tmp_path, "digits")
    (tmp_path / "digits" / "val.h5").write_bytes(b"not hdf5")
    with pytest.raises(DataError, match="cannot be read"):
        read_split_attrs(tmp_path / "digits" / "val.h5")


def test_cli_prepare_says_whether_it_wrote_or_kept(tmp_path):
    from hpcdistill.cli import main

    def prepare_cli(*extra):
        import contextlib
        import io
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["data", "prepare", "digits", "--data-dir", str(tmp_path), *extra]) == 0
        return out.getvalue()

    assert prepare_cli().startswith("wrote ")
    mtime = (tmp_path / "digits" / "train.h5").stat().st_mtime_ns
    assert prepare_cli().startswith("kept (valid")
    assert (tmp_path / "digits" / "train.h5").stat().st_mtime_ns == mtime
    assert prepare_cli("--force").startswith("wrote ")


@pytest.mark.parametrize("flaw,message", [("label", "y[57] holds 12, outside [0, 10)"),
                                          ("negative", "y[57] holds -1, outside [0, 10)"),
                                          ("nan", "x[33] holds NaN or infinite values")])
def test_checksum_pass_also_checks_labels_and_inputs(tmp_path, flaw, message):
    """A label of 12 with 10 classes was an IndexError mid-run, a NaN input a "divergence": the pass that
    verifies the checksum (world rank 0, once per job) refuses both, naming the row."""
    from hpcdistill.data.format import write_split

    x, y = np.random.default_rng(0).random((100, 4)).astype(np.float32), np.arange(100) % 10
    if flaw == "nan":
        x[33, 2] = np.nan
    else:
        y[57] = 12 if flaw == "label" else -1
    for split in ("train", "val", "test"):
        write_split(tmp_path / "bad", split, x, y, name="bad", kind="image", num_classes=10, source="test")
    with pytest.raises(DataError, match=re.escape(message)):
        dataset_info(tmp_path, "bad")
    dataset_info(tmp_path, "bad", verify=False)  # the attributes alone are fine
