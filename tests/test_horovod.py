"""Horovod as hpcdistill sets it up: the latency patch is in the build, tuned defaults apply only where
the user set no HOROVOD_* variable, and `hpcdistill config` and the job's banner say where each value
came from."""

from __future__ import annotations

import subprocess

import pytest

from hpcdistill.comm import horovod_env
from hpcdistill.launch import HPCDISTILL, job_env


def test_the_installed_horovod_carries_the_latency_patch():
    """scripts/setup.sh builds Horovod with scripts/horovod-latency.patch (the mark is a string of it)."""
    assert horovod_env.latency_patched() is True


@pytest.mark.parametrize("patched", [True, False])
def test_defaults_apply_only_where_the_user_set_nothing(monkeypatch, patched):
    monkeypatch.setattr(horovod_env, "latency_patched", lambda: patched)
    env = {"HOROVOD_CACHE_CAPACITY": "4096"}
    set_here = horovod_env.apply_defaults(env)
    rows = {r["variable"]: (r["value"], r["source"]) for r in horovod_env.effective(env)}
    assert rows["HOROVOD_CACHE_CAPACITY"] == ("4096", "environment")
    assert rows["HOROVOD_FUSION_THRESHOLD"] == ("134217728", "horovod default")
    if patched:  # the loop wakes on enqueue: the cycle only paces idle cycles, Horovod's 1 ms stays
        assert set_here == {} and rows["HOROVOD_CYCLE_TIME"] == ("1", "horovod default")
        assert rows["HOROVOD_WAKE_ON_ENQUEUE"] == ("1", "horovod default")
    else:  # a stock build: the 1 ms floor per collective, cut to 0.1 ms
        assert set_here == {"HOROVOD_CYCLE_TIME": "0.1"} and env["HOROVOD_CYCLE_TIME"] == "0.1"
        assert rows["HOROVOD_CYCLE_TIME"] == ("0.1", "hpcdistill") and "HOROVOD_WAKE_ON_ENQUEUE" not in rows
    user = {"HOROVOD_CYCLE_TIME": "5"}
    assert horovod_env.apply_defaults(user) == {} and user == {"HOROVOD_CYCLE_TIME": "5"}


def test_config_lists_the_effective_horovod_knobs():
    proc = subprocess.run([HPCDISTILL, "config"], env=job_env(HOROVOD_CYCLE_TIME="5"), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    tail = proc.stdout.split("Horovod (with scripts/horovod-latency.patch)", 1)[1]
    lines = {line.split()[0]: line.split()[1:3] for line in tail.splitlines()[1:] if line.strip()}
    assert lines["HOROVOD_CYCLE_TIME"] == ["5", "environment"]
    assert lines["HOROVOD_CACHE_CAPACITY"] == ["1024", "horovod"]


@pytest.mark.mpi
def test_a_job_runs_with_the_user_value_and_says_so(tmp_path, data_dir):
    from conftest import run_mpi

    for cycle, expect in ((None, "HOROVOD_CYCLE_TIME=1 (horovod default)"),
                          ("5", "HOROVOD_CYCLE_TIME=5 (environment)")):
        proc = run_mpi(2, [HPCDISTILL, "train"], check=True, HPCDISTILL_RUN_DIR=tmp_path / f"run-{cycle}",
                       HPCDISTILL_DATA_DIR=data_dir, HPCDISTILL_STEPS=20, HOROVOD_CYCLE_TIME=cycle)
        out = proc.stdout + proc.stderr
        assert "Horovod (with the latency patch): " + expect in out, out[-3000:]


@pytest.mark.mpi
@pytest.mark.parametrize("np_, wake", [(2, None), (4, None), (2, "0")])
def test_collectives_on_the_patched_build(np_, wake):
    """The patched loop and wait (and the stock loop, HOROVOD_WAKE_ON_ENQUEUE=0) give every collective's
    right result on every rank, 4 ranks on 2 cores included; a deadlock would hit the timeout."""
    import sys

    from conftest import ROOT, run_mpi

    proc = run_mpi(np_, [sys.executable, str(ROOT / "tests" / "mpi" / "horovod_ops.py")], timeout=240,
                   HOROVOD_WAKE_ON_ENQUEUE=wake)
    assert proc.returncode == 0 and f"horovod ops OK {np_}" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
