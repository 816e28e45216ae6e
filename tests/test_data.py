"""The dataset layout, the built-in datasets, imports, and the shard reader's sampling contract."""

import json

import h5py
import numpy as np
import pytest
import torch

from conftest import flip_stored_byte
from hpcdistill.data import DataError, ShardReader, dataset_info, eval_batches, import_arrays, prepare
from hpcdistill.data.builtin import SEQ_LEN, text_corpus, text_regions


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
    reader = ShardReader(info.file("train"), batch_size=8, rank=0, size=1)
    xb, yb = reader.next_batch()
    assert xb.dtype == yb.dtype == torch.int64 and xb.shape == (8, SEQ_LEN)
    assert int(xb.max()) < info.num_classes


def test_rank_shards_are_disjoint_and_cover_the_group_each_epoch(data_dir):
    path = data_dir / "digits" / "train.h5"
    x_all, y_all, _ = read(path)
    readers = [ShardReader(path, batch_size=16, rank=r, size=4, group=1, num_groups=2, seed=3)
               for r in range(4)]
    group = readers[0].group_indices
    for epoch in range(3):
        shards = [r.epoch_indices(epoch) for r in readers]
        assert len({len(s) for s in shards}) == 1  # same samples, so same steps, on every rank
        union = np.concatenate(shards)
        assert len(np.unique(union)) == len(union)  # no sample on two ranks
        assert set(union) <= set(group) and len(group) - len(union) < 4  # all but the trimmed few
    r = readers[2]  # the batches really hold this rank's rows, in serving order
    xs, ys = zip(*(r.next_batch() for _ in range(r.steps_per_epoch)))
    served = r.epoch_indices(0)[: r.steps_per_epoch * 16]
    assert np.array_equal(np.concatenate(xs), x_all[served]) and np.array_equal(np.concatenate(ys), y_all[served])
    assert r.next_batch()[0].shape == (16, 1, 8, 8) and r.epoch == 1


def test_groups_disjoint_or_shared(data_dir):
    path = data_dir / "digits" / "train.h5"
    n = 1257
    disjoint = [ShardReader(path, batch_size=4, rank=0, size=2, group=g, num_groups=3) for g in range(3)]
    parts = [set(r.group_indices) for r in disjoint]
    assert all(not (parts[i] & parts[j]) for i in range(3) for j in range(i + 1, 3))
    assert set.union(*parts) == set(range(n))
    shared = [ShardReader(path, batch_size=4, rank=0, size=2, group=g, num_groups=3, split="shared")
              for g in range(3)]
    assert all(np.array_equal(r.group_indices, np.arange(n)) for r in shared)
    assert not np.array_equal(shared[0].epoch_indices(0), shared[1].epoch_indices(0))


def test_determinism_from_seed(data_dir):
    path = data_dir / "digits" / "train.h5"

    def stream(seed, k=5):
        r = ShardReader(path, batch_size=32, rank=1, size=2, seed=seed)
        return [r.next_batch()[1].numpy() for _ in range(k)]

    assert all(np.array_equal(a, b) for a, b in zip(stream(7), stream(7)))
    assert not all(np.array_equal(a, b) for a, b in zip(stream(7), stream(8)))
    r = ShardReader(path, batch_size=32, rank=1, size=2, seed=7)
    assert not np.array_equal(r.epoch_indices(0), r.epoch_indices(1))


@pytest.mark.parametrize("taken", [3, 4, 9])  # mid-epoch, exactly at an epoch's end, a later epoch
def test_resume_from_state_gives_identical_batches(data_dir, taken):
    path = data_dir / "digits" / "train.h5"
    kw = dict(batch_size=64, rank=3, size=4, group=0, num_groups=1, seed=5)  # 4 steps per epoch
    a = ShardReader(path, **kw)
    for _ in range(taken):
        a.next_batch()
    state = json.loads(json.dumps(a.state()))
    b = ShardReader(path, **kw)
    b.load_state(state)
    for _ in range(10):
        (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
        assert np.array_equal(xa.numpy(), xb.numpy()) and np.array_equal(ya.numpy(), yb.numpy())
    assert a.state() == b.state() and a.epoch == b.epoch >= 2
    with pytest.raises(DataError, match="does not fit"):
        b.load_state({"epoch": 0, "position": 10_000})


def test_batch_larger_than_shard_is_a_clear_error(data_dir):
    with pytest.raises(DataError, match=r"157 per rank over 8 rank\(s\).*batch size 200.*at most 157"):
        ShardReader(data_dir / "digits" / "train.h5", batch_size=200, rank=0, size=8)


def test_eval_slices_cover_the_split_exactly_once(data_dir):
    path = data_dir / "digits" / "val.h5"
    x_all, y_all, _ = read(path)
    parts = [list(eval_batches(path, batch_size=16, rank=r, size=3)) for r in range(3)]
    xs = np.concatenate([b[0].numpy() for p in parts for b in p])
    ys = np.concatenate([b[1].numpy() for p in parts for b in p])
    assert np.array_equal(xs, x_all) and np.array_equal(ys, y_all)
    assert all(len(b[0]) <= 16 for p in parts for b in p)


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
    assert not (tmp_path / "data" / "mine").exists()


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
        ShardReader(tmp_path / "digits" / "val.h5", batch_size=1, rank=0, size=1)


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
