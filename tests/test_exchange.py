"""The codistillation exchange directory: publish, discover, refuse bad teachers, survive races."""

import multiprocessing as mp
import shutil
import time

import pytest
import torch
from torch import nn

from hpcdistill.checkpoints import capture, model_arrays, write_h5
from hpcdistill.exchange import Exchange, expect_record

from conftest import builtin_model, flip_stored_byte

ARCH = {"name": "mlp", "sizes": [16, 16]}
HEALTHY = {"train_loss": 1.0, "initial_loss": 2.3}


def filled(value, size=16):
    model = nn.Linear(size, size)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
    return model


def test_publish_and_freshest_between_two_groups(tmp_path):
    ex0 = Exchange(tmp_path, group=0, num_groups=2)
    ex1 = Exchange(tmp_path, group=1, num_groups=2)
    assert ex0.peers() == [1] and ex1.peers() == [0]
    assert ex1.freshest(0, expect=expect_record(ARCH)) == (None, [])  # nothing published yet

    path = ex0.publish(5, filled(5.0), arch={"name": "mlp", "sizes": (16, 16)}, health=HEALTHY)
    assert path == tmp_path / "group-0" / "step-00000005.h5"
    ck, rejections = ex1.freshest(0, expect=expect_record(ARCH))
    assert rejections == [] and (ck.group, ck.step, ck.path) == (0, 5, path)
    assert ck.meta["health"] == {**HEALTHY, "finite": True} and ck.meta["arch"] == ARCH
    sd = model_arrays(ck.arrays)
    assert torch.equal(sd["weight"], torch.full((16, 16), 5.0))
    assert ex1.freshest(0, expect=expect_record(ARCH), min_step=6) == (None, [])
    assert ex1.freshest(0, expect=expect_record(ARCH), exclude_path_steps={5}) == (None, [])


def test_publish_keeps_newest_files(tmp_path):
    ex = Exchange(tmp_path, group=1, num_groups=3, keep=2)
    for step in range(1, 6):
        ex.publish(step, filled(step), arch=ARCH, health=HEALTHY)
    names = sorted(p.name for p in (tmp_path / "group-1").iterdir())
    assert names == ["step-00000004.h5", "step-00000005.h5"]
    assert ex.peers() == [0, 2]


def truncate(path):
    path.write_bytes(path.read_bytes()[:1000])


def publish_bad(ex, kind):
    """Publish step 20 of group 0, bad in the given way."""
    if kind == "corrupt":
        flip_stored_byte(ex.publish(20, filled(20.0), arch=ARCH, health=HEALTHY), "model/weight")
    elif kind == "truncated":
        truncate(ex.publish(20, filled(20.0), arch=ARCH, health=HEALTHY))
    elif kind == "other-arch":
        ex.publish(20, filled(20.0), arch={"name": "mlp", "sizes": [32]}, health=HEALTHY)
    elif kind == "nan-weights":
        ex.publish(20, filled(float("nan")), arch=ARCH, health=HEALTHY)
    elif kind == "inf-weights":
        ex.publish(20, filled(float("inf")), arch=ARCH, health=HEALTHY)
    elif kind == "diverged":
        ex.publish(20, filled(20.0), arch=ARCH, health={"train_loss": 50.0, "initial_loss": 2.3})
    elif kind == "nan-loss":
        ex.publish(20, filled(20.0), arch=ARCH, health={"train_loss": float("nan"), "initial_loss": 2.3})
    elif kind == "wrong-group":
        other = Exchange(ex.directory / "elsewhere", group=1, num_groups=2, exchange_id="x")
        src = other.publish(20, filled(20.0), arch=ARCH, health=HEALTHY)
        (ex.directory / "group-0").mkdir(parents=True, exist_ok=True)
        shutil.copy(src, ex.directory / "group-0" / src.name)
    elif kind == "another-run":  # a valid file of the same settings, from another run
        Exchange(ex.directory, group=0, num_groups=2, exchange_id="y").publish(20, filled(20.0), arch=ARCH,
                                                                               health=HEALTHY)
    elif kind in ("health-list", "health-null", "loss-string"):
        health = {"health-list": [1, 2], "health-null": None, "loss-string": {"train_loss": "low"}}[kind]
        arrays, meta = capture(filled(20.0), step=20, arch=ARCH, rng=False, meta={"group": 0, "exchange_id": "x"})
        meta["health"] = health
        (ex.directory / "group-0").mkdir(parents=True, exist_ok=True)
        write_h5(ex.directory / "group-0" / "step-00000020.h5", arrays, meta)
    elif kind == "symlink":
        good = Exchange(ex.directory / "elsewhere", group=0, num_groups=2, exchange_id="x").publish(
            20, filled(20.0), arch=ARCH, health=HEALTHY)
        (ex.directory / "group-0").mkdir(parents=True, exist_ok=True)
        (ex.directory / "group-0" / "step-00000020.h5").symlink_to(good)


BAD = {"corrupt": "bad checksum", "truncated": "truncated", "other-arch": "architecture",
       "nan-weights": "non-finite", "inf-weights": "non-finite", "diverged": "diverged",
       "nan-loss": "diverged", "wrong-group": "group mismatch", "another-run": "another run: 'y'",
       "health-list": "health record is a list", "health-null": "health record is a NoneType",
       "loss-string": "train_loss is a str", "symlink": "symbolic link"}


