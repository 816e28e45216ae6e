"""`hpcdistill report`: tables and PNG plots from real run directories (canned real runs in tests/fixtures), unfinished
runs, resumed metrics, and the exit code 2 for a directory that is not a run."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hpcdistill import report as rp
from hpcdistill.launch import job_env

from conftest import summary

HPCDISTILL = [sys.executable, "-m", "hpcdistill"]
PNGS = ["train_loss_vs_step.png", "train_loss_vs_time.png", "validation_vs_step.png", "validation_vs_time.png"]


def cli_report(*args):
    return subprocess.run([*HPCDISTILL, "report", *map(str, args)], capture_output=True, text=True, timeout=120,
                          env=job_env())


FIXTURE_RUNS = Path(__file__).resolve().parent / "fixtures" / "runs"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Canned real runs (tests/fixtures/runs, made by tests/fixtures/make_runs.py: 30 steps on digits;
    sync 2 ranks, codistill 2x1, async 1 host + 2 workers, distill into mlp-small, mlp-small alone),
    copied: reports are written next to them."""
    root = tmp_path_factory.mktemp("report")
    for run in sorted(FIXTURE_RUNS.iterdir()):
        shutil.copytree(run, root / run.name)
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
    """A PNG of about `width` pixels (the figure's inches at 150 dpi; bbox_inches="tight" trims the
    margins and makes room for the legend outside the axes), not blank, with 150 dpi recorded."""
    from matplotlib.image import imread
    from PIL import Image

    img = imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4) and img.shape[0] >= 450, img.shape
    if width:
        assert 0.8 * width <= img.shape[1] <= 1.3 * width, (img.shape, width)
    assert img[..., :3].std() > 0.05  # not a blank canvas
    with Image.open(path) as im:
        assert round(im.info["dpi"][0]) == 150, im.info


def test_report_of_sync_and_codistill_runs(runs, tmp_path):
    out = tmp_path / "out"
    proc = cli_report(runs / "sync", runs / "codistill", "--out", out)
    assert proc.returncode == 0, proc.stderr
    md = (out / "report.md").read_text()
    assert proc.stdout.split("\nwrote ")[0].strip() in md  # stdout shows the same tables
    for name in PNGS:
        assert_png(out / name, width=1200 if name.startswith("train") else 1800)
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


def test_plot_lines_are_one_per_run_and_group(runs):
    loaded = [rp.load_run(runs / "sync"), rp.load_run(runs / "codistill")]
    labels = [label for _, label, _, _, _ in rp._lines(loaded)]
    assert labels == ["sync", "codistill g0", "codistill g1"]
    x = loaded[1].series[1]
    assert x.group == 1 and [p[0] for p in x.train] == [5, 10, 15, 20, 25, 30]
    assert [p[0] for p in x.val] == [10, 20]
    assert all(b[1] >= a[1] for a, b in zip(x.train, x.train[1:]))  # wall time increases


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


def test_distill_section_says_how_much_of_the_gap_closed(runs, capsys):
    assert rp.report([runs / "codistill", runs / "distill", runs / "alone", runs / "sync"], out=runs / "gap") == 0
    d, alone = summary(runs / "distill"), summary(runs / "alone")
    cells = row(section(capsys.readouterr().out, "Distillation"), "distill")
    t, st, a = (d["distill"]["teacher_test_accuracy"], d["groups"][0]["test_accuracy"],
                alone["groups"][0]["test_accuracy"])
    assert cells[5] == f"{a:.4f}"
    assert cells[6] == (f"{(st - a) / (t - a) * 100:.0f} % (alone)" if t != a else "–")


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
        "samples_per_second": 900.0, "dataset": "digits", "model": "mlp", "run_dir": str(run), "groups": [],
        "async": {"groups": [part, {**part, "updates": 238}]}}))
    proc = cli_report(run)
    assert proc.returncode == 0, proc.stderr
    text = section(proc.stdout, "Async")
    assert row(text, "a g0")[1:9] == ["dcasgd-a", "2", "240", "0.74", "1", "3", "4", "398"]
    assert row(text, "a g1")[3] == "238"
    assert (run / "report" / "report.md").is_file()


def test_log_scale_option_writes_the_pngs(runs, tmp_path):
    out = tmp_path / "log"
    proc = cli_report(runs / "sync", runs / "codistill", "--out", out, "--log-scale")
    assert proc.returncode == 0, proc.stderr
    for name in PNGS:
        assert_png(out / name, width=1200 if name.startswith("train") else 1800)
        assert f"]({name})" in (out / "report.md").read_text()


