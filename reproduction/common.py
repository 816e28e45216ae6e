"""The shared runner: launch `hpcdistill train` under mpirun, read back what a run wrote, statistics.

Every run is a real batch job: `mpirun -np N .venv/bin/hpcdistill train` with HPCDISTILL_* variables,
OMP_NUM_THREADS=1 and HPCDISTILL_RESUME=never, in its own directory under reproduction/runs/
(reproduction/quick/runs/ with --quick). A run
whose directory already holds a summary.json written with the same settings is not run again (so an
interrupted suite picks up where it stopped); --fresh forces every run.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hpcdistill.atomic import atomic_path
from hpcdistill.launch import command_line, job_env, mpirun_command
from hpcdistill.summary import RunSummary

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = REPO / "datasets"
HPCDISTILL = REPO / ".venv" / "bin" / "hpcdistill"
RUN_TIMEOUT = 1200  # seconds; a run that takes longer is killed and reported as failed


@dataclass(frozen=True)
class Layout:
    """Where one invocation of the suite writes: run directories, results, the page, its JSON and plots
    (`rel`: the plots' directory as the page links it)."""

    runs: Path
    results: Path
    doc: Path
    json: Path
    img: Path
    rel: str
    notes: Path | None  # the hand-written reading of the full suite's results; not of a quick run's


# The full suite: its results are committed, so the page can be rebuilt without the runs.
FULL = Layout(runs=REPO / "reproduction" / "runs", results=REPO / "reproduction" / "results",
              doc=REPO / "docs" / "reproduction.md", json=REPO / "docs" / "reproduction.json",
              img=REPO / "docs" / "img" / "reproduction", rel="img/reproduction",
              notes=REPO / "reproduction" / "notes.md")
# --quick checks that the suite runs end to end; its shortened runs must not overwrite the full results
# or the page written from them, so everything it makes stays in one git-ignored directory.
QUICK_DIR = REPO / "reproduction" / "quick"
QUICK = Layout(runs=QUICK_DIR / "runs", results=QUICK_DIR / "results", doc=QUICK_DIR / "reproduction.md",
               json=QUICK_DIR / "reproduction.json", img=QUICK_DIR / "img", rel="img", notes=None)


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


@dataclass
class Run:
    """One finished (or failed) job: where it ran, how, and what it wrote."""

    name: str
    path: Path
    np: int
    env: dict
    ok: bool = False
    seconds: float = 0.0  # wall time of the whole mpirun (start-up and teardown included)
    summary: dict = field(default_factory=dict)
    error: str = ""
    reused: bool = False  # finished earlier with the same settings; not run again

    @property
    def command(self) -> str:
        return command_line(self.np, self.env, relative_to=REPO)

    # --- what the run wrote -------------------------------------------------------------------
    def metrics(self, group: int = 0) -> list[dict]:
        name = "metrics.jsonl" if self.summary.get("num_groups", 1) == 1 else f"metrics-g{group}.jsonl"
        path = self.path / name
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def groups(self) -> list[dict]:
        return self.summary.get("groups", [])

    def val_curve(self, group: int = 0) -> list[tuple[int, float]]:
        """(step, validation loss) pairs, the final evaluation from summary.json included."""
        curve = [(r["step"], r["val_loss"]) for r in self.metrics(group) if "val_loss" in r]
        final = next((g for g in self.groups() if g["group"] == group), None)
        if final is not None:
            curve.append((final["steps"], final["val_loss"]))
        return sorted(dict(curve).items())

    def checkpoint(self, group: int = 0) -> Path:
        """The newest valid checkpoint of a group (raises if there is none)."""
        from hpcdistill.checkpoints import CheckpointManager

        ckdir = self.path / "checkpoints"
        if self.summary.get("num_groups", 1) > 1:
            ckdir = ckdir / f"group-{group}"
        found = CheckpointManager(ckdir).latest_valid()
        if found is None:
            raise FileNotFoundError(f"no valid checkpoint in {ckdir}")
        return found[0]


class Runner:
    """Runs jobs one after another (the machine has 2 cores) and remembers them.

    With `records` (a JSON file beside the results, for a family whose analysis reads only
    summary.json), every finished run's settings and summary are kept there too, and a run found there
    with the same settings is not run again: the family resumes on another machine, without its run
    directories (the DC-ASGD family is ~1 h of the suite's 2 cores)."""

    def __init__(self, runs: Path, fresh: bool = False, dry: bool = False, records: Path | None = None):
        self.root, self.fresh, self.dry, self.records = runs, fresh, dry, records
        self.runs: list[Run] = []
        self.started = time.time()
        self._recorded = json.loads(records.read_text()) if records and records.exists() and not fresh else {}

    def _record(self, run: Run) -> None:
        if self.records is not None and not self.dry:
            self._recorded[run.name] = {"np": run.np, "settings": _portable(run.env), "seconds": run.seconds,
                                        "summary": run.summary}
            self.records.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.records) as tmp:
                tmp.write_text(json.dumps(dict(sorted(self._recorded.items())), indent=0, default=str))

    def run(self, name: str, np_: int, settings: dict) -> Run:
        """Run (or reuse) the job `name` (a path under the layout's run directory) with `settings`."""
        path = self.root / name
        settings = {k: str(v) for k, v in settings.items()}
        settings["HPCDISTILL_RUN_DIR"] = str(path)
        run = Run(name, path, np_, settings)
        record = path / "reproduction-run.json"
        if not self.fresh and record.exists() and (path / "summary.json").exists():
            old = json.loads(record.read_text())
            if old.get("np") == np_ and old.get("settings") == settings:
                run.ok, run.seconds, run.reused = True, old["seconds"], True
                run.summary = RunSummary.load(path / "summary.json").model_dump(by_alias=True, exclude_none=True)
                if name not in self._recorded:
                    self._record(run)
                self.runs.append(run)
                return run
        rec = self._recorded.get(name)
        if not self.fresh and rec and rec["np"] == np_ and rec["settings"] == _portable(settings):
            run.ok, run.seconds, run.reused, run.summary = True, rec["seconds"], True, rec["summary"]
            self.runs.append(run)
            return run
        if self.dry:
            log(f"would run {name}: {run.command}")
            self.runs.append(run)
            return run
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        log(f"run {name}: -np {np_} " + " ".join(f"{k.removeprefix('HPCDISTILL_')}={v}" for k, v in
                                                 sorted(settings.items()) if k != "HPCDISTILL_RUN_DIR"))
        t = time.time()
        with open(path / "train.log", "w") as out:
            try:
                env = job_env(**{"HPCDISTILL_RESUME": "never", "HPCDISTILL_DATA_DIR": DATA_DIR, **settings})
                proc = subprocess.run(mpirun_command(np_, HPCDISTILL, "train"), env=env, cwd=REPO, stdout=out,
                                      stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT)
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        run.seconds = time.time() - t
        if rc == 0 and (path / "summary.json").exists():
            run.ok = True
            run.summary = RunSummary.load(path / "summary.json").model_dump(by_alias=True, exclude_none=True)
            record.write_text(json.dumps({"np": np_, "settings": settings, "seconds": run.seconds}, indent=1))
            self._record(run)
            log(f"  done in {run.seconds:.0f} s (suite so far {(time.time() - self.started) / 60:.1f} min)")
        else:
            tail = (path / "train.log").read_text(errors="replace").splitlines()[-5:]
            run.error = f"exit {rc}: " + " | ".join(tail)
            log(f"  FAILED after {run.seconds:.0f} s ({run.error[:300]})")
        self.runs.append(run)
        return run


