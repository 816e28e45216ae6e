"""`hpcdistill report`: tables and PNG plots from real run directories (tiny mpirun runs), unfinished
runs, resumed metrics, and the exit code 2 for a directory that is not a run."""

import json
import shutil
import subprocess
import sys

import pytest

from conftest import clean_env, needs_mpi, summary, train
from hpcdistill import report as rp

HPCDISTILL = [sys.executable, "-m", "hpcdistill"]
PNGS = ["train_loss_vs_step.png", "train_loss_vs_time.png", "validation_vs_step.png", "validation_vs_time.png"]


def cli_report(*args):
    return subprocess.run([*HPCDISTILL, "report", *map(str, args)], capture_output=True, text=True, timeout=120,
                          env=clean_env())


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    """Four real runs on digits: sync on 2 ranks, codistill with 2 groups of 1 rank, the
    distillation of the codistilled pair into mlp-small on 1 rank, and mlp-small trained alone."""
    root = tmp_path_factory.mktemp("report")
    common = dict(data_dir=data_dir, steps=30, eval_every=10, log_every=5, timeout=240)
    train(2, root / "sync", mode="sync", **common)
    train(2, root / "codistill", mode="codistill", groups=2, exchange_every=10, burn_in=10, **common)
    train(1, root / "distill", mode="distill", teachers=root / "codistill", model="mlp-small", **common)
    train(1, root / "alone", mode="sync", model="mlp-small", **common)
    return root


