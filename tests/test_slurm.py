"""The sbatch templates in slurm/ on a real single-node Slurm (scripts/slurm-local.sh installs and
starts it; root only): every mode runs to completion, a job array sweeps a setting, a time-limit
warning (USR2 to the batch shell, as `--signal=B:USR2@...` sends it) checkpoints, requeues and resumes
to the same weights as an uninterrupted run, the restart limit holds, and bad settings fail fast.

Every job is submitted at once at the start (the local partition lets up to 4 jobs share a CPU), so
the file costs about as long as its slowest chain: signal -> requeue -> restart -> finish.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "slurm"
LOCAL = ROOT / "scripts" / "slurm-local.sh"
VENV = Path(sys.executable).parent.parent
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}
JOB_TIMEOUT = 540  # seconds any one job may take, queueing and requeueing included

pytestmark = [pytest.mark.mpi, pytest.mark.skipif(
    os.geteuid() != 0 or (shutil.which("apt-get") is None and shutil.which("slurmctld") is None),
    reason="a local Slurm needs root (and apt-get to install it)")]

# The settings of the signalled run, its reference runs and the restart-limit run. HOROVOD_CYCLE_TIME
# (ms between Horovod's background cycles; HOROVOD_WAKE_ON_ENQUEUE=0: the stock loop, which waits for
# the next cycle, not the latency patch's) stretches every step to >= 50 ms without using CPU, so the
# signal lands midway even on a fast machine; every gradient is then fused into one allreduce, the same
# in every run, and the reference runs have exactly the same settings.
SLOW = dict(HPCDISTILL_STEPS="150", HPCDISTILL_LOG_EVERY="10", HPCDISTILL_CHECKPOINT_EVERY="1000",
            HPCDISTILL_EVAL_EVERY="1000", HOROVOD_CYCLE_TIME="50", HOROVOD_WAKE_ON_ENQUEUE="0")
SIGNAL_AFTER_STEP = 10


# --- Slurm ---------------------------------------------------------------------------------------------
def _local(action: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LOCAL), action], capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="session")
def slurm():
    """A running single-node Slurm; stopped at the end if this session started it."""
    was_running = "slurmctld: running" in _local("status").stdout
    started = _local("start")
    if started.returncode != 0:
        pytest.fail(f"scripts/slurm-local.sh start failed:\n{started.stdout}\n{started.stderr}")
    yield
    if not was_running:
        stopped = _local("stop")
        assert stopped.returncode == 0, stopped.stderr


def job_records(job_id: str) -> list[dict]:
    """`scontrol show job -o` as dicts (one per array task); [] once Slurm has forgotten the job."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if line.strip()]


def wait_job(job_id: str, timeout: float = JOB_TIMEOUT) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = job_records(job_id)
        if records and all(r.get("JobState") in TERMINAL for r in records):
            return records
        time.sleep(1)
    subprocess.run(["scancel", job_id])
    raise AssertionError(f"job {job_id} did not finish in {timeout} s: {job_records(job_id)}")


