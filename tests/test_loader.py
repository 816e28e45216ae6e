"""Each rank's batches: the block-shuffled sampler's contract (disjoint ranks and groups, determinism,
exact resume), user datasets with augmentation under loader workers, evaluation slices, and the
bytes a rank reads per epoch from a large HDF5 file."""

import json

import h5py
import numpy as np
import pytest
import torch

from hpcdistill.data import DataError, ShardSampler, TrainStream, eval_batches, open_source
from hpcdistill.data.format import write_split
from hpcdistill.data.loader import shuffle_block
from hpcdistill.data.sources import CACHE_CHUNKS


def read(path):
    with h5py.File(path, "r") as f:
        return f["x"][:], f["y"][:]


def served_rows(sampler, epoch):
    sampler.set_position(epoch, 0)
    return np.array([i for batch in sampler for i, _ in batch])


@pytest.mark.parametrize("block", [1, 64])
def test_rank_shards_are_disjoint_and_cover_the_group_each_epoch(block):
    samplers = [ShardSampler(1257, batch_size=16, rank=r, size=4, group=1, num_groups=2, seed=3, block=block)
                for r in range(4)]
    group = samplers[0]._rows_of(samplers[0].group_blocks)
    for epoch in range(3):
        shards = [s.epoch_rows(epoch) for s in samplers]
        assert len({len(s) for s in shards}) == 1  # same samples, so same steps, on every rank
        union = np.concatenate(shards)
        assert len(np.unique(union)) == len(union)  # no sample on two ranks
        assert set(union) <= set(group) and len(group) - len(union) < 4  # all but the trimmed few
        assert all(np.array_equal(served_rows(s, epoch), s.epoch_rows(epoch)[:s.steps_per_epoch * 16])
                   for s in samplers)