def row(text, label):
    """The cells of the table row that starts with `label`, in the first table that has one."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == label:
            return cells
    raise AssertionError(f"no row {label!r} in\n{text}")


def section(text, title):
    return text.split(f"## {title}")[1].split("\n## ")[0]


def assert_png(path, width=None):
    from matplotlib.image import imread

    img = imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4) and img.shape[0] >= 300, img.shape
    if width:
        assert img.shape[1] == width
    assert img[..., :3].std() > 0.05  # not a blank canvas


@needs_mpi
def test_report_of_sync_and_codistill_runs(runs, tmp_path):
    out = tmp_path / "out"
    proc = cli_report(runs / "sync", runs / "codistill", "--out", out)
    assert proc.returncode == 0, proc.stderr
    md = (out / "report.md").read_text()
    assert proc.stdout.split("\nwrote ")[0].strip() in md  # stdout shows the same tables
    for name in PNGS:
        assert_png(out / name, width=800 if name.startswith("train") else 1200)
        assert f"]({name})" in md

    s, c = summary(runs / "sync"), summary(runs / "codistill")
    runs_md = section(md, "Runs")
    cells = row(runs_md, "sync")
    assert cells[1:6] == ["sync", "mlp", "2", "1", "30"]
    assert cells[6] == f"{s['wall_seconds']:.1f}" and cells[7] == f"{s['samples_per_second']:.0f}"
    assert cells[8] == f"{s['groups'][0]['test_accuracy']:.4f}" and cells[9] == f"{s['groups'][0]['test_loss']:.4f}"
    assert cells[10] == "finished"
    cells = row(runs_md, "codistill")
    assert cells[1:6] == ["codistill", "mlp", "2", "2", "30"]
    g0, g1 = c["groups"]
    assert cells[8] == f"{g0['test_accuracy']:.4f} / {g1['test_accuracy']:.4f}"
    assert cells[9] == f"{g0['test_loss']:.4f} / {g1['test_loss']:.4f}"

    groups_md = section(md, "Groups")
    assert f"| {g1['test_accuracy']:.4f}" in groups_md and f"{g1['val_loss']:.4f}" in groups_md
    cd = row(section(md, "Codistillation"), "codistill")
    assert cd[1] == f"{c['codistill']['ensemble_test_accuracy']:.4f}"
    assert cd[2] == f"{max(g0['test_accuracy'], g1['test_accuracy']):.4f}"
    assert cd[3] == f"{c['codistill']['churn']:.4f}"
    assert cd[4] == str(c["codistill"]["exchanges_published"])
    assert "## Async" not in md and "## Distillation" not in md and "## Notes" not in md


@needs_mpi
def test_plot_lines_are_one_per_run_and_group(runs):
    loaded = [rp.load_run(runs / "sync"), rp.load_run(runs / "codistill")]
    labels = [label for _, label, _, _, _ in rp._lines(loaded)]
    assert labels == ["sync", "codistill g0", "codistill g1"]
    x = loaded[1].series[1]
    assert x.group == 1 and [p[0] for p in x.train] == [5, 10, 15, 20, 25, 30]
    assert [p[0] for p in x.val] == [10, 20]
    assert all(b[1] >= a[1] for a, b in zip(x.train, x.train[1:]))  # wall time increases


@needs_mpi
def test_default_out_dir_and_distill_section(runs, capsys):
    assert rp.report([runs / "distill", runs / "codistill"], out=None) == 0
    out = runs / "distill" / "report"
    for name in ["report.md", *PNGS]:
        assert (out / name).is_file()
    text = capsys.readouterr().out
    d = summary(runs / "distill")
    cells = row(section(text, "Distillation"), "distill")
    assert cells[1] == "2" and cells[2] == f"{d['distill']['teacher_test_accuracy']:.4f}"
    assert cells[4] == f"{d['groups'][0]['test_accuracy']:.4f}"
    assert cells[5] == "–" and cells[6] == "–"  # no student-alone run among those reported
    assert cells[7] == f"{d['distill']['student_parameters']:,}"
    assert row(section(text, "Runs"), "distill")[1:3] == ["distill", "mlp-small"]


@needs_mpi
def test_distill_section_says_how_much_of_the_gap_closed(runs, capsys):
    assert rp.report([runs / "codistill", runs / "distill", runs / "alone", runs / "sync"], out=runs / "gap") == 0
    d, alone = summary(runs / "distill"), summary(runs / "alone")
    cells = row(section(capsys.readouterr().out, "Distillation"), "distill")
    t, st, a = d["distill"]["teacher_test_accuracy"], d["groups"][0]["test_accuracy"], alone["groups"][0]["test_accuracy"]
    assert cells[5] == f"{a:.4f}"
    assert cells[6] == (f"{(st - a) / (t - a) * 100:.0f} % (alone)" if t != a else "–")


@needs_mpi
def test_unfinished_run_is_reported_as_such(runs, tmp_path):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(runs / "sync" / "config.json", unfinished)
    lines = (runs / "sync" / "metrics.jsonl").read_text().splitlines()
    # the records up to step 20, then a torn line (the job was writing when we looked)
    kept = [x for x in lines if json.loads(x)["step"] <= 20]
    (unfinished / "metrics.jsonl").write_text("\n".join(kept) + '\n{"step": 25, "gro')
    proc = cli_report(runs / "sync", unfinished, "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    cells = row(section(proc.stdout, "Runs"), "unfinished")
    assert cells[5] == "20/30" and cells[10] == "unfinished (no summary.json)"
    assert "`unfinished`: no summary.json" in proc.stdout and "no summary.json" in proc.stderr
    for name in PNGS:
        assert_png(tmp_path / "out" / name)


def test_not_a_run_directory_exits_2(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = cli_report(tmp_path / "empty")
    assert proc.returncode == 2
    assert "not a run directory" in proc.stderr and str(tmp_path / "empty") in proc.stderr
    proc = cli_report(tmp_path / "missing")
    assert proc.returncode == 2 and "no such directory" in proc.stderr
    assert not (tmp_path / "empty" / "report").exists()


def test_broken_summary_exits_2(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text("{not json")
    assert rp.report([tmp_path / "run"], out=None) == 2


def test_resumed_metrics_keep_wall_time_increasing(tmp_path):
    """A job stopped after step 30 (checkpoint at 20, records of 25 and 30 redone by the resumed process,
    whose clock restarts at 0): the redone steps replace the old ones, time goes on from 3.0."""
    recs = [(10, 1.0, 2.0), (20, 2.0, 1.5), (30, 3.0, 1.2), (30, 3.1, None),
            (30, 0.5, 1.3), (40, 1.0, 1.0)]
    lines = [json.dumps({"step": s, "group": 0, "time": t, **({"loss": v} if v is not None else
                         {"val_loss": 1.1, "val_accuracy": 0.7})}) for s, t, v in recs]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(lines) + "\n")
    # the resumed process began at step 30 (its first record), so the old records of step 30 go
    s = rp.read_series(path, 0)
    assert [(p[0], p[1]) for p in s.train] == [(10, 1.0), (20, 2.0), (30, 3.6), (40, 4.1)]
    assert s.val == [] and s.last_step == 40 and s.last_time == pytest.approx(4.1)


def test_async_section_from_summary(tmp_path):
    """Async figures (also per group, for codistill with async groups) come from summary.json."""
    run = tmp_path / "a"
    run.mkdir()
    part = {"rule": "dcasgd-a", "workers": 2, "updates": 240, "updates_per_second": 397.6,
            "staleness": {"mean": 0.7417, "p50": 1.0, "p99": 3.0, "max": 4}}
    (run / "config.json").write_text(json.dumps({"settings": {"mode": "codistill", "steps": 120},
                                                 "world_size": 6, "num_groups": 2}))
    (run / "summary.json").write_text(json.dumps({
        "mode": "codistill", "world_size": 6, "num_groups": 2, "steps": 120, "wall_seconds": 9.0,
        "samples_per_second": 900.0, "groups": [], "async": {"groups": [part, {**part, "updates": 238}]}}))
    proc = cli_report(run)
    assert proc.returncode == 0, proc.stderr
    text = section(proc.stdout, "Async")
    assert row(text, "a g0")[1:9] == ["dcasgd-a", "2", "240", "0.74", "1", "3", "4", "398"]
    assert row(text, "a g1")[3] == "238"
    assert (run / "report" / "report.md").is_file()