def _long_run(path, steps=400, every=2, groups=1):
    """A finished-looking run directory with a noisy, decaying loss logged every `every` steps."""
    import random

    rng = random.Random(0)
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"settings": {"mode": "sync", "steps": steps}}))
    for g in range(groups):
        lines = []
        for step in range(every, steps + 1, every):
            lines.append(json.dumps({"step": step, "group": g, "time": step / 100,
                                     "loss": 3.0 * 0.99 ** step * (1 + 0.5 * rng.random()) + 0.01}))
            if step % 50 == 0:
                lines.append(json.dumps({"step": step, "group": g, "time": step / 100 + 0.01,
                                         "val_loss": 2.0 * 0.99 ** step + 0.02, "val_accuracy": 1 - 0.99 ** step}))
        name = "metrics.jsonl" if groups == 1 else f"metrics-g{g}.jsonl"
        (path / name).write_text("\n".join(lines) + "\n")
    return path


def test_smoothed_loss_log_scale_limits_and_legends(tmp_path, monkeypatch):
    """The training loss smoothed over its faint raw values, a log y axis for the losses with
    `log_scale` (accuracy stays linear), y limits around the data, legends outside the axes, 150 dpi
    with a tight bounding box."""
    import numpy as np
    from matplotlib.figure import Figure

    runs = [rp.load_run(_long_run(tmp_path / "a")), rp.load_run(_long_run(tmp_path / "b", groups=2))]
    rp._unique_labels(runs)
    captured, orig = [], Figure.savefig

    def keep(fig, *args, **kwargs):
        captured.append((fig, kwargs))
        return orig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    assert sorted(rp.write_plots(runs, tmp_path, log_scale=True)) == sorted(PNGS)
    for name in PNGS:
        assert_png(tmp_path / name)
    (train_fig, kw), (val_fig, _) = captured[0], captured[1]
    assert kw["dpi"] == 150 and kw["bbox_inches"] == "tight"
    ax = train_fig.axes[0]
    assert ax.get_yscale() == "log"
    raw = [ln for ln in ax.get_lines() if ln.get_alpha() == 0.25]
    smoothed = [ln for ln in ax.get_lines() if not ln.get_label().startswith("_")]
    assert [ln.get_label() for ln in smoothed] == ["a", "b g0", "b g1"] and len(raw) == 3
    for r, sm in zip(raw, smoothed):
        assert list(sm.get_ydata()) == pytest.approx(rp.smooth(list(r.get_ydata())))
        assert np.abs(np.diff(sm.get_ydata())).sum() < np.abs(np.diff(r.get_ydata())).sum()  # smoother
    values = [v for ln in raw for v in ln.get_ydata()]
    lo, hi = ax.get_ylim()
    assert lo < min(values) and hi > max(values) and (hi / lo) < 2 * max(values) / min(values)
    renderer = train_fig.canvas.get_renderer()
    legend = ax.get_legend()
    assert legend.get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1  # outside the axes
    loss_ax, acc_ax = val_fig.axes[:2]
    assert loss_ax.get_yscale() == "log" and acc_ax.get_yscale() == "linear"
    accs = [v for ln in acc_ax.get_lines() for v in ln.get_ydata()]
    assert acc_ax.get_ylim()[0] < min(accs) and acc_ax.get_ylim()[1] > max(accs)
    # linear (the default): the same data, a linear axis
    captured.clear()
    rp.write_plots(runs, tmp_path)
    assert captured[0][0].axes[0].get_yscale() == "linear"


def test_smoothing():
    assert rp.smoothing_weight(5) == 0.0 and rp.smoothing_weight(20) == 0.5 and rp.smoothing_weight(1000) == 0.9
    assert rp.smooth([3.0, 1.0, 2.0], weight=0.0) == [3.0, 1.0, 2.0]
    ema = rp.smooth([4.0, 2.0], weight=0.5)
    assert ema[0] == 4.0 and ema[1] == pytest.approx((0.25 * 4 + 0.5 * 2) / 0.75)  # bias-corrected
    assert len(rp.smooth([1.0] * 50)) == 50 and rp.smooth([1.0] * 50) == pytest.approx([1.0] * 50)


def test_markdown_table_is_the_one_helper():
    assert rp.markdown_table(["a", "bb"], [["x", None]]) == "| a | bb |\n|---|----|\n| x | –  |"
    assert rp.markdown_table(["n"], [[12], [3]], align="right") == "|  n |\n|---:|\n| 12 |\n|  3 |"
