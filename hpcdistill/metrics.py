"""The run directory's records: metrics.jsonl lines and summary.json.

Each group's speaking rank appends to its own metrics file (several writers appending to one file
on a parallel filesystem may interleave), and summary.json is written once, atomically, by world rank 0.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from hpcdistill.atomic import atomic_path


def metrics_path(run_dir: Path, group: int, num_groups: int) -> Path:
    return Path(run_dir) / ("metrics.jsonl" if num_groups == 1 else f"metrics-g{group}.jsonl")


def checkpoint_dir(run_dir: Path, group: int, num_groups: int) -> Path:
    return Path(run_dir) / "checkpoints" / (f"group-{group}" if num_groups > 1 else "")


class MetricsWriter:
    """Appends one JSON object per line with `step`, `group` and `time` (seconds since start)."""

    def __init__(self, path: Path, group: int, t0: float, enabled: bool = True):
        self.path, self.group, self.t0, self.enabled = Path(path), group, t0, enabled

    def write(self, step: int, **values) -> None:
        if not self.enabled:
            return
        record = {"step": step, "group": self.group, "time": round(time.time() - self.t0, 4), **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def write_json_atomic(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=str)
        f.write("\n")
