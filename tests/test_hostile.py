"""Hostile and foreign files (issue 12), made by tests/hostile.py from valid checkpoints, against the
reader itself, as distillation teachers of a real `mpirun` job, and dropped into the exchange directory
of a running codistillation. Each must be refused, with its own reason, at once: nothing may hang (a
FIFO behind a virtual dataset), read a system file, or allocate the gigabytes a file declares."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import h5py
import pytest

from hpcdistill.checkpoints import CheckpointError, read_h5
from hpcdistill.exchange import Exchange, expect_record
from hpcdistill.launch import job_env, mpirun_command
from hpcdistill.models import build_from_record, manifest
from hpcdistill.teachers import _read_teacher

import hostile
from conftest import HPCDISTILL, ROOT, builtin_model, needs_mpi, summary

EXCHANGE_ID = "hostile-test"
FAST = 1.0  # seconds: a refusal comes from HDF5's metadata, in milliseconds

# case -> (code, words of the reason) when read by the exchange (Exchange.freshest)
PEER_REFUSALS = {
    "virtual-fifo": ("format", "is virtual, external, chunked or compressed"),
    "virtual-fifo-unlimited": ("format", "is virtual, external, chunked or compressed"),
    "external-passwd": ("format", "is virtual, external, chunked or compressed"),
    "huge-declared": ("too-large", "datasets declare 17180"),
    "gzip-bomb": ("format", "is virtual, external, chunked or compressed"),
    "other-shape": ("architecture", "another architecture"),
    "meta-list": ("format", "meta is a JSON list"),
    "health-list": ("format", "health record is a list"),
    "health-null": ("format", "health record is a NoneType"),
    "step-string": ("mismatch", "step mismatch"),
    "arch-string": ("architecture", "architecture mlp but expected"),
    "huge-arch": ("architecture", "60000"),
    "another-run": ("another-run", "another run"),
    "soft-link": ("format", "soft or external link"),
    "external-link": ("format", "soft or external link"),
    "symlink-out": ("symlink", "symbolic link"),
    "fifo": ("not-a-file", "not a regular file"),
}
# the peer cases read_h5 itself refuses (the others are sound HDF5 checkpoints saying the wrong thing)
READER_REFUSALS = {k: v for k, v in PEER_REFUSALS.items() if k in (
    "virtual-fifo", "virtual-fifo-unlimited", "external-passwd", "huge-declared", "gzip-bomb", "meta-list",
    "soft-link", "external-link", "fifo")}
# case -> (code, words) when read as a distillation teacher
TEACHER_REFUSALS = {
    "virtual-fifo": ("format", "is virtual, external, chunked or compressed"),
    "virtual-fifo-unlimited": ("format", "is virtual, external, chunked or compressed"),
    "external-passwd": ("format", "is virtual, external, chunked or compressed"),
    "huge-declared": ("too-large", "datasets declare 17180"),
    "gzip-bomb": ("format", "is virtual, external, chunked or compressed"),
    "other-shape": ("format", "its tensors do not match its model record"),
    "meta-list": ("format", "meta is a JSON list"),
    "arch-string": ("format", "the model record is a str"),
    "huge-arch": ("format", "its tensors do not match its model record"),
    "soft-link": ("format", "soft or external link"),
    "external-link": ("format", "soft or external link"),
    "fifo": ("not-a-file", "not a regular file"),
}


@pytest.fixture(scope="module")
def mlp():
    return builtin_model("mlp")  # (record, model): the default model for digits, as a job builds it


@pytest.fixture(scope="module")
def peers(tmp_path_factory, mlp):
    """Group 1's exchange directory holding a valid file at step 10 and every hostile case above it."""
    record, model = mlp
    root = tmp_path_factory.mktemp("peers")
    cases = hostile.peer_cases(root / "exchange" / "group-1", model, record, exchange_id=EXCHANGE_ID,
                               staging=root / "staging")
    valid = hostile.peer_file(root / "exchange" / "group-1" / "step-00000010.h5", model, record, step=10,
                              exchange_id=EXCHANGE_ID)
    return root / "exchange", cases, valid


