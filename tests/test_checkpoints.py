"""HDF5 checkpoints: exact round trips, damaged files, rotation, and no pickle anywhere."""

import logging
import random

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from hpcdistill.checkpoints import (
    CheckpointError,
    CheckpointManager,
    capture,
    model_arrays,
    read_h5,
    restore,
    verify_h5,
    write_h5,
)

from conftest import flip_stored_byte


def make_model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def train(model, opt, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def draws():
    return torch.rand(4).tolist(), np.random.rand(3).tolist(), random.random()


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-4),
    lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.8, 0.99)),
], ids=["sgd-momentum", "adam"])
def test_round_trip_is_exact_and_training_continues_identically(tmp_path, make_opt):
    model = make_model(0)
    opt = make_opt(model.parameters())
    train(model, opt, 3)
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    arrays, meta = capture(model, opt, step=3, data_state={"epoch": 0, "offset": 48}, arch={"name": "mlp"},
                           extra={"meansq": torch.full((2, 2), 0.5)}, meta={"group": 1})
    expected_draws = draws()
    write_h5(tmp_path / "c.h5", arrays, meta)
    train(model, opt, 2, seed=5)  # the original goes on

    arrays2, meta2 = read_h5(tmp_path / "c.h5")
    model2 = make_model(99)
    opt2 = make_opt(model2.parameters())
    got = restore(arrays2, meta2, model2, opt2)
    assert draws() == expected_draws
    assert (got["step"], got["data_state"], got["arch"], got["group"]) == (3, {"epoch": 0, "offset": 48},
                                                                          {"name": "mlp"}, 1)
    np.testing.assert_array_equal(arrays2["extra/meansq"], np.full((2, 2), 0.5, np.float32))

    # A fresh copy of the original at step 3 and the restored model must stay bit-identical.
    model3 = make_model(0)
    opt3 = make_opt(model3.parameters())
    train(model3, opt3, 3)
    for a, b in zip(model2.state_dict().values(), model3.state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(a, b)
    train(model2, opt2, 2, seed=5)
    train(model3, opt3, 2, seed=5)
    for a, b in zip(model2.state_dict().values(), model3.state_dict().values()):
        assert torch.equal(a, b)
    s2, s3 = opt2.state_dict(), opt3.state_dict()
    assert s2["param_groups"] == s3["param_groups"]
    for i in s3["state"]:
        for k, v in s3["state"][i].items():
            assert torch.equal(s2["state"][i][k], v), (i, k)


def test_bfloat16_zero_d_and_odd_arrays(tmp_path):
    arrays = {
        "bf16": torch.randn(3, 4).to(torch.bfloat16),
        "bf16_scalar": torch.tensor(1.5, dtype=torch.bfloat16),
        "f32_scalar": np.array(2.5, dtype=np.float32),
        "count": torch.tensor(7),
        "big_endian": np.arange(4, dtype=">i4"),
        "empty": np.zeros((0, 3)),
        "flags": np.array([True, False]),
        "a/deep/key": torch.arange(6, dtype=torch.float16).reshape(2, 3),
    }
    write_h5(tmp_path / "x.h5", arrays, {"blob": "x" * 200_000})  # meta beyond HDF5's 64 KiB compact limit
    got, meta = read_h5(tmp_path / "x.h5")
    assert meta == {"blob": "x" * 200_000}
    assert got["bf16"].dtype == torch.bfloat16 and torch.equal(got["bf16"], arrays["bf16"])
    assert got["bf16_scalar"].shape == () and got["bf16_scalar"].item() == 1.5
    assert got["f32_scalar"].shape == () and got["f32_scalar"].dtype == np.float32
    assert got["f32_scalar"] == 2.5
    assert got["count"].shape == () and got["count"].dtype == np.int64 and got["count"] == 7
    np.testing.assert_array_equal(got["big_endian"], np.arange(4))
    assert got["empty"].shape == (0, 3) and got["flags"].dtype == bool
    assert torch.equal(torch.from_numpy(got["a/deep/key"]), arrays["a/deep/key"])


def test_bfloat16_model_round_trip():
    model = make_model(0).to(torch.bfloat16)
    arrays, meta = capture(model, step=1, rng=False)
    other = make_model(1).to(torch.bfloat16)
    restore(arrays, meta, other, rng=False)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))