def test_groups_disjoint_or_shared_and_blocks_stay_whole():
    disjoint = [ShardSampler(1000, batch_size=4, rank=0, size=2, group=g, num_groups=3, block=10) for g in range(3)]
    parts = [set(s._rows_of(s.group_blocks)) for s in disjoint]
    assert all(not (parts[i] & parts[j]) for i in range(3) for j in range(i + 1, 3))
    assert set.union(*parts) == set(range(1000))
    assert all(len({r // 10 for r in p}) * 10 == len(p) for p in parts)  # whole blocks per group
    shared = [ShardSampler(1000, batch_size=4, rank=0, size=2, group=g, num_groups=3, split="shared") for g in range(3)]
    assert all(s.group_rows == 1000 for s in shared)
    assert not np.array_equal(shared[0].epoch_rows(0), shared[1].epoch_rows(0))


def test_determinism_from_seed_and_new_orders_each_epoch():
    def rows(seed, epoch=0):
        return ShardSampler(1257, batch_size=32, rank=1, size=2, seed=seed, block=16).epoch_rows(epoch)
    assert np.array_equal(rows(7), rows(7)) and not np.array_equal(rows(7), rows(8))
    assert not np.array_equal(rows(7, 0), rows(7, 1))


def test_block_shuffle_mixes_a_window_of_blocks_into_each_batch():
    s = ShardSampler(64 * 100, batch_size=32, rank=0, size=2, block=64, window_blocks=16)
    blocks_per_batch = [len({r // 64 for r in s.epoch_rows(0)[a:a + 32]}) for a in range(0, 32 * 50, 32)]
    assert np.mean(blocks_per_batch) > 10  # 32 rows from up to 16 blocks; one block alone would give 1


def test_shuffle_block_is_whole_chunks_only_when_the_file_has_plenty():
    assert shuffle_block(1257, 1024, 2) == 1  # digits: 2 chunks, a full shuffle
    assert shuffle_block(1024 * (CACHE_CHUNKS + 1), 1024, 2) == 1024
    assert shuffle_block(1024 * 50, 1024, 4) == 1  # too few chunks to deal 16 to each of 4 groups
    assert shuffle_block(500, 0, 1) == 1  # a user's dataset


@pytest.mark.parametrize("taken", [3, 4, 9])  # mid-epoch, exactly at an epoch's end, a later epoch
def test_resume_from_state_gives_identical_batches(data_dir, taken):
    source = open_source("digits", data_dir)
    kw = dict(batch_size=64, rank=3, size=4, group=0, num_groups=1, seed=5)  # 4 steps per epoch
    a = TrainStream(source, **kw)
    for _ in range(taken):
        a.next_batch()
    state = json.loads(json.dumps(a.state()))
    b = TrainStream(source, **kw)
    b.load_state(state)
    for _ in range(10):
        (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert a.state() == b.state() and a.epoch == b.epoch >= 2
    with pytest.raises(DataError, match="does not fit"):
        b.load_state({"epoch": 0, "batch": 10_000})
    b.load_state({"epoch": 1, "position": 128})  # a checkpoint of 0.1 counted samples
    assert b.state() == {"epoch": 1, "batch": 2}


def test_batches_hold_the_rows_the_sampler_serves(data_dir):
    source = open_source("digits", data_dir)
    x_all, y_all = read(data_dir / "digits" / "train.h5")
    s = TrainStream(source, batch_size=16, rank=2, size=4, group=1, num_groups=2, seed=3)
    xs, ys = zip(*(s.next_batch() for _ in range(s.steps_per_epoch)))
    served = s.sampler.epoch_rows(0)[: s.steps_per_epoch * 16]
    assert np.array_equal(torch.cat(xs).numpy(), x_all[served]) and np.array_equal(torch.cat(ys).numpy(), y_all[served])
    assert s.next_batch()[0].shape == (16, 1, 8, 8) and s.epoch == 1


def test_text_batches_are_token_ids(data_dir):
    source = open_source("text", data_dir)
    xb, yb = TrainStream(source, batch_size=8, rank=0, size=1).next_batch()
    assert xb.dtype == yb.dtype == torch.int64 and xb.shape == (8, 64) and int(xb.max()) < source.num_classes


def test_omitted_classes_never_served(data_dir):
    s = TrainStream(open_source("digits", data_dir), batch_size=32, rank=0, size=1, exclude_labels=(3, 5))
    labels = torch.cat([s.next_batch()[1] for _ in range(2 * s.steps_per_epoch)])
    assert not set(labels.tolist()) & {3, 5} and set(labels.tolist()) == set(range(10)) - {3, 5}


def test_batch_larger_than_shard_is_a_clear_error():
    with pytest.raises(DataError, match=r"157 per rank over 8 rank\(s\).*batch size 200.*at most 157"):
        ShardSampler(1257, batch_size=200, rank=0, size=8)


def test_eval_slices_cover_the_split_exactly_once(data_dir):
    dataset = open_source("digits", data_dir).dataset("val")
    x_all, y_all = read(data_dir / "digits" / "val.h5")
    parts = [list(eval_batches(dataset, batch_size=16, rank=r, size=3)) for r in range(3)]
    xs = np.concatenate([b[0].numpy() for p in parts for b in p])
    ys = np.concatenate([b[1].numpy() for p in parts for b in p])
    assert np.array_equal(xs, x_all) and np.array_equal(ys, y_all)
    assert all(len(b[0]) <= 16 for p in parts for b in p)
    assert sum(len(b[0]) for b in eval_batches(dataset, batch_size=16, limit=50)) == 50


def test_user_augmentation_is_the_same_with_loader_workers_and_leaves_the_callers_rng_alone(monkeypatch):
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    source = open_source("userpkg.data:blobs", None)
    streams = [TrainStream(source, batch_size=32, rank=1, size=2, seed=4, workers=w) for w in (0, 2)]
    torch.manual_seed(123)
    before = torch.get_rng_state()
    batches = [[s.next_batch() for _ in range(20)] for s in streams]  # crosses an epoch (15 per epoch)
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(*batches))
    clean = torch.from_numpy(source.dataset("train").dataset.x[streams[0].sampler.epoch_rows(0)[:32]])
    assert 0.2 < float((batches[0][0][0] - clean).std()) < 0.4  # the augmentation noise (0.3) is there
    assert not torch.equal(batches[0][0][0], batches[0][15][0])  # new epoch, new order and new noise
    del sys.modules["userpkg.data"], sys.modules["userpkg"]


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def test_each_rank_reads_about_its_share_of_a_large_file(tmp_path):
    """A 16 MB train.h5 of 64 chunks: over one epoch, each of 4 ranks reads about a quarter of the
    file's bytes (whole chunks, each once), where a row-level shuffle reads nearly all of it."""
    rows, width = 64 * 1024, 64  # float32 x rows of 256 bytes: 1024 rows per 256 KB chunk
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, width)).astype(np.float32)
    y = rng.integers(0, 10, rows)
    for split in ("train", "val", "test"):
        write_split(tmp_path / "big", split, x if split == "train" else x[:100], y if split == "train" else y[:100],
                    name="big", kind="image", num_classes=10, source="test")
    size = (tmp_path / "big" / "train.h5").stat().st_size
    shares = []
    for rank in range(4):
        source = open_source("big", tmp_path)  # each rank its own process, file handle and chunk cache
        s = TrainStream(source, batch_size=64, rank=rank, size=4, seed=1)
        assert s.sampler.block == 1024
        source.dataset("train")._datasets()  # opening the file reads metadata, not data
        before = _rchar()
        for _ in range(s.steps_per_epoch):
            s.next_batch()
        shares.append((_rchar() - before) / size)
    assert all(0.24 < share < 0.3 for share in shares), shares
