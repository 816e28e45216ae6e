"""Metrics where users look: every metrics.jsonl row also in metrics.csv (one header, every column) and
in TensorBoard event files under RUN_DIR/tensorboard/group-<g>/, read back with TensorBoard's own reader."""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import pytest

from hpcdistill.metrics import MetricsWriter, csv_path, metrics_path, tensorboard_dir, tensorboard_tag

from conftest import metrics, needs_mpi, train


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    assert all(len(r) == len(header) for r in body), "a row with another number of cells than the header"
    return header, [dict(zip(header, r)) for r in body]


def assert_same_rows(jsonl: Path) -> None:
    """The CSV beside `jsonl` holds its records, in order, value for value; cells of absent keys empty."""
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    header, rows = read_csv(csv_path(jsonl))
    assert header[:3] == ["step", "group", "time"]
    assert set(header) == set().union(*records) and len(header) == len(set(header))
    assert len(rows) == len(records)
    for rec, row in zip(records, rows):
        for col in header:
            if col not in rec or rec[col] is None:
                assert row[col] == "", (col, rec, row)
            elif isinstance(rec[col], str):
                assert row[col] == rec[col]
            else:
                assert json.loads(row[col]) == rec[col] or (math.isnan(rec[col]) and row[col] == "NaN"), (col, rec, row)


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag in the event files of `log_dir`: [(step, value)], with TensorBoard's reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@needs_mpi
def test_a_run_writes_csv_and_tensorboard_events(tmp_path, data_dir):
    """mpirun -np 2, digits, 20 steps: the CSV has the rows of metrics.jsonl, TensorBoard the logged steps."""
    run = tmp_path / "run"
    train(2, run, data_dir=data_dir, steps=20, log_every=5, eval_every=10, timeout=240)
    records = metrics(run)
    assert_same_rows(run / "metrics.jsonl")
    train_steps = [r["step"] for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"], r["val_accuracy"]) for r in records if "val_loss" in r]
    assert train_steps == [5, 10, 15, 20] and [v[0] for v in val] == [10]

    events = list((run / "tensorboard").iterdir())
    assert [p.name for p in events] == ["group-0"]  # one writer: the group's speaker
    tb = scalars(run / "tensorboard" / "group-0")
    assert {"train/loss", "train/lr", "val/loss", "val/accuracy"} <= set(tb), sorted(tb)
    assert [s for s, _ in tb["train/loss"]] == train_steps
    assert [v for _, v in tb["train/loss"]] == pytest.approx([r["loss"] for r in records if "loss" in r], rel=1e-6)
    assert tb["val/accuracy"] == [(10, pytest.approx(val[0][2], rel=1e-6))]
    assert [s for s, _ in tb["train/lr"]] == train_steps


@needs_mpi
def test_switches_off_and_the_runs_settings_env_replays_it(tmp_path, data_dir):
    """HPCDISTILL_CSV/TENSORBOARD=false write neither; RUN_DIR/settings.env, sourced with `set -a` in a
    clean environment, gives a run whose config.json records the very same settings."""
    import shlex
    import subprocess

    from hpcdistill.launch import HPCDISTILL, job_env, mpirun_command

    from conftest import ROOT

    run = tmp_path / "run"
    train(2, run, data_dir=data_dir, steps=20, csv="false", tensorboard="false", model_args='{"hidden": [16]}',
          temperature=2.5, timeout=240)
    assert (run / "metrics.jsonl").exists() and not (run / "metrics.csv").exists()
    assert not (run / "tensorboard").exists()
    text = (run / "settings.env").read_text()
    assert "HPCDISTILL_CSV=false" in text and "# HPCDISTILL_LR=0.05  # (computed)" in text
    replay = tmp_path / "replay"
    script = f"set -a; . {run / 'settings.env'}; set +a; export HPCDISTILL_RUN_DIR={replay}; " \
             + shlex.join(mpirun_command(2, HPCDISTILL, "train"))
    proc = subprocess.run(["bash", "-c", script], env=job_env(), capture_output=True, text=True, timeout=240,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, second = (json.loads((d / "config.json").read_text())["settings"] for d in (run, replay))
    assert {k: v for k, v in first.items() if k != "run_dir"} == {k: v for k, v in second.items() if k != "run_dir"}


def test_columns_that_appear_later_keep_one_valid_header(tmp_path):
    """val_* only at evaluation steps, a distillation term after the burn-in: the header grows, the
    file stays one valid CSV, and rows without a column have an empty cell."""
    path = metrics_path(tmp_path, 1, 2)
    w = MetricsWriter(path, group=1, t0=time.time())
    w.write(10, loss=2.0, lr=0.1)
    w.write(20, loss=1.5, lr=0.1)
    w.write(20, val_loss=1.4, val_accuracy=0.5)
    w.write(30, loss=1.2, lr=0.05, kd=0.3, note="text, with a comma", extra=None)
    w.write(40, loss=float("nan"), lr=0.01, kd=0.2)
    w.close()
    assert path.name == "metrics-g1.jsonl" and csv_path(path).name == "metrics-g1.csv"
    assert_same_rows(path)
    header, rows = read_csv(csv_path(path))
    assert header == ["step", "group", "time", "loss", "lr", "val_loss", "val_accuracy", "kd", "note", "extra"]
    assert rows[0]["val_loss"] == "" and rows[2]["loss"] == "" and rows[3]["note"] == "text, with a comma"
    tb = scalars(tensorboard_dir(tmp_path, 1))
    assert tb["train/loss"][:3] == [(10, 2.0), (20, 1.5), (30, pytest.approx(1.2))]
    assert tb["val/loss"] == [(20, pytest.approx(1.4))] and "train/note" not in tb and "train/extra" not in tb


def test_resume_keeps_the_csv_equal_to_the_jsonl_and_tensorboard_drops_redone_steps(tmp_path):
    """A second process (a resumed job) appends to metrics.jsonl: the CSV is rebuilt from it, also
    when it was deleted or switched off before; TensorBoard keeps one value per step (the new one)."""
    path = metrics_path(tmp_path, 0, 1)
    first = MetricsWriter(path, group=0, t0=time.time(), csv=False)
    for step in (10, 20, 30):
        first.write(step, loss=1.0 / step)
    first.close()  # stopped after step 30, checkpoint at 20: steps 21-30 are redone
    assert not csv_path(path).exists()
    second = MetricsWriter(path, group=0, t0=time.time())
    assert_same_rows(path)  # rebuilt at once, with the first process's rows
    second.write(30, loss=0.5)
    second.write(40, loss=0.25)
    second.close()
    assert_same_rows(path)
    assert len(read_csv(csv_path(path))[1]) == 5
    tb = scalars(tensorboard_dir(tmp_path, 0))
    assert tb["train/loss"] == [(10, pytest.approx(0.1)), (20, pytest.approx(0.05)), (30, 0.5), (40, 0.25)]


def test_switches_and_non_speakers(tmp_path):
    path = metrics_path(tmp_path, 0, 1)
    MetricsWriter(path, group=0, t0=time.time(), enabled=False).write(1, loss=1.0)
    assert list(tmp_path.iterdir()) == []  # only the group's speaker writes
    w = MetricsWriter(path, group=0, t0=time.time(), csv=False, tensorboard=False)
    w.write(1, loss=1.0)
    w.close()
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]
    w = MetricsWriter(path, group=0, t0=time.time())  # the old positional call of the loop still works
    w.write(2, loss=0.5)
    w.close()
    w.close()  # idempotent
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv", "metrics.jsonl", "tensorboard"]


def test_tensorboard_tags():
    assert [tensorboard_tag(k) for k in ("loss", "lr", "val_loss", "val_accuracy", "test_accuracy", "staleness")] \
        == ["train/loss", "train/lr", "val/loss", "val/accuracy", "test/accuracy", "train/staleness"]
