"""Codistillation across jobs: each group its own `mpirun`, coupled only through the exchange directory.

Two jobs of 2 ranks each form a 2-group codistillation (GROUP_OFFSET 0 and 1, one EXCHANGE_DIR and
EXCHANGE_ID); one is killed with `kill -9` of a rank mid-run, the other trains on, and the killed one,
restarted, resumes from its checkpoint and rejoins: the survivor loads its new teachers. A job for a
group that another job trains, and a job with another exchange id, are refused. Groups of different
architectures (HPCDISTILL_GROUP_MODELS) codistill; k of G peers (HPCDISTILL_PEERS) rotate.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from hpcdistill.claims import process_alive
from hpcdistill.launch import HPCDISTILL, job_env, mpirun_command, rank_pids

from conftest import ROOT, summary, train

pytestmark = pytest.mark.mpi

EXCHANGE_ID = "multijob-1"


def job_settings(tmp_path: Path, data_dir: Path, group: int, **extra) -> dict:
    settings = dict(HPCDISTILL_MODE="codistill", HPCDISTILL_GROUPS=2, HPCDISTILL_GROUP_OFFSET=group,
                    HPCDISTILL_EXCHANGE_DIR=tmp_path / "exchange", HPCDISTILL_EXCHANGE_ID=EXCHANGE_ID,
                    HPCDISTILL_RUN_DIR=tmp_path / f"job{group}", HPCDISTILL_DATA_DIR=data_dir,
                    HPCDISTILL_EXCHANGE_EVERY=20, HPCDISTILL_BURN_IN=20, HPCDISTILL_CHECKPOINT_EVERY=20,
                    HPCDISTILL_MAX_STALENESS=40, HPCDISTILL_LOG_EVERY=20, HPCDISTILL_EVAL_EVERY=1000)
    settings.update({k if k.startswith("HPCDISTILL_") else f"HPCDISTILL_{k.upper()}": v for k, v in extra.items()})
    return {k: str(v) for k, v in settings.items()}


def start(np_: int, settings: dict, log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(mpirun_command(np_, HPCDISTILL, "train"), env=job_env(**settings), cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def newest_step(directory: Path) -> int:
    steps = [int(p.stem.split("-")[1]) for p in Path(directory).glob("step-*.h5")]
    return max(steps, default=-1)


def wait_until(predicate, timeout: float, what: str, procs=()) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        for p in procs:
            assert p.poll() is None, f"a job ended (exit {p.returncode}) while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def rank_pid(mpirun: subprocess.Popen, rank: int) -> int:
    pids = rank_pids(mpirun.pid)
    assert rank in pids, f"no rank {rank} among the children of mpirun {mpirun.pid}: {pids}"
    return pids[rank]


def finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"job did not end in {timeout} s:\n{log.read_text()[-4000:]}") from None


def test_two_jobs_codistill_survive_a_kill_and_the_killed_one_rejoins(tmp_path, data_dir):
    # Job 0 is slowed, without using CPU, by a 50 ms Horovod cycle in stock timing (one allreduce per
    # step: <= 20 steps/s) so that it is still training when job 1, killed and restarted, overtakes it.
    a_settings = {**job_settings(tmp_path, data_dir, 0, steps=900), "HOROVOD_CYCLE_TIME": "50",
                  "HOROVOD_WAKE_ON_ENQUEUE": "0"}
    b_settings = job_settings(tmp_path, data_dir, 1, steps=900)
    a_log, b_log = tmp_path / "a.log", tmp_path / "b.log"
    a, b = start(2, a_settings, a_log), start(2, b_settings, b_log)
    procs = []
    try:
        ex0, ex1 = tmp_path / "exchange" / "group-0", tmp_path / "exchange" / "group-1"
        wait_until(lambda: newest_step(tmp_path / "job1" / "checkpoints" / "group-1") >= 100, 240,
                   "job 1's checkpoint of step 100", (a, b))
        leader = rank_pid(b, 0)
        os.kill(rank_pid(b, 1), signal.SIGKILL)  # one rank dies: mpirun takes job 1 down, not job 0
        assert finish(b, b_log, 60) != 0
        wait_until(lambda: not process_alive(leader), 60, "job 1's rank 0 to end")
        killed_at = newest_step(ex1)
        assert killed_at >= 100
        status = subprocess.run([HPCDISTILL, "status", str(tmp_path / "exchange")], capture_output=True, text=True)
        cells = [[c.strip() for c in line.split("|")[1:-1]] for line in status.stdout.splitlines()
                 if line.startswith("| ")]
        state = {row[0]: row[3] for row in cells[1:]}
        assert status.returncode == 1 and state["0"] == "training" and state["1"].startswith("job gone: process"), \
            status.stdout

        # Job 0 trains on without group 1, and the jobs that would break the codistillation are refused.
        a_then = newest_step(ex0)
        wait_until(lambda: newest_step(ex0) >= a_then + 60, 240, "job 0 to train on", (a,))
        assert a.poll() is None
        twin = subprocess.run(mpirun_command(1, HPCDISTILL, "train"), capture_output=True, text=True, cwd=ROOT,
                              env=job_env(**job_settings(tmp_path, data_dir, 0, run_dir=tmp_path / "twin")),
                              timeout=120)
        assert twin.returncode == 2 and "another job trains group 0 of this codistillation" in twin.stderr, \
            twin.stderr[-3000:]
        stranger = subprocess.run(
            mpirun_command(1, HPCDISTILL, "train"), capture_output=True, text=True, cwd=ROOT, timeout=120,
            env=job_env(**{**job_settings(tmp_path, data_dir, 1, run_dir=tmp_path / "stranger"),
                           "HPCDISTILL_EXCHANGE_ID": "another-codistillation"}))
        assert stranger.returncode == 2 and "is in use by" in stranger.stderr \
            and f"HPCDISTILL_EXCHANGE_ID={EXCHANGE_ID}" in stranger.stderr, stranger.stderr[-3000:]

        # Job 1 again, as a requeue would start it: it resumes from its checkpoint and rejoins.
        b2 = start(2, b_settings, b_log)
        procs.append(b2)
        assert finish(b2, b_log) == 0, b_log.read_text()[-4000:]
        assert finish(a, a_log) == 0, a_log.read_text()[-4000:]
    finally:
        for p in (a, b, *procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    b_text = b_log.read_text()
    assert "took over the stale claim" in b_text and "resuming from" in b_text, b_text[-4000:]
    resumed_at = int(b_text.split("resuming from", 1)[1].split("(step ", 1)[1].split(")", 1)[0])
    assert 100 <= resumed_at <= killed_at
    sa, sb = summary(tmp_path / "job0"), summary(tmp_path / "job1")
    assert [g["group"] for g in sa["groups"]] == [0] and [g["group"] for g in sb["groups"]] == [1]
    assert sa["num_groups"] == sb["num_groups"] == 2
    ca, cb = sa["codistill"], sb["codistill"]
    assert ca["exchange_id"] == cb["exchange_id"] == EXCHANGE_ID
    # the survivor dropped the dead group's teacher, then loaded the rejoined group's new ones
    assert ca["teachers_dropped"] >= 1, ca
    assert ca["groups"][0]["last_loaded"]["1"] > killed_at, ca
    assert cb["groups"][0]["last_loaded"]["0"] > 0 and cb["teachers_rejected"] == ca["teachers_rejected"] == 0
    assert all(g["test_accuracy"] > 0.8 for g in sa["groups"] + sb["groups"])
    # `hpcdistill status` sees both groups finished
    status = subprocess.run([HPCDISTILL, "status", str(tmp_path / "exchange")], capture_output=True, text=True)
    assert status.returncode == 0 and "2 of 2 group(s) finished" in status.stdout, status.stdout + status.stderr


def test_groups_of_different_architectures_codistill(tmp_path, data_dir):
    """GROUP_MODELS=mlp:cnn-small: each group trains its own model and distills from the other's."""
    run = tmp_path / "run"
    train(4, run, mode="codistill", groups=2, group_models="mlp:cnn-small", steps=120, exchange_every=20,
          burn_in=20, data_dir=data_dir, eval_every=1000)
    s = summary(run)
    assert [g["model"] for g in s["groups"]] == ["mlp", "cnn-small"]
    c = s["codistill"]
    assert c["teachers_rejected"] == 0 and all(g["teachers_loaded"] >= 4 for g in c["groups"]), c
    from hpcdistill.checkpoints import read_meta

    metas = [read_meta(sorted((run / "exchange" / f"group-{g}").glob("step-*.h5"))[-1]) for g in (0, 1)]
    assert [m["arch"]["name"] for m in metas] == ["mlp", "cnn-small"]
    assert all(g["test_accuracy"] > 0.6 for g in s["groups"]), s["groups"]  # cnn-small: ~0.75 at 120 steps


def test_k_of_g_peers_rotate(tmp_path, data_dir):
    """4 groups of one rank, k = 1: each exchange reads one peer file, and over the run every peer of
    every group is its teacher at some point (the rotation)."""
    run = tmp_path / "run"
    train(4, run, mode="codistill", groups=4, peers=1, steps=160, exchange_every=20, burn_in=20,
                 data_dir=data_dir, eval_every=1000, log_every=20)
    s = summary(run)
    c = s["codistill"]
    assert c["peers_per_exchange"] == 1 and c["teachers_rejected"] == 0
    # about one file per exchange per group (a ~340 kB mlp file), not three (a file read ahead for a peer
    # that the next exchange's rotation passes over, because it had nothing fresh, is read for nothing)
    per_exchange = c["exchange_bytes_read"] / c["exchanges"]
    size = next((run / "exchange" / "group-0").glob("step-*.h5")).stat().st_size
    assert per_exchange <= 1.5 * size, (per_exchange, size)
    for g in c["groups"]:
        assert len(g["last_loaded"]) == 3, g  # every peer was a teacher at some exchange
