"""Sync data parallelism end to end with real `mpirun` runs: accuracy, agreement, checkpoints, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hpcdistill.checkpoints import CheckpointManager, read_h5
from hpcdistill.launch import HPCDISTILL, job_env, mpirun_command

from conftest import ROOT, flip_stored_byte, metrics, run_mpi, summary, train

pytestmark = pytest.mark.mpi


def _final_model(run_dir: Path) -> tuple[int, dict]:
    path, arrays, meta = CheckpointManager(Path(run_dir) / "checkpoints").latest_valid()
    return meta["step"], {k: np.asarray(v) for k, v in arrays.items() if k.startswith("model/")}


def test_digits_four_ranks_identical_weights_and_accuracy(tmp_path, data_dir):
    run = tmp_path / "run"
    out = tmp_path / "hashes.json"
    env = {"HPCDISTILL_RUN_DIR": str(run), "HPCDISTILL_DATA_DIR": str(data_dir), "HPCDISTILL_STEPS": "300",
           "HPCDISTILL_RESUME": "never"}
    proc = run_mpi(4, [sys.executable, str(ROOT / "tests/mpi/train_and_hash.py"), str(out)], **env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    hashes = json.loads(out.read_text())
    assert len(hashes) == 4 and len({h for _, h in hashes.values()}) == 1  # bitwise identical on every rank
    s = summary(run)
    assert s["mode"] == "sync" and s["world_size"] == 4 and s["num_groups"] == 1
    assert s["groups"][0]["ranks"] == [0, 1, 2, 3] and s["groups"][0]["test_accuracy"] >= 0.93
    losses = [m["loss"] for m in metrics(run) if "loss" in m]
    assert np.mean(losses[-5:]) < 0.25 * np.mean(losses[:3])
    # one rank speaks: progress lines come from world rank 0 only
    assert "[g0 r0/4 w0] INFO step 300/300" in proc.stdout and "w1] INFO" not in proc.stdout
    assert {"config.json", "metrics.jsonl", "summary.json", "checkpoints"} <= {p.name for p in run.iterdir()}


def test_text_validation_loss_falls(tmp_path, data_dir):
    run = tmp_path / "text"
    train(2, run, data_dir=data_dir, dataset="text", model="charlm-small", steps=60, eval_every=20,
          batch_size=16, log_every=20)
    vals = [m["val_loss"] for m in metrics(run) if "val_loss" in m]
    final = summary(run)["groups"][0]["val_loss"]
    assert len(vals) == 2 and vals[0] > vals[1] > final
    assert final < np.log(97) * 0.75  # well below the uniform guess over the 97-character vocabulary


def _stop_midway(cmd, env, run_dir: Path, after_step: int, how: str) -> subprocess.Popen:
    """Start a run and signal it once it has logged `after_step`; return the finished process."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if f"step {after_step}/" in line:
            if how == "mpirun-usr2":  # what Slurm does with --signal: mpirun forwards USR2 to every rank
                proc.send_signal(signal.SIGUSR2)
            else:  # SIGTERM straight to every rank (srun / scancel --signal=TERM)
                pids = subprocess.run(["pgrep", "-f", "hpcdistill train", "-P", str(proc.pid)],
                                      capture_output=True, text=True).stdout.split()
                assert pids, "no rank processes found"
                for pid in pids:
                    os.kill(int(pid), signal.SIGTERM)
            break
    out, _ = proc.communicate(timeout=300)
    proc.output = "".join(lines) + out
    return proc


