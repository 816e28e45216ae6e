"""`hpcdistill report RUN_DIR [RUN_DIR ...] [--out DIR] [--log-scale]`: tables and plots comparing run directories.

Reads each run's `config.json`, `summary.json` (absent while a run is unfinished or after it was
stopped: the report says so and uses the metrics logged so far) and `metrics.jsonl` /
`metrics-g<group>.jsonl`, then writes to OUT (default: the first run's `report/`):

- `report.md`: the tables (also printed to stdout) and links to the plots:
  runs (mode, world size, groups, steps, wall time, samples/s, test accuracy and loss per group),
  groups (ranks, test and validation figures), and where present codistill (ensemble accuracy,
  churn, exchanges, teacher staleness), async (update staleness) and distill (teacher vs student);
- `train_loss_vs_step.png`, `train_loss_vs_time.png`: training loss (the task loss: cross-entropy
  without the distillation term, so that modes compare), one line per run and group: an exponential
  moving average (see `smooth`) over the raw values drawn faintly;
- `validation_vs_step.png`, `validation_vs_time.png`: validation loss and accuracy.

PNGs at 150 dpi, saved with a tight bounding box (titles and legends never cut), legends outside the
axes, y limits from the data with a margin; `--log-scale` puts the losses on a log y axis.

Only reads the run directories; exits 2 (with a message naming the path) when a directory is not a
run directory or one of its JSON records cannot be read.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hpcdistill.summary import RunSummary

PLOTS = {
    "train_loss_vs_step.png": "Training loss vs step",
    "train_loss_vs_time.png": "Training loss vs wall time",
    "validation_vs_step.png": "Validation loss and accuracy vs step",
    "validation_vs_time.png": "Validation loss and accuracy vs wall time",
}


class ReportError(Exception):
    """A directory given to the report cannot be read as a run directory (exit 2)."""


@dataclass
class Series:
    """One group's records from one metrics file, in step order, with a wall time that keeps
    increasing across resumes (each process start restarts `time` at 0)."""

    group: int
    train: list = field(default_factory=list)  # (step, time, task loss)
    val: list = field(default_factory=list)    # (step, time, val loss, val accuracy)
    staleness: list = field(default_factory=list)
    last_step: int = 0
    last_time: float = 0.0


@dataclass
class Run:
    path: Path
    label: str
    config: dict
    summary: dict | None
    series: list

    @property
    def settings(self) -> dict:
        return self.config.get("settings", {})

    @property
    def mode(self) -> str:
        return (self.summary or {}).get("mode") or self.settings.get("mode", "?")

    @property
    def finished(self) -> bool:
        return self.summary is not None


# --- reading ---------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ReportError(f"{path}: cannot read it as JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a JSON object")
    return data


def _read_summary(path: Path) -> dict:
    """summary.json through its type (summary.RunSummary): a file of another shape is an error here,
    not a KeyError in a table."""
    from pydantic import ValidationError

    try:
        return RunSummary.model_validate(_read_json(path)).model_dump(by_alias=True, exclude_none=True)
    except ValidationError as exc:
        raise ReportError(f"{path}: not a summary.json of hpcdistill ({exc.error_count()} problem(s): "
                          f"{exc.errors()[0]['loc']} {exc.errors()[0]['msg']})") from None


def _group_of(name: str) -> int:
    digits = name[len("metrics-g"):-len(".jsonl")]
    return int(digits) if digits.isdigit() else 0


def _metric_files(run_dir: Path) -> list:
    single = run_dir / "metrics.jsonl"
    groups = sorted(run_dir.glob("metrics-g*.jsonl"), key=lambda p: _group_of(p.name))
    return ([single] if single.exists() else []) + groups


def _num(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def read_series(path: Path, group: int) -> Series:
    """Parse one metrics file. A torn last line (a job still writing) is skipped. After a resume,
    records of steps that the new process redid replace the old ones, and the new process's times
    are shifted past the old ones so that wall time never runs backwards."""
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and _num(rec.get("time")) is not None:
            records.append(rec)
    kept, offset, prev_time = [], 0.0, None
    for rec in records:
        t = float(rec["time"])
        if prev_time is not None and t < prev_time:  # a new process: resumed from a checkpoint
            offset += prev_time
            kept = [r for r in kept if r["step"] < rec["step"]]
        prev_time = t
        kept.append({**rec, "_t": t + offset})
    s = Series(group=int(records[0].get("group", group)) if records else group)
    for rec in kept:
        s.last_step, s.last_time = max(s.last_step, rec["step"]), max(s.last_time, rec["_t"])
        loss = _num(rec.get("task_loss", rec.get("loss")))
        if loss is not None:
            s.train.append((rec["step"], rec["_t"], loss))
        vl, va = _num(rec.get("val_loss")), _num(rec.get("val_accuracy"))
        if vl is not None or va is not None:
            s.val.append((rec["step"], rec["_t"], math.nan if vl is None else vl, math.nan if va is None else va))
        st = _num(rec.get("staleness"))
        if st is not None:
            s.staleness.append(st)
    return s


def load_run(path: Path) -> Run:
    path = Path(path)
    if not path.is_dir():
        raise ReportError(f"{path}: not a directory" if path.exists() else f"{path}: no such directory")
    files = _metric_files(path)
    has_config, has_summary = (path / "config.json").is_file(), (path / "summary.json").is_file()
    if not (has_config or has_summary or files):
        raise ReportError(f"{path}: not a run directory (no config.json, summary.json or metrics*.jsonl in it; "
                          "give the directory that HPCDISTILL_RUN_DIR named)")
    config = _read_json(path / "config.json") if has_config else {}
    summary = _read_summary(path / "summary.json") if has_summary else None
    series = [read_series(f, 0 if f.name == "metrics.jsonl" else _group_of(f.name)) for f in files]
    return Run(path=path, label=path.resolve().name, config=config, summary=summary, series=series)


def _unique_labels(runs: list) -> None:
    """Name runs by their directory; where two share a name, by as many parent parts as it takes."""
    parts = [r.path.resolve().parts for r in runs]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            break
    for r, label in zip(runs, labels):
        r.label = label


# --- tables ----------------------------------------------------------------------------------------
def _f(value, digits: int = 4) -> str:
    v = _num(value)
    return "–" if v is None else f"{v:.{digits}f}"


def markdown_table(header: list, rows: list, *, align: str = "left", missing: str = "–") -> str:
    """A GitHub-markdown table, columns padded to one width: the one table helper of the project (the
    report, benchmarks/_common.py and reproduction/doc.py). Cells are str()'d, None becomes `missing`;
    align "left" (text) or "right" (numbers: the separator row says so with `---:`)."""
    if align not in ("left", "right"):
        raise ValueError(f"align must be 'left' or 'right', not {align!r}")
    header = [str(h) for h in header]
    rows = [[missing if c is None else str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows if i < len(r)]) for i, h in enumerate(header)]
    pad = str.ljust if align == "left" else str.rjust

    def line(cells):
        return "| " + " | ".join(pad(c, w) for c, w in zip(cells, widths)) + " |"

    rule = ("-" * (w + 2) if align == "left" else "-" * (w + 1) + ":" for w in widths)
    return "\n".join([line(header), "|" + "|".join(rule) + "|", *map(line, rows)])



def _groups(run: Run) -> list:
    return sorted((run.summary or {}).get("groups", []), key=lambda g: g.get("group", 0))


def runs_table(runs: list) -> str:
    rows = []
    for r in runs:
        s, cfg = r.summary or {}, r.config
        target = s.get("steps", r.settings.get("steps"))
        if r.finished:
            steps, wall = str(target), _f(s.get("wall_seconds"), 1)
            rate, status = _f(s.get("samples_per_second"), 0), "finished"
        else:
            last = max((x.last_step for x in r.series), default=0)
            steps = f"{last}/{'?' if target is None else target}"
            wall = f">={max((x.last_time for x in r.series), default=0.0):.1f}"
            rate, status = "–", "unfinished (no summary.json)"
        groups = _groups(r)
        rows.append([
            r.label, r.mode, str(s.get("model") or cfg.get("arch", {}).get("name", "?")),
            str(s.get("world_size", cfg.get("world_size", "?"))),
            str(s.get("num_groups", cfg.get("num_groups", "?"))), steps, wall, rate,
            " / ".join(_f(g.get("test_accuracy")) for g in groups) or "–",
            " / ".join(_f(g.get("test_loss")) for g in groups) or "–",
            status,
        ])
    return markdown_table(["run", "mode", "model", "world", "groups", "steps", "wall s", "samples/s",
                   "test acc (per group)", "test loss (per group)", "status"], rows)


def groups_table(runs: list) -> str:
    rows = []
    for r in runs:
        for g in _groups(r):
            ranks = g.get("ranks") or []
            rows.append([r.label, str(g.get("group", 0)),
                         f"{ranks[0]}-{ranks[-1]}" if len(ranks) > 1 else ",".join(map(str, ranks)) or "–",
                         str(g.get("steps", "–")), _f(g.get("test_accuracy")), _f(g.get("test_loss")),
                         _f(g.get("val_accuracy")), _f(g.get("val_loss"))])
        if not r.finished:
            for x in r.series:
                last = x.val[-1] if x.val else None
                rows.append([r.label, str(x.group), "–", f"{x.last_step} so far", "–", "–",
                             _f(last[3]) if last else "–", _f(last[2]) if last else "–"])
    return markdown_table(["run", "group", "ranks", "steps", "test acc", "test loss", "val acc", "val loss"], rows)


def codistill_table(runs: list) -> str | None:
    rows = []
    for r in runs:
        c = (r.summary or {}).get("codistill")
        if not c:
            continue
        best = max((g.get("test_accuracy", 0.0) for g in _groups(r)), default=None)
        st = c.get("teacher_staleness", {})
        rows.append([r.label, _f(c.get("ensemble_test_accuracy")), _f(best), _f(c.get("churn")),
                     str(c.get("exchanges_published", "–")), str(c.get("teachers_loaded", "–")),
                     str(c.get("teachers_rejected", "–")),
                     f"{_f(st.get('mean'), 1)} / {st.get('max', '–')}", _f(c.get("exchange_seconds"), 3)])
    if not rows:
        return None
    return markdown_table(["run", "ensemble test acc", "best group test acc", "churn", "published", "loaded",
                   "rejected", "teacher staleness mean / max (steps)", "exchange s"], rows)


def async_table(runs: list) -> str | None:
    rows = []
    for r in runs:
        a = (r.summary or {}).get("async")
        if a:
            parts = a["groups"] if isinstance(a.get("groups"), list) else [a]
            for i, p in enumerate(parts):
                if not p:
                    continue
                st = p.get("staleness", {})
                rows.append([r.label if len(parts) == 1 else f"{r.label} g{i}", str(p.get("rule", "–")),
                             str(p.get("workers", "–")), str(p.get("updates", "–")), _f(st.get("mean"), 2),
                             _f(st.get("p50"), 0), _f(st.get("p99"), 0), str(st.get("max", "–")),
                             _f(p.get("updates_per_second"), 0)])
        elif not r.finished:
            for x in r.series:
                if x.staleness:  # logged by the lead worker every log_every steps: a sample, not all updates
                    rows.append([f"{r.label} g{x.group} (logged so far)", str(r.settings.get("async_rule", "–")),
                                 "–", "–", _f(sum(x.staleness) / len(x.staleness), 2), "–", "–",
                                 _f(max(x.staleness), 0), "–"])
    if not rows:
        return None
    return markdown_table(["run", "rule", "workers", "updates", "staleness mean", "p50", "p99", "max",
                   "updates/s"], rows)


def _alone(runs: list, student: "Run"):
    """A finished run among `runs` that trained the student's model on the same data for the same
    steps without a teacher: the baseline that says how much of the gap distillation closed."""
    s = student.summary
    for r in runs:
        t = r.summary or {}
        if (r is not student and t.get("mode") == "sync" and t.get("model") == s.get("model")
                and t.get("dataset") == s.get("dataset") and t.get("steps") == s.get("steps")):
            return r
    return None


def distill_table(runs: list) -> str | None:
    rows = []
    for r in runs:
        d = (r.summary or {}).get("distill")
        if not d:
            continue
        groups = _groups(r)
        student = _num(groups[0].get("test_accuracy")) if groups else None
        sp, tp = d.get("student_parameters"), d.get("teacher_parameters")
        ints = isinstance(sp, int) and isinstance(tp, int) and sp > 0
        members = d.get("teacher_member_test_accuracy") or []
        teacher = _num(d.get("teacher_test_accuracy"))
        base = _alone(runs, r)
        alone = _num(_groups(base)[0].get("test_accuracy")) if base else None
        gap = "–"
        if None not in (teacher, student, alone) and teacher != alone:
            gap = f"{(student - alone) / (teacher - alone) * 100:.0f} % ({base.label})"
        rows.append([r.label, str(len(d.get("teachers", []))), _f(teacher),
                     " / ".join(_f(m) for m in members) or "–", _f(student), _f(alone), gap,
                     f"{sp:,}" if isinstance(sp, int) else "–", f"{tp:,}" if isinstance(tp, int) else "–",
                     f"{tp / sp:.1f}x" if ints else "–"])
    if not rows:
        return None
    return markdown_table(["run", "teachers", "teacher test acc", "member test acc", "student test acc",
                   "student alone test acc", "gap closed (vs run)", "student params", "teacher params",
                   "teacher/student params"], rows)


def render_markdown(runs: list, plots: list) -> str:
    parts = ["# hpcdistill report", "", "Runs: " + ", ".join(f"`{r.label}` ({r.path.resolve()})" for r in runs),
             "", "## Runs", "", runs_table(runs), "", "## Groups", "", groups_table(runs), ""]
    for title, table in (("Codistillation", codistill_table(runs)),
                         ("Async (DC-ASGD) staleness, in updates", async_table(runs)),
                         ("Distillation", distill_table(runs))):
        if table:
            parts += [f"## {title}", "", table, ""]
    notes = [f"- `{r.label}`: no summary.json: the run is unfinished or was stopped (HPCDISTILL_RESUME=auto "
             "resumes it); its figures are from the metrics logged so far." for r in runs if not r.finished]
    notes += [f"- `{r.label}`: no metrics records yet." for r in runs if not any(x.train or x.val for x in r.series)]
    if notes:
        parts += ["## Notes", "", *notes, ""]
    if plots:
        parts += ["## Plots", "", "Training loss is the task loss (cross-entropy without the distillation term), "
                  "drawn as an exponential moving average over the logged values (weight 1 - 10/n for n points, "
                  "at most 0.9), the raw values as a faint line of the same colour. "
                  "Wall time is seconds since the job started (MPI and Horovod start-up included); after a "
                  "resume it continues from where the previous process stopped. The last validation point "
                  "of a finished run is its final validation pass from summary.json.", ""]
        parts += [f"![{PLOTS[p]}]({p})" for p in plots] + [""]
    return "\n".join(parts)


# --- plots ---------------------------------------------------------------------------------------
_STYLES = ["-", "--", ":", "-."]
DPI = 150


def _lines(runs: list) -> list:
    """(run, label, colour, line style, series) per run and group: a colour per run, a style per group."""
    out = []
    for i, r in enumerate(runs):
        for x in r.series:
            label = r.label if len(r.series) == 1 else f"{r.label} g{x.group}"
            out.append((r, label, f"C{i % 10}", _STYLES[x.group % len(_STYLES)], x))
    return out


def smoothing_weight(n: int) -> float:
    """The EMA weight for a curve of n points: 1 - 10/n within [0, 0.9] (0: no smoothing below 11
    points, 0.5 at 20, 0.9 from 100 on), so a short run is not flattened and a long one is readable."""
    return min(0.9, max(0.0, 1.0 - 10.0 / n)) if n > 0 else 0.0


def smooth(values: list, weight: float | None = None) -> list:
    """Exponential moving average with the start-up bias removed (as TensorBoard's smoothing):
    ema_i = w*ema_{i-1} + (1-w)*v_i, divided by 1 - w^(i+1), so the first point is the first value."""
    w = smoothing_weight(len(values)) if weight is None else weight
    out, ema = [], 0.0
    for i, v in enumerate(values):
        ema = w * ema + (1.0 - w) * v
        out.append(ema / (1.0 - w ** (i + 1)) if w > 0 else v)
    return out


def _set_ylim(ax, values: list, log: bool) -> None:
    """Y limits from the data with a margin (5 % of the range; a factor on a log axis), so no curve is
    cut off and none is squashed by a limit fixed in advance."""
    vals = [v for v in values if math.isfinite(v) and (v > 0 or not log)]
    if not vals:
        return
    lo, hi = min(vals), max(vals)
    if log:
        span = math.log10(hi / lo) if hi > lo else 0.0
        margin = 10 ** max(0.05 * span, 0.02)
        ax.set_ylim(lo / margin, hi * margin)
    else:
        margin = 0.05 * (hi - lo) if hi > lo else max(abs(hi) * 0.05, 0.01)
        ax.set_ylim(lo - margin, hi + margin)


def _final_val(run: Run, x: Series):
    """The final validation pass (in summary.json, not in the metrics) as one more point."""
    for g in _groups(run):
        if g.get("group", 0) == x.group and _num(g.get("val_loss")) is not None:
            step = int(g.get("steps", x.last_step))
            if not x.val or x.val[-1][0] < step:
                acc = _num(g.get("val_accuracy"))
                return (step, x.last_time, float(g["val_loss"]), math.nan if acc is None else acc)
    return None


def _finish_axes(ax, legend_title: str | None = None) -> None:
    """Grid, and the legend outside the axes (to the right), where it hides no curve."""
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small", title=legend_title, title_fontsize="small", loc="upper left",
                  bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    else:
        ax.text(0.5, 0.5, "no records yet", ha="center", va="center", transform=ax.transAxes, color="gray")


def _save(fig, path: Path) -> None:
    fig.savefig(path, dpi=DPI, bbox_inches="tight", pad_inches=0.1)


def write_plots(runs: list, out: Path, log_scale: bool = False) -> list:
    """Write the four PNGs with matplotlib's Agg canvas (no display, no pyplot global state); with
    `log_scale` the loss axes are logarithmic."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lines = _lines(runs)
    written = []
    scale = "log" if log_scale else "linear"
    for axis, xlabel, suffix in ((0, "step", "step"), (1, "wall time since start (s)", "time")):
        fig = Figure(figsize=(8, 5), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.set_yscale(scale)
        ys, smoothed_any = [], False
        for _, label, color, style, x in lines:
            if x.train:
                xs, raw = [p[axis] for p in x.train], [p[2] for p in x.train]
                ys += raw
                smoothed = smooth(raw)
                if smoothed != raw:
                    smoothed_any = True
                    ax.plot(xs, raw, "-", color=color, alpha=0.25, linewidth=0.8)
                ax.plot(xs, smoothed, style, color=color, label=label, linewidth=1.6,
                        marker="." if len(x.train) <= 30 else None)
        name = f"train_loss_vs_{suffix}.png"
        ax.set(xlabel=xlabel, ylabel="training loss (task cross-entropy)", title=PLOTS[name])
        _set_ylim(ax, ys, log_scale)
        _finish_axes(ax, "moving average\n(faint: raw)" if smoothed_any else None)
        _save(fig, out / name)
        written.append(name)

        fig = Figure(figsize=(12, 5), layout="constrained")
        FigureCanvasAgg(fig)
        ax_loss, ax_acc = fig.subplots(1, 2)
        ax_loss.set_yscale(scale)
        losses, accs = [], []
        for run, label, color, style, x in lines:
            pts = list(x.val)
            final = _final_val(run, x)
            if final:
                pts.append(final)
            if pts:
                kw = dict(color=color, label=label, marker="o", markersize=3)
                ax_loss.plot([p[axis] for p in pts], [p[2] for p in pts], style, **kw)
                ax_acc.plot([p[axis] for p in pts], [p[3] for p in pts], style, **kw)
                losses += [p[2] for p in pts]
                accs += [p[3] for p in pts]
        ax_loss.set(xlabel=xlabel, ylabel="validation loss", title="Validation loss")
        ax_acc.set(xlabel=xlabel, ylabel="validation accuracy", title="Validation accuracy")
        _set_ylim(ax_loss, losses, log_scale)
        _set_ylim(ax_acc, accs, False)
        ax_loss.grid(True, alpha=0.3)
        if not losses:
            ax_loss.text(0.5, 0.5, "no records yet", ha="center", va="center", transform=ax_loss.transAxes,
                         color="gray")
        _finish_axes(ax_acc)  # one legend for both panels, right of the accuracy panel
        name = f"validation_vs_{suffix}.png"
        fig.suptitle(PLOTS[name])
        _save(fig, out / name)
        written.append(name)
    return written


# --- entry point -----------------------------------------------------------------------------------
def report(run_dirs: list, out: Path | None, log_scale: bool = False) -> int:
    """Print the tables, write OUT/report.md and the PNGs (losses on a log axis with `log_scale`);
    0 on success, 2 if a directory is not a run."""
    if not run_dirs:
        print("hpcdistill report: give at least one run directory", file=sys.stderr)
        return 2
    try:
        runs = [load_run(Path(d)) for d in run_dirs]
    except ReportError as exc:
        print(f"hpcdistill report: {exc}", file=sys.stderr)
        return 2
    _unique_labels(runs)
    out = Path(out) if out is not None else runs[0].path / "report"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"hpcdistill report: cannot create the output directory {out}: {exc}", file=sys.stderr)
        return 2
    plots = write_plots(runs, out, log_scale=log_scale)
    text = render_markdown(runs, plots)
    (out / "report.md").write_text(text)
    print(text.split("\n## Plots")[0].rstrip())
    for r in runs:
        if not r.finished:
            print(f"hpcdistill report: note: {r.path}: no summary.json (an unfinished or stopped run)",
                  file=sys.stderr)
    print(f"\nwrote {out / 'report.md'} and {len(plots)} plots in {out}: " + ", ".join(plots))
    return 0