@pytest.fixture(scope="module")
def teachers(tmp_path_factory, mlp):
    record, model = mlp
    return hostile.teacher_cases(tmp_path_factory.mktemp("teachers"), model, record)


# --- the crafted files are what they claim (else the tests below would prove nothing) ---------------

@pytest.mark.timeout(60)
def test_crafted_files_are_what_they_claim(peers, teachers, mlp):
    _, cases, valid = peers
    tensor = hostile._first_tensor(mlp[1])
    assert read_h5(valid)[1]["exchange_id"] == EXCHANGE_ID and read_h5(teachers["valid"])[1]["arch"]["name"] == "mlp"
    for files, added in ((cases, tensor), (teachers, hostile.EXTRA)):  # peers: a model tensor replaced
        assert Path(files["fifo"]).is_fifo()
        with h5py.File(files["virtual-fifo"], "r") as f:
            assert f[added].is_virtual and Path(f[added].virtual_sources()[0].file_name).is_fifo()
        with h5py.File(files["external-passwd"], "r") as f:
            assert [name for name, _, _ in f[added].external] in (["/etc/passwd"], [b"/etc/passwd"])
        with h5py.File(files["huge-declared"], "r") as f:
            assert f[hostile.EXTRA].nbytes == 16 * 2**30 and f[hostile.EXTRA].id.get_storage_size() == 0
        assert os.path.getsize(files["huge-declared"]) < 2**20
        with h5py.File(files["gzip-bomb"], "r") as f:
            ds = f[hostile.EXTRA]
            assert ds.nbytes == 2 * 2**30 and ds.compression == "gzip" and ds.id.get_storage_size() < 8 * 2**20
        assert os.path.getsize(files["gzip-bomb"]) < 8 * 2**20
        with h5py.File(files["external-link"], "r") as f:
            assert isinstance(f.get(tensor, getlink=True), h5py.ExternalLink)
        with h5py.File(files["soft-link"], "r") as f:
            assert isinstance(f.get(hostile.EXTRA, getlink=True), h5py.SoftLink)
    assert Path(cases["symlink-out"]).is_symlink() and not Path(cases["symlink-out"]).resolve().is_relative_to(
        cases["symlink-out"].parent.parent)
    # the files whose defect is what they say carry a valid checksum: only that defect can refuse them
    for name in ("other-shape", "health-list", "health-null", "step-string", "arch-string", "huge-arch", "another-run"):
        read_h5(cases[name])
    for name in ("other-shape", "arch-string", "huge-arch"):
        read_h5(teachers[name])
    assert read_h5(cases["huge-arch"])[1]["arch"]["args"]["hidden"] == [60000, 60000]


# --- directly against the reader ---------------------------------------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", READER_REFUSALS)
def test_read_h5_refuses_at_once(peers, case):
    code, words = READER_REFUSALS[case]
    path = peers[1][case]
    t = time.monotonic()
    with pytest.raises(CheckpointError) as info:
        read_h5(path)
    assert time.monotonic() - t < FAST
    assert (info.value.code, info.value.path) == (code, path) and words in info.value.reason, info.value


@pytest.mark.timeout(60)
def test_read_h5_refuses_an_external_link_to_a_fifo_without_opening_it(tmp_path, mlp):
    record, model = mlp
    path = hostile.add_external_link(hostile.teacher_file(tmp_path / "t.h5", model, record),
                                     hostile.fifo(tmp_path / "p"))
    t = time.monotonic()
    with pytest.raises(CheckpointError, match="soft or external link"):
        read_h5(path)
    assert time.monotonic() - t < FAST