class Workspace:
    """A submit directory (runs/ and the job output files land in it) with digits prepared."""

    def __init__(self, path: Path):
        self.path = path
        self.data_dir = path / "datasets"
        self.jobs: dict[str, str] = {}
        self.signals: dict[str, dict] = {}

    def env(self, **settings) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HPCDISTILL_", "HPCD_", "SLURM_"))}
        env.update(HPCD_VENV=str(VENV), HPCDISTILL_DATA_DIR=str(self.data_dir), OMP_NUM_THREADS="1")
        env.update({k: str(v) for k, v in settings.items()})
        return env

    def submit(self, name: str, template: str, *sbatch_args: str, export: str = "ALL", **settings) -> str:
        """sbatch --export=<export> slurm/<template> with the settings in the environment."""
        cmd = ["sbatch", "--parsable", "--overcommit", f"--export={export}", *sbatch_args, str(SLURM / template)]
        proc = subprocess.run(cmd, env=self.env(**settings), cwd=self.path, capture_output=True, text=True)
        assert proc.returncode == 0, f"{cmd}: {proc.stderr}"
        self.jobs[name] = job_id = proc.stdout.strip().split(";")[0]
        return job_id

    def run_dir(self, prefix: str, job_id: str) -> Path:
        return self.path / "runs" / f"{prefix}-{job_id}"

    def output(self, prefix: str, job_id: str) -> str:
        return (self.path / f"{prefix}-{job_id}.out").read_text()

    def signal_midway(self, name: str, prefix: str, batch: bool = True, task: int | None = None) -> None:
        """In the background: once the job has logged SIGNAL_AFTER_STEP, send USR2 to its batch shell
        (what `--signal=B:USR2@<secs>` does before the time limit), or with batch=False to its tasks
        (what `--signal=USR2@<secs>` does). `task`: that array task of codistill-array.sbatch."""
        job_id, record = self.jobs[name], {}
        self.signals[name] = record
        metrics = self.run_dir(prefix, job_id) / "metrics.jsonl"
        if task is not None:
            metrics = self.run_dir(prefix, job_id) / f"job-{task}" / f"metrics-g{task}.jsonl"
            job_id = f"{job_id}_{task}"

        def watch():
            deadline = time.monotonic() + JOB_TIMEOUT
            while time.monotonic() < deadline:
                try:
                    steps = [json.loads(line).get("step", 0) for line in metrics.read_text().splitlines()]
                except (FileNotFoundError, json.JSONDecodeError):
                    steps = []
                if steps and max(steps) >= SIGNAL_AFTER_STEP:
                    record["step_seen"] = max(steps)
                    record["scancel"] = subprocess.run(
                        ["scancel", "--signal=USR2", *(["--batch"] if batch else []), job_id],
                        capture_output=True, text=True)
                    return
                time.sleep(0.2)

        record["thread"] = threading.Thread(target=watch, daemon=True)
        record["thread"].start()


def _final_model(run_dir: Path) -> tuple[int, dict]:
    """(step, model arrays) of a one-group run's newest checkpoint."""
    from hpcdistill.checkpoints import numbered_files, read_h5

    ckpt = run_dir / "checkpoints"
    files = numbered_files(ckpt)
    assert files, f"no checkpoint in {ckpt}"
    step, path = files[0]
    arrays, meta = read_h5(path)
    return int(meta["step"]), {k: v for k, v in arrays.items() if k.startswith("model/")}


def _summary(run_dir: Path) -> dict:
    path = run_dir / "summary.json"
    assert path.exists(), f"no summary.json in {run_dir}"
    return json.loads(path.read_text())


def _assert_completed(ws: Workspace, prefix: str, name: str) -> tuple[dict, dict, str]:
    job_id = ws.jobs[name]
    (record,) = wait_job(job_id)
    out = ws.output(prefix, job_id)
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", f"{record}\n{out[-4000:]}"
    summary = _summary(ws.run_dir(prefix, job_id))
    return record, summary, out


def _assert_group_results(summary: dict, groups: int, world: int, steps: int) -> None:
    assert summary["world_size"] == world and summary["num_groups"] == groups and summary["steps"] == steps
    assert len(summary["groups"]) == groups
    for g in summary["groups"]:
        assert 0.0 <= g["test_accuracy"] <= 1.0 and np.isfinite(g["test_loss"]) and np.isfinite(g["val_loss"])