@pytest.mark.parametrize("kind", BAD)
def test_bad_peer_file_is_refused_and_older_good_one_used(tmp_path, kind):
    peer = Exchange(tmp_path, group=0, num_groups=2, keep=3, exchange_id="x")
    me = Exchange(tmp_path, group=1, num_groups=2, exchange_id="x")
    bad_path = tmp_path / "group-0" / "step-00000020.h5"

    publish_bad(peer, kind)
    ck, rejections = me.freshest(0, expect=expect_record(ARCH))
    assert ck is None and len(rejections) == 1
    assert rejections[0][0] == bad_path and BAD[kind] in rejections[0][2]

    # An older good file exists (a newer bad one appears after it): that one is the teacher.
    Exchange(tmp_path, group=0, num_groups=2, keep=3, exchange_id="x").publish(10, filled(10.0), arch=ARCH,
                                                                               health=HEALTHY)
    ck, rejections = me.freshest(0, expect=expect_record(ARCH))
    assert ck.step == 10 and torch.equal(model_arrays(ck.arrays)["bias"], torch.full((16,), 10.0))
    assert rejections == []  # the bad file was reported once, not on every call


def test_rewritten_rejected_file_is_read_again(tmp_path):
    peer = Exchange(tmp_path, group=0, num_groups=2)
    me = Exchange(tmp_path, group=1, num_groups=2)
    truncate(peer.publish(20, filled(20.0), arch=ARCH, health=HEALTHY))
    assert me.freshest(0, expect=expect_record(ARCH))[0] is None
    peer.publish(20, filled(20.0), arch=ARCH, health=HEALTHY)
    ck, rejections = me.freshest(0, expect=expect_record(ARCH))
    assert ck.step == 20 and rejections == []


def _writer(directory, ready, min_publishes, min_seconds, out):
    ex = Exchange(directory, group=1, num_groups=2, keep=2)
    model = filled(0.0, size=128)
    ready.wait(60)
    start, step = time.monotonic(), 0
    while step < min_publishes or time.monotonic() - start < min_seconds:
        step += 1
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(step)
        ex.publish(step, model, arch=ARCH, health=HEALTHY)
    out.put(("writer", step))


def _reader(directory, ready, stop, out):
    ex = Exchange(directory, group=0, num_groups=2)
    steps, rejections, inconsistent = [], [], []
    ready.set()
    while not stop.is_set():
        ck, rejected = ex.freshest(1, expect=expect_record(ARCH))
        rejections += [(str(p), reason) for p, _, reason in rejected]
        if ck is not None:
            steps.append(ck.step)
            values = torch.cat([t.reshape(-1) for t in model_arrays(ck.arrays).values()])
            if ck.meta["step"] != ck.step or not bool((values == ck.step).all()):
                inconsistent.append(ck.step)
    out.put(("reader", steps, rejections, inconsistent))


def test_concurrent_writer_never_exposes_a_partial_file(tmp_path):
    ctx = mp.get_context("spawn")
    ready, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
    reader = ctx.Process(target=_reader, args=(tmp_path, ready, stop, out))
    writer = ctx.Process(target=_writer, args=(tmp_path, ready, 200, 2.0, out))
    reader.start()
    writer.start()
    try:
        results = {}
        kind, *rest = out.get(timeout=60)  # the writer finishes first
        results[kind] = rest
        stop.set()
        kind, *rest = out.get(timeout=30)
        results[kind] = rest
    finally:
        stop.set()
        for p in (writer, reader):
            p.join(10)
            if p.is_alive():
                p.kill()
    (published,) = results["writer"]
    steps, rejections, inconsistent = results["reader"]
    assert published >= 200
    assert rejections == [] and inconsistent == []
    assert len(steps) > 20 and len(set(steps)) > 10, (len(steps), len(set(steps)))
    assert steps == sorted(steps)  # never goes back to an older teacher


@pytest.mark.mpi  # MPI initialised in this process (COMM_SELF)
def test_a_group_that_left_is_not_waited_for(tmp_path):
    """Policy "wait" polls for a fresher peer file; a peer that diverged marks itself gone, and the
    waiting group drops it at once instead of after the timeout. Publishing again clears the mark."""
    from hpcdistill.comm.topology import init_mpi
    from hpcdistill.teachers import PeerTeachers

    MPI = init_mpi()
    from hpcdistill.models import resolve_model

    spec = resolve_model("mlp")
    arch, model = builtin_model("mlp")
    health = {"train_loss": 1.0, "initial_loss": 2.3}
    Exchange(tmp_path, group=1, num_groups=2).publish(10, model, arch=arch, health=health)
    me = PeerTeachers(tmp_path, comm=MPI.COMM_SELF, group=0, num_groups=2, spec=spec, arch=arch, device="cpu",
                      max_staleness=20, policy="wait", wait_timeout=30)
    me.refresh(10)
    assert me.models and me.current[1][0] == 10
    peer = PeerTeachers(tmp_path, comm=MPI.COMM_SELF, group=1, num_groups=2, spec=spec, arch=arch, device="cpu",
                        max_staleness=20)
    peer.leave("diverged at step 12")
    assert Exchange(tmp_path, group=0, num_groups=2).gone(1)
    t = time.monotonic()
    me.refresh(40)  # 30 steps stale: wait, but the peer has left
    assert time.monotonic() - t < 5 and not me.models and me.dropped == 1 and me.waits == 1
    Exchange(tmp_path, group=1, num_groups=2).publish(50, model, arch=arch, health=health)
    assert not Exchange(tmp_path, group=0, num_groups=2).gone(1)