@pytest.mark.timeout(60)
def test_exchange_refuses_each_hostile_peer_file_and_takes_the_valid_one(peers, mlp):
    record, model = mlp
    directory, cases, valid = peers
    me = Exchange(directory, group=0, num_groups=2, exchange_id=EXCHANGE_ID)
    t = time.monotonic()
    found, rejections = me.freshest(1, expect=expect_record(record, manifest(model)))
    assert time.monotonic() - t < FAST  # all of them together
    assert found is not None and (found.step, found.path) == (10, valid)
    got = {path: (code, reason) for path, code, reason in rejections}
    assert len(rejections) == len(cases) == len(PEER_REFUSALS)
    for name, path in cases.items():
        code, words = PEER_REFUSALS[name]
        assert got[path][0] == code and words in got[path][1], (name, got[path])
    # remembered: neither read nor reported again
    assert me.freshest(1, expect=expect_record(record, manifest(model)))[1] == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", TEACHER_REFUSALS)
def test_teacher_reader_refuses_at_once(teachers, case):
    code, words = TEACHER_REFUSALS[case]
    t = time.monotonic()
    with pytest.raises(CheckpointError) as info:
        _read_teacher(teachers[case], {})
    assert time.monotonic() - t < FAST
    assert info.value.code == code and words in info.value.reason, info.value


# --- as distillation teachers of a real job ----------------------------------------------------------

# Each rank runs under this wrapper, which writes the peak RSS (KB) of its rank to DIR/rss.<rank>. When
# one rank fails (MPI_Abort), mpirun sends the others SIGTERM and, 1 s later, SIGKILL; the wrapper then
# ends its rank at once (a rank treats SIGTERM as "checkpoint at the next step") and still writes the
# figure before the SIGKILL. Portable: no /usr/bin/time needed.
RSS_WRAPPER = r"""
import os, resource, signal, subprocess, sys
rank = next((os.environ[v] for v in ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK") if v in os.environ), "x")
child = subprocess.Popen(sys.argv[2:])
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(s, lambda sig, _: child.kill())
rc = child.wait()
with open(os.path.join(sys.argv[1], "rss." + rank), "w") as fh:
    fh.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(rc if rc >= 0 else 128 - rc)
"""
TEACHER_WALL = 60.0   # seconds a refused teacher may take, mpirun start-up included (measured: 3-5 s)
RSS_FACTOR = 1.5      # a rank reading a hostile teacher stays below this times a normal run's peak RSS
RSS_SEEN: dict[str, dict] = {}  # case -> {"rc", "wall", "rss": {rank: KB}}, printed at the end (-s)


def distill(run: Path, teacher: Path, data_dir: Path) -> dict:
    """`mpirun -np 2 hpcdistill train` distilling mlp-small from `teacher` on digits, each rank's peak RSS."""
    run.mkdir(parents=True)
    env = job_env(HPCDISTILL_MODE="distill", HPCDISTILL_TEACHERS=teacher, HPCDISTILL_MODEL="mlp-small",
                  HPCDISTILL_DATA_DIR=data_dir, HPCDISTILL_RUN_DIR=run / "run", HPCDISTILL_RESUME="never",
                  HPCDISTILL_STEPS=20)
    t = time.monotonic()
    proc = subprocess.run(mpirun_command(2, sys.executable, "-c", RSS_WRAPPER, run, HPCDISTILL, "train"), env=env,
                          capture_output=True, text=True, timeout=300, cwd=ROOT, stdin=subprocess.DEVNULL,
                          check=False)
    wall = time.monotonic() - t
    rss = {int(p.name.split(".")[1]): int(p.read_text()) for p in run.glob("rss.[0-9]*") if p.read_text().strip()}
    return {"rc": proc.returncode, "wall": wall, "rss": rss, "stdout": proc.stdout, "stderr": proc.stderr}


@pytest.fixture(scope="module")
def normal_teacher_run(tmp_path_factory, data_dir, teachers):
    out = distill(tmp_path_factory.mktemp("distill") / "valid", teachers["valid"], data_dir)
    assert out["rc"] == 0, out["stderr"][-3000:]
    assert sorted(out["rss"]) == [0, 1]
    RSS_SEEN["valid"] = out
    yield out
    print("\npeak RSS (MB) of the ranks, distilling mlp-small from each teacher (rank 0 reads it):")
    for name, o in RSS_SEEN.items():
        print(f"  {name:24s} exit {o['rc']}  {o['wall']:5.1f} s  " +
              "  ".join(f"rank {r}: {kb / 1024:6.0f}" for r, kb in sorted(o["rss"].items())))