# --- every job, submitted at once ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ws(slurm, tmp_path_factory) -> Workspace:
    from hpcdistill.data import prepare

    ws = Workspace(tmp_path_factory.mktemp("slurm"))
    prepare("digits", ws.data_dir)
    # Bad settings first (they end in seconds), then the jobs whose tasks must overlap, then the longest chain.
    ws.submit("bad_value", "sync.sbatch", "--ntasks=4", "--job-name=hpcd-bad", HPCDISTILL_STEPS="abc")
    ws.submit("bad_world", "codistill.sbatch", "--ntasks=4", "--job-name=hpcd-badworld", HPCDISTILL_GROUPS=3)
    # Codistillation across jobs, submitted before the long jobs so that both array tasks start together
    # (queued behind them, task 1 once waited until task 0 had finished, and task 0 never saw a teacher:
    # CI, stop 20): array task i trains group i; task 1 is sent the time-limit warning, checkpoints, is
    # requeued and rejoins while task 0 trains on (400 steps of >= 50 ms: longer than a requeue takes
    # here; teachers of any age are used, so each task has the other's whenever they overlap).
    ws.submit("coarray", "codistill-array.sbatch", "--ntasks=2", "--array=0-1", **{
        **SLOW, "HPCDISTILL_STEPS": 400, "HPCDISTILL_EXCHANGE_EVERY": 10, "HPCDISTILL_BURN_IN": 10,
        "HPCDISTILL_CHECKPOINT_EVERY": 10, "HPCDISTILL_MAX_STALENESS": 1000})
    ws.signal_midway("coarray", "hpcd-coarray", task=1)
    ws.submit("requeued", "sync.sbatch", "--ntasks=4", **SLOW)
    ws.signal_midway("requeued", "hpcd-sync")
    ws.submit("limit", "sync.sbatch", "--ntasks=2", "--job-name=hpcd-limit", HPCD_MAX_RESTARTS=0, **SLOW)
    ws.signal_midway("limit", "hpcd-limit", batch=False)
    ws.submit("codistill", "codistill.sbatch", "--ntasks=4", HPCDISTILL_STEPS=40, HPCDISTILL_EXCHANGE_EVERY=10,
              HPCDISTILL_BURN_IN=10, HPCDISTILL_EVAL_EVERY=20)
    ws.submit("distill", "distill.sbatch", "--ntasks=2", f"--dependency=afterok:{ws.jobs['codistill']}",
              "--kill-on-invalid-dep=yes", HPCDISTILL_STEPS=30,
              HPCDISTILL_TEACHERS=str(ws.run_dir("hpcd-codistill", ws.jobs["codistill"])))
    ws.submit("reference", "sync.sbatch", "--ntasks=4", **SLOW)
    ws.submit("reference2", "sync.sbatch", "--ntasks=4", **SLOW)
    # A real time limit (--time=3, warning 100 s before): >= 0.5 s per step, so the run outlasts
    # the first warning and is requeued several times (about 7 minutes, alongside the other jobs).
    ws.submit("timelimit", "sync.sbatch", "--ntasks=4", "--time=3", "--signal=B:USR2@100",
              "--job-name=hpcd-timelimit", HPCD_MAX_RESTARTS=10, **{**SLOW, "HOROVOD_CYCLE_TIME": "500"})
    ws.submit("async", "async.sbatch", "--ntasks=4", HPCDISTILL_STEPS=30)
    # A list setting on the sbatch line: Slurm cuts --export at commas, `0:1` must arrive whole.
    ws.submit("async_hosts", "async.sbatch", "--ntasks=3", "--job-name=hpcd-async2",
              export="ALL,HPCDISTILL_PARAM_HOSTS=0:1", HPCDISTILL_STEPS=20, HPCDISTILL_LOG_EVERY=5)
    ws.submit("sweep", "sweep.sbatch", "--ntasks=2", "--array=0-1", HPCDISTILL_MODE="sync", HPCDISTILL_STEPS=20,
              HPCD_SWEEP_VAR="HPCDISTILL_LR", HPCD_SWEEP_VALUES="0.02 0.1")
    return ws


# --- the tests -------------------------------------------------------------------------------------------
def test_bad_setting_fails_fast_with_the_reason_in_the_output_file(ws):
    for name, prefix, expect in (("bad_value", "hpcd-bad", ["HPCDISTILL_STEPS", "abc"]),
                                 ("bad_world", "hpcd-badworld", ["HPCDISTILL_GROUPS=3", "world size 4"])):
        job_id = ws.jobs[name]
        (record,) = wait_job(job_id)
        out = ws.output(prefix, job_id)
        assert record["JobState"] == "FAILED" and record["ExitCode"] == "2:0", f"{record}\n{out}"
        assert all(e in out for e in expect), out
        assert "invalid settings" in out and "srun --mpi" not in out, out  # nothing was launched
        assert record["Restarts"] == "0"
        assert not ws.run_dir(prefix, job_id).exists()  # nothing was created either


