"""A directory of numbered checkpoints: save with rotation, find the newest one that is sound."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from .h5io import CheckpointError, read_h5, write_h5

log = logging.getLogger("hpcdistill.checkpoints")


def numbered_files(directory, prefix: str = "step") -> list[tuple[int, Path]]:
    """[(step, path)] of `prefix-<step>.h5` files in `directory`, newest first; [] if it does not exist."""
    pattern = re.compile(rf"{re.escape(prefix)}-(\d+)\.h5", re.ASCII)  # "\d" alone matches any Unicode digit
    try:
        names = [p for p in Path(directory).iterdir() if pattern.fullmatch(p.name)]
    except FileNotFoundError:
        return []
    return sorted(((int(pattern.fullmatch(p.name).group(1)), p) for p in names), reverse=True)


TEMPORARY_MAX_AGE = 3600.0  # a write in flight never takes an hour: older temporaries are a killed writer's


def remove_stale_temporaries(directory: Path) -> None:
    """Delete the hidden temporaries (atomic_path's ".<name>.<pid>.<tag>.tmp") that a SIGKILLed writer left."""
    now = time.time()
    for p in Path(directory).glob(".*.tmp"):
        try:
            if now - p.lstat().st_mtime > TEMPORARY_MAX_AGE:
                p.unlink()
        except OSError:
            pass


class CheckpointManager:
    """Keeps the newest `keep` checkpoints named f"{prefix}-{step:08d}.h5" in one directory.

    The directory holds one timeline: saving step s also deletes files with a higher step, which
    are left over from a run that was resumed from an earlier checkpoint (otherwise a later resume
    would jump back onto the abandoned timeline, and rotation could delete the file just written).
    """

    def __init__(self, directory, *, keep: int = 3, prefix: str = "step"):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = Path(directory)  # created on the first save: reading one must not write into it
        self.keep = keep
        self.prefix = prefix

    def save(self, step: int, arrays: dict, meta: dict) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = write_h5(self.directory / f"{self.prefix}-{step:08d}.h5", arrays, meta)
        remove_stale_temporaries(self.directory)
        timeline = []
        for s, p in numbered_files(self.directory, self.prefix):
            if s > step:
                p.unlink(missing_ok=True)
            else:
                timeline.append(p)
        for p in timeline[self.keep:]:
            p.unlink(missing_ok=True)
        return path

    def paths(self) -> list[Path]:
        """Checkpoint files, newest (highest step) first."""
        return [p for _, p in numbered_files(self.directory, self.prefix)]

    def latest_valid(self, check=None) -> tuple[Path, dict, dict] | None:
        """(path, arrays, meta) of the newest checkpoint that verifies (and passes `check`, see read_h5);
        bad files are logged and skipped."""
        for path in self.paths():
            try:
                arrays, meta = read_h5(path, check=check)
            except CheckpointError as e:
                log.warning("skipping checkpoint %s: %s", path, e.reason)
                continue
            return path, arrays, meta
        return None
