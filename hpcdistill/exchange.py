"""Codistillation's teacher exchange: group leaders publish and discover checkpoints on a shared FS.

Layout: <directory>/group-<g>/step-<step:08d>.h5, the same checkpoint format as run checkpoints
(model/... arrays; meta with group, step, arch, health, time). Files appear atomically (write_h5), so
a reader sees whole files only. The writer deletes its older files, so a file listed by a reader may
vanish before it is opened: that is not an error, just a lost race. A peer group may crash or
diverge; its files must not poison the others, so every file is verified (checksum), checked for
architecture, non-finite weights and reported divergence before it is used as a teacher. Only h5py
reads these files: nothing from the shared filesystem is ever unpickled.
"""

from __future__ import annotations

import json
import math
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_path
from .checkpoints import CheckpointError, CheckpointManager, capture, model_part, numbered_files, read_h5
from .claims import GROUP_CLAIM, claim_dead
from .models import ModelError, diff_manifests


@dataclass
class PeerCheckpoint:
    group: int
    step: int
    path: Path
    arrays: dict
    meta: dict


def _non_finite_key(arrays: dict) -> str | None:
    for key, a in arrays.items():
        if not key.startswith("model/"):
            continue
        if isinstance(a, torch.Tensor):
            bad = a.is_floating_point() and not bool(torch.isfinite(a).all())
        else:
            bad = a.dtype.kind in "fc" and not bool(np.isfinite(a).all())
        if bad:
            return key
    return None


def _same_model(path: Path, expect):
    """A read_h5 check: the file's model record is one the reader accepts for that peer, and the file
    holds exactly the tensors of the model it describes (names, shapes, dtypes) and nothing else,
    known before any data is read. `expect(meta)` gives that model's manifest (None: not compared), or
    raises ModelError for a record the reader does not accept (refused with code "architecture"); None
    checks nothing."""
    if expect is None:
        return None

    def check(meta: dict, layout: dict) -> None:
        have = model_part(layout)
        others = sorted(k for k in layout if not k.startswith("model/"))
        if others:
            raise CheckpointError(path, f"wrong format: an exchange file holds model tensors only, not {others[:3]}")
        try:
            want = expect(meta)
        except ModelError as exc:
            raise CheckpointError(path, str(exc), "architecture") from None
        if want is not None and have != want:
            problem = diff_manifests(have, want, "the file", "the model its record describes")
            raise CheckpointError(path, f"another architecture: {problem}", "architecture")
    return check


def expect_record(record: dict, manifest: dict | None = None):
    """An `expect` for Exchange.freshest: the file's model record is `record` (as stored) and its
    tensors are `manifest` (None: not compared)."""
    expected = json.loads(json.dumps(record))  # as stored: tuples become lists

    def expect(meta: dict) -> dict | None:
        if meta.get("arch") != expected:
            raise ModelError(f"architecture {meta.get('arch')} but expected {expected}")
        return manifest
    return expect


GONE = "gone.json"  # in a group's directory: that group stopped early and publishes nothing more