def _portable(settings: dict) -> dict:
    """Settings without the run directory (an absolute path: another checkout has another)."""
    return {k: v for k, v in settings.items() if k != "HPCDISTILL_RUN_DIR"}


# --- models from checkpoints (never torch.load) ----------------------------------------------------

def load_model(checkpoint: Path):
    """Rebuild a model from a checkpoint file alone: its arch record and its model arrays."""
    from hpcdistill.checkpoints import model_arrays, read_h5
    from hpcdistill.models import build_from_record

    arrays, meta = read_h5(checkpoint)
    model = build_from_record(meta["arch"], where=str(checkpoint))
    model.load_state_dict(model_arrays(arrays))
    return model.eval()


def predict(model, split_h5: Path, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(logits, labels) over the first `limit` samples of a split, flattened per token for sequences."""
    import torch

    from hpcdistill.data import eval_batches, open_source

    split_h5 = Path(split_h5)
    dataset = open_source(split_h5.parent.name, split_h5.parent.parent).dataset(split_h5.stem)
    logits, labels = [], []
    with torch.no_grad():
        for x, y in eval_batches(dataset, batch_size=256, limit=limit):
            z = model(x)
            logits.append(z.reshape(-1, z.shape[-1]).numpy())
            labels.append(y.reshape(-1).numpy())
    return np.concatenate(logits), np.concatenate(labels)


# --- statistics and tables -----------------------------------------------------------------------

def table(header: list, rows: list) -> str:
    """hpcdistill.report.markdown_table (the one table helper), a missing value shown as an em dash."""
    from hpcdistill.report import markdown_table

    return markdown_table(header, rows, missing="—")


def mean_std(values) -> tuple[float, float, int]:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return math.nan, math.nan, 0
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0, len(vals)


def fmt(values, digits: int = 3, scale: float = 1.0, total: int | None = None) -> str:
    """'mean ± std' of the values that exist; '(k/n)' when only k of n runs produced one."""
    values = list(values)
    m, s, n = mean_std(values)
    if n == 0:
        return "—"
    text = f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}" if n > 1 else f"{m * scale:.{digits}f}"
    total = len(values) if total is None else total
    return text + (f" ({n}/{total})" if n < total else "")


def crossing_step(curve: list[tuple[int, float]], target: float) -> float | None:
    """First step at which a decreasing curve reaches `target` (linear interpolation between points)."""
    prev = None
    for step, value in curve:
        if value <= target:
            if prev is None or prev[1] == value:
                return float(step)
            s0, v0 = prev
            return s0 + (step - s0) * (v0 - target) / (v0 - value)
        prev = (step, value)
    return None
