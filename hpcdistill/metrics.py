"""The run directory's records: metrics.jsonl lines (with a CSV and TensorBoard copy) and summary.json.

Each group's speaking rank appends to its own metrics file (several writers appending to one file
on a parallel filesystem may interleave), and summary.json is written once, atomically, by world rank 0.
Beside each metrics file the same rows go to a CSV (`metrics.csv` / `metrics-g<group>.csv`, for a
spreadsheet) and to TensorBoard event files under `RUN_DIR/tensorboard/group-<group>/`
(`tensorboard --logdir runs/`); HPCDISTILL_CSV and HPCDISTILL_TENSORBOARD turn them off.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path

from hpcdistill.atomic import atomic_path

log = logging.getLogger("hpcdistill")

# Columns every row has, first in the CSV; the rest follow in the order they first appear.
FIXED_COLUMNS = ("step", "group", "time")


def metrics_path(run_dir: Path, group: int, num_groups: int) -> Path:
    return Path(run_dir) / ("metrics.jsonl" if num_groups == 1 else f"metrics-g{group}.jsonl")


def csv_path(jsonl: Path) -> Path:
    """metrics.jsonl -> metrics.csv, metrics-g1.jsonl -> metrics-g1.csv."""
    return Path(jsonl).with_suffix(".csv")


def tensorboard_dir(run_dir: Path, group: int) -> Path:
    """One TensorBoard run per group (every group, also a run with one), named group-<group>."""
    return Path(run_dir) / "tensorboard" / f"group-{group}"


def checkpoint_dir(run_dir: Path, group: int, num_groups: int) -> Path:
    return Path(run_dir) / "checkpoints" / (f"group-{group}" if num_groups > 1 else "")


def tensorboard_tag(key: str) -> str:
    """`val_loss` -> `val/loss`, `test_accuracy` -> `test/accuracy`, anything else `train/<key>`."""
    for split in ("val", "test"):
        if key.startswith(split + "_"):
            return f"{split}/{key[len(split) + 1:]}"
    return f"train/{key}"


def _scalar(value) -> float | None:
    """The value as a TensorBoard scalar, or None for what is not a number (text, lists, None, bools)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _cell(value) -> str:
    """A CSV cell: numbers as JSON writes them (full precision, NaN as NaN), text as it is, None empty."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value)


def read_records(path: Path) -> list[dict]:
    """The JSON objects of a metrics file; a torn line (a writer killed mid-line) is skipped."""
    records = []
    try:
        text = Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return records
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


class _CsvMirror:
    """metrics.csv: the rows of metrics.jsonl, one header holding every column seen.

    Columns appear over time (val_loss and val_accuracy only at evaluation steps, the distillation
    terms after the burn-in), and a CSV has one header. So: a row whose columns the header already
    has is appended (the usual case, cheap); a row with a new column makes the whole file be rewritten
    from metrics.jsonl with the union of the columns, to a temporary file renamed over the old one
    (atomic: a reader sees the old or the new file, both valid CSV). That happens a few times per run,
    not per row. The file is also rebuilt from metrics.jsonl when the writer opens, so a resumed run
    (or one whose CSV was deleted or was off before) has exactly the rows of its metrics.jsonl.
    A fixed column set known up front would not do: which columns exist depends on the mode, the
    update rule and the user's objective.
    """

    def __init__(self, jsonl: Path):
        self.jsonl, self.path = Path(jsonl), csv_path(jsonl)
        self.columns: list[str] = []
        self.rebuild()

    @staticmethod
    def _columns(records) -> list[str]:
        seen = dict.fromkeys(FIXED_COLUMNS)
        for rec in records:
            seen.update(dict.fromkeys(rec))
        return list(seen)

    def rebuild(self) -> None:
        records = read_records(self.jsonl)
        if not records and not self.path.exists():
            self.columns = []  # the header is written with the first row
            return
        self.columns = self._columns(records)
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(self.columns)
            w.writerows([_cell(rec.get(c)) for c in self.columns] for rec in records)

    def add(self, record: dict) -> None:
        """`record` was just appended to metrics.jsonl."""
        if not self.columns or not set(record) <= set(self.columns):
            self.rebuild()  # the new record is in metrics.jsonl already
            return
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([_cell(record.get(c)) for c in self.columns])


class _TensorBoard:
    """One SummaryWriter, opened at the first record. After a resume (event files already there)
    it is opened with purge_step = the first step it writes, so TensorBoard drops the events the
    stopped process logged after its last checkpoint (those steps are being redone)."""

    def __init__(self, log_dir: Path):
        self.log_dir, self.writer, self.failed = Path(log_dir), None, False

    def add(self, step: int, values: dict, walltime: float) -> None:
        if self.failed:
            return
        if self.writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:  # a dependency, but a metrics copy must not end a training run
                log.warning("TensorBoard event files are not written (%s); `pip install tensorboard`, or set "
                            "HPCDISTILL_TENSORBOARD=false to silence this", exc)
                self.failed = True
                return
            resumed = self.log_dir.is_dir() and any(self.log_dir.glob("events.out.tfevents.*"))
            self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=step if resumed else None,
                                        flush_secs=30)
        for key, value in values.items():
            v = _scalar(value)
            if v is not None:
                self.writer.add_scalar(tensorboard_tag(key), v, global_step=step, walltime=walltime)
        self.writer.flush()  # a few small records per logged step; a killed job keeps what it logged

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class MetricsWriter:
    """Appends one JSON object per line with `step`, `group` and `time` (seconds since start), and
    the same row to the CSV beside it (`csv`) and to TensorBoard (`tensorboard`: a scalar per
    numeric value, tagged `train/<name>`, `val/<name>` for `val_<name>`, `test/<name>`, at `step`).
    Only the group's speaker has `enabled`; the others write nothing. Call close() at the end."""

    def __init__(self, path: Path, group: int, t0: float, enabled: bool = True, *,
                 csv: bool = True, tensorboard: bool = True):
        self.path, self.group, self.t0, self.enabled = Path(path), group, t0, enabled
        self._csv = _CsvMirror(self.path) if enabled and csv else None
        self._tb = _TensorBoard(tensorboard_dir(self.path.parent, group)) if enabled and tensorboard else None

    def write(self, step: int, **values) -> None:
        if not self.enabled:
            return
        now = time.time()
        record = {"step": step, "group": self.group, "time": round(now - self.t0, 4), **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._csv is not None:
            self._csv.add(record)
        if self._tb is not None:
            self._tb.add(step, values, now)

    def close(self) -> None:
        """Flush and close the TensorBoard writer (the JSON lines and the CSV are complete after every
        write). Idempotent; later writes go on to the JSON lines and CSV, and reopen TensorBoard."""
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def numbers(values: dict) -> dict:
    """Loss parts as Python numbers. The objective hands back 0-d tensors so that a GPU step never waits
    for the device; the loop's log steps and the exchange's publish steps call this, and wait there."""
    return {k: v.item() if hasattr(v, "item") else v for k, v in values.items()}


def write_json_atomic(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=str)
        f.write("\n")