def test_restore_refuses_a_checkpoint_that_does_not_fit():
    arrays, meta = capture(make_model(0), step=1)
    wider = nn.Sequential(nn.Linear(6, 9), nn.BatchNorm1d(9), nn.ReLU(), nn.Linear(9, 3))
    with pytest.raises(CheckpointError, match=r"0.weight: checkpoint \(8, 6\)"):
        restore(arrays, meta, wider)
    with pytest.raises(CheckpointError, match="missing 4.weight"):
        restore(arrays, meta, nn.Sequential(*make_model(0), nn.Linear(3, 3)))
    model = make_model(0)
    with pytest.raises(CheckpointError, match="no optimizer state"):
        restore(arrays, meta, model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(CheckpointError, match="no RNG state"):
        restore(*capture(model, step=1, rng=False), model)


@pytest.mark.parametrize("bad", [np.array([{}], dtype=object), np.array(["text"]), np.zeros(2, dtype="V4"),
                                 np.array([b"raw"])])
def test_write_refuses_non_numeric_arrays(tmp_path, bad):
    with pytest.raises(TypeError, match="not numeric"):
        write_h5(tmp_path / "c.h5", {"x": bad}, {})
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.h5"
    write_h5(path, *capture(make_model(0), step=5))
    return path


def assert_refused(path, reason):
    with pytest.raises(CheckpointError) as e:
        read_h5(path)
    assert reason in e.value.reason and e.value.path == path and str(path) in str(e.value)
    assert reason in verify_h5(path)


def test_good_file_verifies(good):
    assert verify_h5(good) is None


def test_truncated(good):
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])
    assert_refused(good, "truncated")
    good.write_bytes(data[:5])
    assert_refused(good, "truncated")


def test_bit_flip_in_data_is_caught_by_checksum(good):
    flip_stored_byte(good, "model/0.weight", at=3, mask=0x10)
    assert_refused(good, "bad checksum")


def test_random_bytes_missing_and_foreign_hdf5(tmp_path):
    junk = tmp_path / "junk.h5"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    assert_refused(junk, "not an HDF5 file")
    assert_refused(tmp_path / "absent.h5", "no such file")
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["weights"] = np.ones(3)
    assert_refused(foreign, "not a checkpoint")


def test_manager_keeps_newest_and_skips_corrupt(tmp_path, caplog):
    mgr = CheckpointManager(tmp_path / "checkpoints", keep=2)
    model = make_model(0)
    for step in (10, 20, 30, 40):
        mgr.save(step, *capture(model, step=step, rng=False))
    assert [p.name for p in mgr.paths()] == ["step-00000040.h5", "step-00000030.h5"]
    newest = mgr.paths()[0]
    newest.write_bytes(newest.read_bytes()[:300])
    with caplog.at_level(logging.WARNING, logger="hpcdistill.checkpoints"):
        path, arrays, meta = mgr.latest_valid()
    assert path.name == "step-00000030.h5" and meta["step"] == 30
    assert torch.equal(model_arrays(arrays)["0.weight"], model[0].weight)
    assert any(str(newest) in r.getMessage() and "truncated" in r.getMessage() for r in caplog.records)

    mgr.save(35, *capture(model, step=35, rng=False))  # resumed from 30: the step-40 file is superseded
    assert [p.name for p in mgr.paths()] == ["step-00000035.h5", "step-00000030.h5"]
    for p in mgr.paths():
        p.write_bytes(b"garbage")
    assert mgr.latest_valid() is None


def test_checkpoint_contains_no_pickle(tmp_path):
    model = make_model(0)
    opt = torch.optim.Adam(model.parameters())
    train(model, opt, 2)
    path = tmp_path / "c.h5"
    write_h5(path, *capture(model, opt, step=2, data_state={"offset": 3}, arch={"name": "mlp"}))
    kinds = []

    def collect(name, obj):
        if isinstance(obj, h5py.Dataset):
            kinds.append((name, obj.dtype))
        kinds.extend((f"{name}@{a}", obj.attrs.get_id(a).dtype) for a in obj.attrs)

    with h5py.File(path, "r") as f:
        collect("/", f)
        f.visititems(collect)
    assert len(kinds) > 10
    for name, dtype in kinds:
        assert dtype.kind in "biufS", (name, dtype)  # vlen strings and references would be kind "O"
    raw = path.read_bytes()
    for marker in (b"\x80\x04\x95", b"\x80\x05\x95"):  # pickle protocol 4 and 5 headers
        assert marker not in raw