@needs_mpi
@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", TEACHER_REFUSALS)
def test_hostile_teacher_is_refused_before_training_without_memory(tmp_path, data_dir, teachers, normal_teacher_run,
                                                                   case):
    _, words = TEACHER_REFUSALS[case]  # the job's message gives the reason (the code is for summaries)
    out = distill(tmp_path / "job", teachers[case], data_dir)
    RSS_SEEN[case] = out
    assert out["rc"] == 2, out["stderr"][-3000:]
    assert out["wall"] < TEACHER_WALL
    assert f"HPCDISTILL_TEACHERS: teacher refused: {teachers[case]}: " in out["stderr"], out["stderr"][-3000:]
    assert words in out["stderr"]
    assert not (tmp_path / "job" / "run" / "metrics.jsonl").exists()  # refused before the first step
    assert 0 in out["rss"], "rank 0 (the reader) wrote no RSS figure"
    limit = RSS_FACTOR * max(normal_teacher_run["rss"].values())
    assert max(out["rss"].values()) < limit, (out["rss"], normal_teacher_run["rss"])


SPARSE = 512 * 2**20  # bytes of the non-model array of the sparse teacher files


@needs_mpi
@pytest.mark.timeout(300)
@pytest.mark.parametrize("shape", [
    pytest.param((SPARSE // 4,), id="flat"),
    pytest.param((1, SPARSE // 4), id="one-row"),  # one row of 512 MiB: hashed from storage in pieces
])
def test_a_teacher_with_a_large_sparse_extra_array_stays_in_bounded_memory(tmp_path, data_dir, mlp,
                                                                           normal_teacher_run, shape):
    """A non-model array is hashed, not kept: a sparse file declaring 512 MiB beyond the model (its length
    covers it, so no size check can refuse it) must not cost rank 0 or the others 512 MiB."""
    record, model = mlp
    path = hostile.sparse_extra(hostile.teacher_file(tmp_path / "sparse.h5", model, record), shape=shape)
    assert os.path.getsize(path) > SPARSE and os.stat(path).st_blocks * 512 < 8 * 2**20
    out = distill(tmp_path / "job", path, data_dir)
    RSS_SEEN[f"sparse-extra {list(shape)}"] = out
    assert out["rc"] in (0, 2), out["stderr"][-3000:]  # refused, or used without its extra array
    assert max(out["rss"].values()) < RSS_FACTOR * max(normal_teacher_run["rss"].values()), out["rss"]


# --- dropped into the exchange directory of a running codistillation ---------------------------------

CODISTILL_STEPS = 2000


def _wait_for(what: str, ok, proc, deadline: float, log: Path) -> None:
    while not ok():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} in time:\n{log.read_text()[-3000:]}")
        time.sleep(0.02)


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def _is_final(path: Path) -> bool:
    try:
        return read_h5(path)[1]["health"].get("final") is True
    except CheckpointError:
        return False


def _last_step(metrics: Path) -> int:
    try:
        lines = metrics.read_text().splitlines()
    except FileNotFoundError:
        return 0
    return max((json.loads(line)["step"] for line in lines if line.endswith("}")), default=0)


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory, data_dir):
    """2 groups of 1 rank codistilling; group 0 is the straggler (4x slower) and the reader of group-1/.
    Group 1 finishes first and its final file stays: from then on nothing rotates group-1/ (a publish
    deletes the files of higher steps, so while group 1 publishes, files planted above its step would
    be deleted at its next publish, racing the reader). The hostile files, carrying this run's exchange
    id (its run id, from config.json), are planted then as steps 900001+ of group 1, renamed in whole,
    while group 0 still trains."""
    root = tmp_path_factory.mktemp("codistill")
    run, log = root / "run", root / "output.log"
    env = job_env(HPCDISTILL_MODE="codistill", HPCDISTILL_GROUPS=2, HPCDISTILL_DATA_DIR=data_dir,
                  HPCDISTILL_RUN_DIR=run, HPCDISTILL_RESUME="never", HPCDISTILL_STEPS=CODISTILL_STEPS,
                  HPCDISTILL_EXCHANGE_EVERY=20, HPCDISTILL_STRAGGLER_RANK=0, HPCDISTILL_STRAGGLER_DELAY=3)
    t0 = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(mpirun_command(2, HPCDISTILL, "train"), env=env, stdout=out, stderr=subprocess.STDOUT,
                                cwd=ROOT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        _wait_for("config.json", lambda: _json(run / "config.json") is not None, proc, deadline, log)
        config = _json(run / "config.json")
        final = run / "exchange" / "group-1" / f"step-{CODISTILL_STEPS:08d}.h5"
        # its last step is published twice (the exchange step, then at the end marked final): only after
        # the second is group-1/ left alone
        _wait_for("group 1's final exchange file", lambda: _is_final(final), proc, deadline, log)
        assert read_h5(final)[1]["exchange_id"] == config["run_id"]  # the exchange id is the run id
        record = config["arch"]
        planted = hostile.peer_cases(final.parent, build_from_record(record), record,
                                     exchange_id=config["run_id"], staging=root / "staging")
        group0_step = _last_step(run / "metrics-g0.jsonl")
        assert group0_step < CODISTILL_STEPS - 100, f"group 0 was at step {group0_step} when the files were planted"
        rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.terminate()  # mpirun (started here) passes it on to its ranks
            proc.wait(30)
    return {"rc": rc, "run": run, "planted": planted, "output": log.read_text(), "wall": time.monotonic() - t0,
            "group0_step": group0_step, "run_id": config["run_id"]}


@needs_mpi
@pytest.mark.timeout(300)
def test_codistillation_refuses_planted_files_and_trains_on(planted_run):
    r = planted_run
    assert r["rc"] == 0, r["output"][-4000:]
    s = summary(r["run"])
    assert [g["steps"] for g in s["groups"]] == [CODISTILL_STEPS, CODISTILL_STEPS]
    cod = s["codistill"]
    assert cod["exchange_id"] == r["run_id"]
    expected = Counter(PEER_REFUSALS[name][0] for name in r["planted"])
    assert cod["teachers_rejected_by_reason"] == dict(expected), (cod, r["group0_step"])
    assert cod["teachers_rejected"] == len(r["planted"])
    by_group = {g["group"]: g for g in cod["groups"]}
    assert by_group[0]["teachers_rejected_by_reason"] == dict(expected)
    assert by_group[1]["teachers_rejected_by_reason"] == {}
    assert cod["teachers_loaded"] >= 1 and by_group[0]["teachers_loaded"] >= 1  # group 1's real files


@needs_mpi
@pytest.mark.timeout(300)
def test_codistillation_names_each_planted_file_and_its_reason(planted_run):
    refused = [line for line in planted_run["output"].splitlines() if "refused teacher" in line]
    for name, path in planted_run["planted"].items():
        code, words = PEER_REFUSALS[name]
        lines = [line for line in refused if f"refused teacher {path} ({code}): " in line]
        assert len(lines) == 1 and words in lines[0], (name, lines, refused)
        assert "[g0 r0/1 w0] WARNING" in lines[0]  # group 0's leader, the reader of group-1/


@pytest.mark.timeout(60)
def test_a_file_of_fifty_thousand_objects_is_refused_before_opening_them(tmp_path, mlp):
    """Opening an HDF5 object costs ~0.25 ms: 50,000 empty datasets stalled a reader for 14 s. The count
    is known from the link names alone, before any object is opened."""
    record, model = mlp
    path = hostile.teacher_file(tmp_path / "many.h5", model, record)
    with h5py.File(path, "a") as f:
        for i in range(50_001):
            f.create_dataset(f"extra/d{i}", shape=(0,), dtype="u1")
    t = time.monotonic()
    with pytest.raises(CheckpointError) as err:
        read_h5(path)
    assert err.value.code == "too-large" and "objects (at most 50000)" in err.value.reason
    assert time.monotonic() - t < 5
