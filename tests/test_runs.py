"""Run identity and claims: one job per RUN_DIR, one codistillation per exchange directory, a rerun
that never uses the previous run's files, and a stop signal that cuts a stale-teacher wait short."""

from __future__ import annotations

import json
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

CLAIM = ".hpcdistill-claim.json"


def start(run: Path, np_: int = 2, **settings) -> subprocess.Popen:
    env = job_env(**{"run_dir": run, **settings})
    return subprocess.Popen(mpirun_command(np_, HPCDISTILL, "train"), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT)


def wait_for(path: Path, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.2)


def test_a_second_job_on_a_live_run_dir_exits_2_naming_the_holder(tmp_path, data_dir):
    run = tmp_path / "run"
    first = start(run, data_dir=data_dir, steps=200, straggler_rank=1, straggler_delay=10, resume="never")
    try:
        wait_for(run / CLAIM, first)
        holder = json.loads((run / CLAIM).read_text())
        t = time.monotonic()
        second = train(2, run, check=False, data_dir=data_dir, steps=20, resume="auto")
        assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
        assert time.monotonic() - t < 60
        assert f"is in use by run {holder['run_id']!r}" in second.stderr and f"pid {holder['pid']}" in second.stderr
        assert "use another HPCDISTILL_RUN_DIR" in second.stderr
    finally:
        out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out[-3000:]
    assert summary(run)["steps"] == 200 and not (run / CLAIM).exists()  # released at the end


def test_a_dead_holders_claim_is_taken_over_with_a_warning(tmp_path, data_dir):
    run = tmp_path / "run"
    run.mkdir()
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that no longer exists, on this host
    (run / CLAIM).write_text(json.dumps({"run_id": "old", "job": None, "host": os.uname().nodename, "pid": gone.pid}))
    proc = train(2, run, data_dir=data_dir, steps=20)
    assert "took over the stale claim of run 'old'" in proc.stdout and f"process {gone.pid} on this host is gone" \
        in proc.stdout


def test_a_rerun_in_the_same_run_dir_never_uses_the_previous_runs_teachers(tmp_path, data_dir):
    """RESUME=never starts a new run (a new run id): the previous run's exchange files, final ones
    included, are refused as another run's, and counted."""
    run = tmp_path / "run"
    common = dict(mode="codistill", groups=2, data_dir=data_dir, exchange_every=10, burn_in=10, log_every=10)
    train(2, run, steps=40, **common)
    first_id = json.loads((run / "config.json").read_text())["run_id"]
    assert sorted(p.name for p in (run / "exchange" / "group-1").glob("*.h5"))[-1] == "step-00000040.h5"
    # group 1 lags far behind, so group 0 looks into group-1/ while it still holds only the old run's files
    train(2, run, steps=40, straggler_rank=1, straggler_delay=30, **common)
    second_id = json.loads((run / "config.json").read_text())["run_id"]
    c = summary(run)["codistill"]
    assert second_id != first_id and c["exchange_id"] == second_id
    assert c["groups"][0]["teachers_rejected_by_reason"].get("another-run", 0) >= 1, c


def test_a_second_codistillation_cannot_use_a_busy_exchange_dir(tmp_path, data_dir):
    exchange = tmp_path / "shared-exchange"
    common = dict(mode="codistill", groups=2, data_dir=data_dir, exchange_dir=exchange)
    first = start(tmp_path / "a", steps=200, straggler_rank=1, straggler_delay=10, **common)
    try:
        wait_for(exchange / ".exchange-claim.json", first)
        exchange_id = json.loads((exchange / ".exchange-claim.json").read_text())["exchange_id"]
        second = train(2, tmp_path / "b", check=False, steps=20, **common)
        assert second.returncode == 2, second.stderr[-2000:]
        assert "exchange directory" in second.stderr and f"HPCDISTILL_EXCHANGE_ID={exchange_id}" in second.stderr
    finally:
        out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out[-3000:]