def test_sync_job_completes_and_runs_are_deterministic(ws):
    _, summary, out = _assert_completed(ws, "hpcd-sync", "reference")
    _assert_group_results(summary, groups=1, world=4, steps=150)
    assert summary["mode"] == "sync" and "srun --mpi=pmix" in out
    _assert_completed(ws, "hpcd-sync", "reference2")
    step1, model1 = _final_model(ws.run_dir("hpcd-sync", ws.jobs["reference"]))
    step2, model2 = _final_model(ws.run_dir("hpcd-sync", ws.jobs["reference2"]))
    assert step1 == step2 == 150
    assert model1.keys() == model2.keys() and all(np.array_equal(model1[k], model2[k]) for k in model1)


def test_time_limit_signal_checkpoints_requeues_and_resumes_to_the_same_weights(ws):
    record, summary, out = _assert_completed(ws, "hpcd-sync", "requeued")
    sig = ws.signals["requeued"]
    sig["thread"].join(timeout=5)
    assert sig.get("scancel") is not None and sig["scancel"].returncode == 0, sig
    # Signalled once, requeued once, and the second start resumed from the checkpoint of the first.
    assert record["Restarts"] == "1", record
    assert "SIGUSR2 received: forwarding it to the job step" in out
    stopped = re.search(r"checkpoint written at step (\d+)", out)
    assert stopped, out[-4000:]
    step = int(stopped.group(1))
    assert SIGNAL_AFTER_STEP <= step < 150
    assert "requeueing job" in out and "restart 1," in out
    assert f"(step {step})" in out and "resuming from" in out
    # ... to exactly the weights of the uninterrupted run with the same settings.
    ref_step, ref = _final_model(ws.run_dir("hpcd-sync", ws.jobs["reference"]))
    got_step, got = _final_model(ws.run_dir("hpcd-sync", ws.jobs["requeued"]))
    assert got_step == ref_step == summary["steps"] == 150
    assert ref.keys() == got.keys() and all(np.array_equal(ref[k], got[k]) for k in ref)
    reference = _summary(ws.run_dir("hpcd-sync", ws.jobs["reference"]))
    assert summary["groups"][0]["test_accuracy"] == reference["groups"][0]["test_accuracy"]


def test_signal_to_the_tasks_and_the_restart_limit(ws):
    """USR2 straight to the tasks (--signal without B:): the batch shell infers it from srun's exit 75
    (stopped, resume me) and would requeue, but HPCD_MAX_RESTARTS=0 stops it."""
    job_id = ws.jobs["limit"]
    (record,) = wait_job(job_id)
    out = ws.output("hpcd-limit", job_id)
    assert ws.signals["limit"].get("scancel") is not None, out[-3000:]
    assert record["JobState"] == "FAILED" and record["Restarts"] == "0", f"{record}\n{out[-3000:]}"
    assert "SIGUSR2 received: checkpoint written" in out and "signal sent to them directly" in out
    assert "not requeueing" in out and "HPCD_MAX_RESTARTS=0" in out
    run = ws.run_dir("hpcd-limit", job_id)
    assert not (run / "summary.json").exists()
    step, _ = _final_model(run)  # the checkpoint to continue from is there
    assert SIGNAL_AFTER_STEP <= step < 150


def test_codistill_job(ws):
    _, summary, _ = _assert_completed(ws, "hpcd-codistill", "codistill")
    _assert_group_results(summary, groups=2, world=4, steps=40)
    assert summary["mode"] == "codistill"
    co = summary["codistill"]
    assert co["exchanges_published"] > 0 and co["teachers_loaded"] > 0
    assert 0.0 <= co["ensemble_test_accuracy"] <= 1.0 and 0.0 <= co["churn"] <= 1.0


def test_distill_job_from_the_codistill_run(ws):
    _, summary, _ = _assert_completed(ws, "hpcd-distill", "distill")
    _assert_group_results(summary, groups=1, world=2, steps=30)
    assert summary["mode"] == "distill" and summary["model"] == "mlp-small"
    d = summary["distill"]
    assert len(d["teachers"]) == 2 and d["student_parameters"] < d["teacher_parameters"]
    assert d["temperature"] == 4.0


def test_async_job(ws):
    _, summary, out = _assert_completed(ws, "hpcd-async", "async")
    assert summary["mode"] == "async" and summary["world_size"] == 4, out[-3000:]
    a = summary["async"]
    assert a["workers"] == 3 and a["updates"] > 0, a