class Exchange:
    """One group's view of the exchange directory (used by group leaders only)."""

    def __init__(self, directory, *, group: int, num_groups: int, keep: int = 3,
                 divergence_ratio: float = 4.0, exchange_id: str | None = None):
        if not 0 <= group < num_groups:
            raise ValueError(f"group {group} is not in 0..{num_groups - 1}")
        self.directory = Path(directory)
        self.exchange_id = exchange_id  # files of another codistillation (another id) are refused
        self.group = group
        self.num_groups = num_groups
        self.divergence_ratio = divergence_ratio
        self._own = CheckpointManager(self._group_dir(group), keep=keep)
        self._rejected: dict[int, dict[Path, tuple]] = {}  # peer -> {path: (inode, mtime_ns, size)}
        self.bytes_read = 0  # of peer files opened (a refused file counts: the filesystem served it)

    def _group_dir(self, group: int) -> Path:
        return self.directory / f"group-{group}"

    def snapshot(self, step: int, model, *, arch: dict, health: dict) -> tuple[dict, dict]:
        """This group's model at `step` as (arrays, meta) for `write`: a copy in host memory, so the
        group trains on while the file is written. `health` (e.g. {"train_loss": ..., "initial_loss":
        ...}) lets peers refuse a diverged teacher; `write` adds "finite" from the weights themselves."""
        arrays, meta = capture(model, step=step, arch=arch, rng=False,
                               meta={"group": self.group, "time": time.time(), "exchange_id": self.exchange_id})
        meta["health"] = dict(health)
        return arrays, meta

    def write(self, step: int, arrays: dict, meta: dict) -> Path:
        """Write a snapshot as this group's file of `step`, then delete this group's files beyond the
        newest `keep` (any thread: the file appears whole, by rename). The health record gains
        "finite" from the weights themselves here (0.7 ms of an mlp snapshot's 1 ms: off the loop)."""
        meta["health"]["finite"] = _non_finite_key(arrays) is None
        (self._group_dir(self.group) / GONE).unlink(missing_ok=True)  # publishing again (resumed)
        return self._own.save(step, arrays, meta)

    def publish(self, step: int, model, *, arch: dict, health: dict) -> Path:
        """snapshot + write, in the calling thread."""
        return self.write(step, *self.snapshot(step, model, arch=arch, health=health))

    def peers(self) -> list[int]:
        return [g for g in range(self.num_groups) if g != self.group]

    def mark_gone(self, reason: str) -> None:
        """Tell the peers this group will publish nothing more (it diverged), so that none waits for it."""
        path = self._group_dir(self.group) / GONE
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps({"group": self.group, "reason": reason, "time": time.time()}))

    def newest_step(self, peer: int) -> int | None:
        files = numbered_files(self._group_dir(peer))
        return files[0][0] if files else None

    def gone(self, peer: int) -> str | None:
        """Why nothing fresh will come from `peer` soon, or None: it marked itself gone (diverged, or
        stopped to resume later), the job training it is dead (its group claim has no heartbeat), or
        it has not started (no claim, no file: a late group does not hold the others back)."""
        gdir = self._group_dir(peer)
        if (gdir / GONE).exists():
            return "it left (gone.json)"
        dead = claim_dead(gdir / GROUP_CLAIM)
        if dead:
            return f"the job training it is gone ({dead})"
        if not (gdir / GROUP_CLAIM).exists() and self.newest_step(peer) is None:
            return "it has not started"
        return None

    def _problem(self, peer: int, step: int, arrays: dict, meta: dict) -> tuple[str, str] | None:
        """(code, reason) why a verified file must not be used as a teacher, or None. The metadata is
        the file's own word: any type is possible, and a wrong one is a refusal, not a crash."""
        if self.exchange_id is not None and meta.get("exchange_id") != self.exchange_id:
            return "another-run", (f"another run: {meta.get('exchange_id')!r} "
                                   f"(this codistillation is {self.exchange_id!r})")
        if meta.get("group") != peer:
            return "mismatch", f"group mismatch: file says group {meta.get('group')!r}, found in group-{peer}"
        if meta.get("step") != step:
            return "mismatch", f"step mismatch: file name says {step}, meta says {meta.get('step')!r}"
        bad_key = _non_finite_key(arrays)
        if bad_key is not None:
            return "non-finite", f"non-finite (NaN/inf) weights in {bad_key}"
        health = meta.get("health")
        if not isinstance(health, dict):
            return "format", f"health record is a {type(health).__name__}, not an object"
        if health.get("finite") is False:
            return "non-finite", "publisher reported non-finite weights"
        loss, initial = health.get("train_loss"), health.get("initial_loss")
        for name, value in (("train_loss", loss), ("initial_loss", initial)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                return "format", f"health {name} is a {type(value).__name__}, not a number"
        if loss is not None and not math.isfinite(loss):
            return "diverged", f"diverged: train_loss={loss}"
        if loss is not None and initial is not None and math.isfinite(initial) \
                and loss > self.divergence_ratio * initial:
            return "diverged", (f"diverged: train_loss {loss:.4g} > {self.divergence_ratio:g} x "
                                f"initial_loss {initial:.4g}")
        return None

    def freshest(self, peer: int, *, expect=None, min_step: int | None = None, max_step: int | None = None,
                 exclude_path_steps: set | None = None
                 ) -> tuple[PeerCheckpoint | None, list[tuple[Path, str]]]:
        """The newest usable checkpoint of `peer`, and the files refused on the way as [(path, code, reason)].

        `expect(meta)` accepts the file's model record (returning the manifest of the model it
        describes) or refuses it (ModelError, counted as "architecture"); see _same_model.
        `bytes_read` counts the files read.

        Files with step < min_step are not read (pass the step of the teacher in hand + 1 to read only
        newer ones), nor files with step > max_step. Files whose step or path is in `exclude_path_steps` are
        skipped. A refused file is remembered by (inode, mtime, size) and neither re-read nor re-reported
        until it changes.
        """
        exclude = exclude_path_steps or set()
        files = numbered_files(self._group_dir(peer))
        listed = {p for _, p in files}  # refused files that are gone are forgotten
        rejected = {p: sig for p, sig in self._rejected.get(peer, {}).items() if p in listed}
        self._rejected[peer] = rejected
        rejections = []
        for step, path in files:
            if min_step is not None and step < min_step:
                break
            if step in exclude or path in exclude or (max_step is not None and step > max_step):
                continue
            try:
                st = path.lstat()
            except FileNotFoundError:
                continue
            signature = (st.st_ino, st.st_mtime_ns, st.st_size)
            if rejected.get(path) == signature:
                continue
            if stat.S_ISLNK(st.st_mode):  # a link could lead out of the exchange directory
                code, reason = "symlink", "a symbolic link (the exchange directory holds files only)"
            else:
                try:
                    self.bytes_read += st.st_size
                    arrays, meta = read_h5(path, check=_same_model(path, expect))
                    problem = self._problem(peer, step, arrays, meta)
                except CheckpointError as e:
                    if not os.path.exists(path):  # deleted by the writer's rotation meanwhile
                        continue
                    problem = (e.code, e.reason)
                except Exception as e:  # noqa: BLE001 - nothing a file holds may crash the reader
                    problem = ("format", f"unusable ({type(e).__name__}: {e})")
                if problem is None:
                    return PeerCheckpoint(peer, step, path, arrays, meta), rejections
                code, reason = problem
            if code != "io":  # a transient read error is tried again next time
                rejected[path] = signature
            rejections.append((path, code, reason))
        return None, rejections