def test_signal_checkpoints_and_resume_matches_uninterrupted_run(tmp_path, data_dir):
    # The straggler (10x its step time asleep) slows the run so the signal lands mid-way; it does not
    # change the arithmetic, so the reference run is the same computation.
    settings = dict(data_dir=data_dir, steps=200, checkpoint_every=1000, log_every=10,
                    straggler_rank=1, straggler_delay=10)
    reference = tmp_path / "reference"
    train(2, reference, **settings)

    for how in ("mpirun-usr2", "sigterm"):
        run = tmp_path / how
        env = job_env(**settings, run_dir=run, resume="auto")
        stopped = _stop_midway(mpirun_command(2, HPCDISTILL, "train"), env, run, after_step=60, how=how)
        assert stopped.returncode == 75, stopped.output[-3000:]  # EX_TEMPFAIL: stopped, resume me
        assert "checkpoint written at step" in stopped.output and not (run / "summary.json").exists()
        step, _ = _final_model(run)
        assert 60 <= step < 200
        resumed = subprocess.run(mpirun_command(2, HPCDISTILL, "train"), env=env, capture_output=True, text=True,
                                 timeout=300, cwd=ROOT)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        assert "resuming from" in resumed.stdout and f"(step {step})" in resumed.stdout
        ref_step, ref = _final_model(reference)
        got_step, got = _final_model(run)
        assert got_step == ref_step == 200
        assert ref.keys() == got.keys() and all(np.array_equal(ref[k], got[k]) for k in ref)
        assert summary(run)["groups"][0]["test_accuracy"] == summary(reference)["groups"][0]["test_accuracy"]


def test_corrupt_newest_checkpoint_is_skipped_on_resume(tmp_path, data_dir):
    run = tmp_path / "run"
    train(2, run, data_dir=data_dir, steps=60, checkpoint_every=20)
    ckdir = run / "checkpoints"
    newest = ckdir / "step-00000060.h5"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # truncated, as by a crash mid-copy
    (run / "summary.json").unlink()
    proc = train(2, run, data_dir=data_dir, steps=60, checkpoint_every=20, resume="auto")
    assert "step-00000060.h5" in proc.stdout and "truncated" in proc.stdout  # the warning names file and reason
    assert "resuming from" in proc.stdout and "(step 40)" in proc.stdout
    assert summary(run)["groups"][0]["steps"] == 60
    _, meta = read_h5(ckdir / "step-00000060.h5")
    assert meta["step"] == 60


def test_missing_dataset_fails_with_a_clear_message(tmp_path):
    proc = train(2, tmp_path / "run", check=False, data_dir=tmp_path / "nothing", steps=5)
    assert proc.returncode != 0
    assert "hpcdistill data prepare digits" in proc.stderr


def test_divergence_stops_the_job_and_keeps_the_good_checkpoints(tmp_path, data_dir):
    """20 good steps, then the run is resumed with a learning rate far too high: the weights overflow
    at once. The job must stop at the next check with exit status 3 and a message that says what to
    do, write no summary and no checkpoint holding NaN/inf, and keep the good checkpoints."""
    run = tmp_path / "run"
    common = dict(data_dir=data_dir, checkpoint_every=5, log_every=5, keep_checkpoints=100)
    train(2, run, steps=20, **common)
    (run / "summary.json").unlink()
    proc = train(2, run, check=False, resume="auto", steps=100, lr=1e6, **common)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 3, out[-3000:]
    assert "training diverged at step 25" in out and "Lower HPCDISTILL_LR" in out
    assert "diverged: group 0 at step 25" in out
    assert not (run / "summary.json").exists()
    files = sorted((run / "checkpoints").glob("step-*.h5"))
    assert [int(f.stem.split("-")[1]) for f in files] == [5, 10, 15, 20]
    for f in files:
        arrays, _ = read_h5(f)
        assert all(np.isfinite(a).all() for k, a in arrays.items() if k.startswith("model/"))


def test_damaged_dataset_is_refused_before_training(tmp_path):
    """One rank re-hashes the files, every rank stops with its message (and the remedy)."""
    from hpcdistill.data import prepare

    prepare("digits", tmp_path / "data")
    flip_stored_byte(tmp_path / "data" / "digits" / "train.h5", "x", at=100)
    proc = train(2, tmp_path / "run", check=False, data_dir=tmp_path / "data", steps=5)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "train.h5 is damaged" in proc.stderr and "hpcdistill data prepare digits" in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