def test_a_stop_signal_cuts_a_stale_teacher_wait_short(tmp_path, data_dir):
    """Group 1 is 200x slower; group 0 waits for its fresh teacher (STALE_WAIT=600 s). USR2 to mpirun,
    as Slurm sends before the time limit: both groups checkpoint within seconds, not 600 s later."""
    run = tmp_path / "run"
    proc = start(run, mode="codistill", groups=2, data_dir=data_dir, steps=400, exchange_every=10, burn_in=10,
                 max_staleness=20, stale_policy="wait", stale_wait=600, straggler_rank=1, straggler_delay=200,
                 resume="auto")
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "waiting up to 600 s for a teacher from group 1" in line:
            break
    time.sleep(1)
    t = time.monotonic()
    proc.send_signal(signal.SIGUSR2)
    out, _ = proc.communicate(timeout=120)
    elapsed = time.monotonic() - t
    output = "".join(lines) + out
    assert proc.returncode == 75 and elapsed < 30, (elapsed, output[-3000:])
    assert "checkpoint written at step" in output and not (run / "summary.json").exists()
    for g in (0, 1):
        assert list((run / "checkpoints" / f"group-{g}").glob("step-*.h5")), g
    gone = json.loads((run / "exchange" / "group-0" / "gone.json").read_text())
    assert "stopped by SIGUSR2" in gone["reason"] and "resumes later" in gone["reason"]


# Checkpoint and exchange files of ~9 MB (a 1024 x 1024 mlp and its momentum) at every step: a background
# write is nearly always in flight when the signal or the kill comes.
HEAVY = dict(mode="codistill", groups=2, model="mlp", model_args='{"hidden": [1024, 1024]}', steps=3000,
             checkpoint_every=1, exchange_every=1, burn_in=1, log_every=10, eval_every=100000)


def wait_for_step(directory: Path, step: int, proc: subprocess.Popen, seconds: float = 120) -> None:
    """Until `directory` holds a checkpoint of `step` or later (with writes replacing waiting ones, no
    particular step is sure to be written)."""
    from hpcdistill.checkpoints import numbered_files

    deadline = time.monotonic() + seconds
    while not (numbered_files(directory) and numbered_files(directory)[0][0] >= step):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, f"no checkpoint of step {step} or later in {directory}"
        time.sleep(0.1)


def _all_whole(run: Path) -> int:
    """Every step-*.h5 of the run's checkpoints and exchange reads back verified; their count."""
    from hpcdistill.checkpoints import read_h5

    files = sorted(run.glob("checkpoints/group-*/step-*.h5")) + sorted(run.glob("exchange/group-*/step-*.h5"))
    for f in files:
        read_h5(f)  # raises CheckpointError on a partial or damaged file
    return len(files)


def test_a_stop_signal_with_writes_in_flight_leaves_a_valid_stop_checkpoint(tmp_path, data_dir):
    run = tmp_path / "run"
    proc = start(run, data_dir=data_dir, resume="auto", **HEAVY)
    wait_for_step(run / "checkpoints" / "group-1", 20, proc)
    proc.send_signal(signal.SIGUSR2)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out[-3000:]
    stops = {int(line.split("[g", 1)[1].split(" ", 1)[0]): int(line.rsplit("step ", 1)[1].split(";")[0])
             for line in out.splitlines() if "checkpoint written at step" in line}
    assert sorted(stops) == [0, 1], out[-3000:]
    from hpcdistill.checkpoints import numbered_files

    for g in (0, 1):  # each group's stop checkpoint itself is on disk, whole
        newest = numbered_files(run / "checkpoints" / f"group-{g}")[0][0]
        assert newest == stops[g], (g, newest, stops)
    assert _all_whole(run) >= 4


def test_a_crash_during_background_writes_leaves_no_partial_file(tmp_path, data_dir):
    run = tmp_path / "run"
    proc = start(run, data_dir=data_dir, resume="auto", **HEAVY)
    wait_for_step(run / "checkpoints" / "group-0", 30, proc)
    time.sleep(0.37)
    pids = list(rank_pids(proc.pid).values())
    assert len(pids) == 2, pids
    for pid in pids:  # kill -9 every rank: writes die mid-file
        os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=120)
    deadline = time.monotonic() + 60  # a rank inside fsync dies when the disk lets it go
    while any(process_alive(pid) for pid in pids):
        assert time.monotonic() < deadline, "killed ranks still running"
        time.sleep(0.1)
    assert _all_whole(run) >= 4  # only whole files are visible (temporaries are hidden and ignored)
    resumed = train(2, run, resume="auto", data_dir=data_dir, **{**HEAVY, "steps": 60})
    assert "resuming from" in resumed.stdout + resumed.stderr
    assert summary(run)["steps"] == 60