def test_async_job_with_two_hosts_from_the_export_line(ws):
    """`sbatch --export=ALL,HPCDISTILL_PARAM_HOSTS=0:1` (3 tasks): two parameter hosts and one worker
    (with `0,1` Slurm would have passed `0`: one host, two workers)."""
    _, summary, out = _assert_completed(ws, "hpcd-async2", "async_hosts")
    run = ws.run_dir("hpcd-async2", ws.jobs["async_hosts"])
    assert json.loads((run / "config.json").read_text())["settings"]["param_hosts"] == "0:1"
    assert summary["mode"] == "async" and summary["world_size"] == 3, out[-3000:]
    a = summary["async"]
    a = a["groups"][0] if isinstance(a.get("groups"), list) else a
    assert a["hosts"] == [0, 1] and a["workers"] == 1 and a["updates"] > 0, a


def test_sweep_job_array_one_run_dir_per_task(ws):
    job_id = ws.jobs["sweep"]
    records = wait_job(job_id)
    assert len(records) == 2 and all(r["JobState"] == "COMPLETED" for r in records), records
    sweep_dir = ws.path / "runs" / f"hpcd-sweep-{job_id}"
    for task, lr in enumerate(("0.02", "0.1")):
        run = sweep_dir / f"{task}-{lr}"
        summary = _summary(run)
        _assert_group_results(summary, groups=1, world=2, steps=20)
        config = json.loads((run / "config.json").read_text())
        assert config["settings"]["lr"] == float(lr) and config["settings"]["mode"] == "sync"
        assert (ws.path / f"hpcd-sweep-{job_id}_{task}.out").exists()


def test_codistillation_across_array_tasks_survives_a_requeue(ws):
    job_id = ws.jobs["coarray"]
    records = sorted(wait_job(job_id), key=lambda r: int(r["ArrayTaskId"]))
    base = ws.path / "runs" / f"hpcd-coarray-{job_id}"
    outs = [(ws.path / f"hpcd-coarray-{job_id}_{t}.out").read_text() for t in (0, 1)]
    assert len(records) == 2 and all(r["JobState"] == "COMPLETED" for r in records), f"{records}\n{outs[1][-3000:]}"
    # only task 1 was requeued (`scontrol requeue <array id>` would requeue the finished task 0 too)
    assert [r["Restarts"] for r in records] == ["0", "1"], records
    assert "requeueing job" in outs[1] and "resuming from" in outs[1] and "resuming from" not in outs[0]
    assert "trains group(s) 1..1 of 2" in outs[1]
    for task in (0, 1):
        summary = _summary(base / f"job-{task}")
        assert summary["num_groups"] == 2 and [g["group"] for g in summary["groups"]] == [task]
        codistill = summary["codistill"]
        assert codistill["exchange_id"] == f"hpcd-coarray-{job_id}" and codistill["teachers_rejected"] == 0
        assert codistill["groups"][0]["last_loaded"].get(str(1 - task), 0) > 0, codistill  # the other's teacher
    status = subprocess.run(["hpcdistill", "status", str(base / "exchange")], capture_output=True, text=True,
                            env=ws.env(PATH=f"{VENV}/bin:{os.environ['PATH']}"))
    assert status.returncode == 0 and "2 of 2 group(s) finished" in status.stdout, status.stdout + status.stderr


def test_real_time_limit_requeues_until_done_with_the_same_weights(ws):
    job_id = ws.jobs["timelimit"]
    (record,) = wait_job(job_id, timeout=900)
    out = ws.output("hpcd-timelimit", job_id)
    assert record["JobState"] == "COMPLETED" and int(record["Restarts"]) >= 1, f"{record}\n{out[-4000:]}"
    assert "SIGUSR2 received" in out and "resuming from" in out
    ref_step, ref = _final_model(ws.run_dir("hpcd-sync", ws.jobs["reference"]))
    got_step, got = _final_model(ws.run_dir("hpcd-timelimit", job_id))
    assert got_step == ref_step == 150
    assert all(np.array_equal(ref[k], got[k]) for k in ref)
