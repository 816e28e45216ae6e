"""`hpcdistill status EXCHANGE_DIR`: where each group of a codistillation stands, from its files alone.

For every `group-<g>/` of an exchange directory: its newest checkpoint's step, whether it is the
final one, its exchange id, how far it is behind the most advanced group, a `gone.json` reason
(diverged, or stopped on a signal and to be resumed), and the job training it now (its group claim),
or why that job is gone (a codistillation spanning jobs: which group's job to requeue). Only file
metadata is read (no tensor data), through the same schema checks as every other read of the shared
filesystem.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

from hpcdistill.checkpoints import CheckpointError, numbered_files, read_meta
from hpcdistill.claims import GROUP_CLAIM, claim_dead, read_claim
from hpcdistill.exchange import GONE

_GROUP = re.compile(r"group-(\d+)", re.ASCII)


def exchange_groups(directory: Path) -> list[tuple[int, Path]]:
    """[(group, its directory)] of an exchange directory, by group number."""
    found = [(int(m.group(1)), p) for p in Path(directory).iterdir()
             if p.is_dir() and not p.is_symlink() and (m := _GROUP.fullmatch(p.name))]
    return sorted(found)


def group_states(directory: Path) -> list[dict]:
    """One record per group: newest step, final, exchange id, file age, gone reason, refusal if any."""
    states = []
    for group, gdir in exchange_groups(directory):
        state = {"group": group, "step": None, "final": False, "exchange_id": None, "age_s": None,
                 "gone": None, "problem": None, "job": None, "dead": None}
        claim = read_claim(gdir / GROUP_CLAIM)
        if claim is not None:
            holder = claim[0]
            state["job"] = f"{holder.get('job') or 'pid ' + str(holder.get('pid'))} on {holder.get('host')}"
            state["dead"] = claim_dead(gdir / GROUP_CLAIM)
        files = numbered_files(gdir)
        if files:
            step, path = files[0]
            state["step"], state["age_s"] = step, time.time() - path.lstat().st_mtime
            try:
                meta = read_meta(path)
                health = meta.get("health") if isinstance(meta.get("health"), dict) else {}
                state["final"] = health.get("final") is True
                state["exchange_id"] = meta.get("exchange_id")
            except CheckpointError as exc:
                state["problem"] = f"{exc.code}: {exc.reason}"
        gone = gdir / GONE
        if gone.is_file() and not gone.is_symlink():
            try:
                reason = json.loads(gone.read_text()[:4096]).get("reason")
            except (OSError, ValueError, AttributeError):
                reason = "(unreadable gone.json)"
            state["gone"] = str(reason)
        states.append(state)
    return states


def status(directory: Path) -> int:
    """Print the table; exit 0 when every group has published its final checkpoint, else 1 (2: not
    an exchange directory)."""
    from hpcdistill.report import markdown_table  # the command's output only (teachers use group_states)

    directory = Path(directory)
    if not directory.is_dir() or not exchange_groups(directory):
        print(f"hpcdistill: {directory} is not an exchange directory (no group-<g>/ in it); give "
              "HPCDISTILL_EXCHANGE_DIR of a codistillation (default RUN_DIR/exchange)", file=sys.stderr)
        return 2
    states = group_states(directory)
    lead = max((s["step"] for s in states if s["step"] is not None), default=0)
    rows = []
    for s in states:
        behind = "" if s["step"] is None else str(lead - s["step"])
        what = ("final" if s["final"] else f"left: {s['gone']}" if s["gone"] else
                "refused: " + s["problem"] if s["problem"] else
                f"job gone: {s['dead']}" if s["dead"] else "nothing yet" if s["step"] is None else "training")
        rows.append([str(s["group"]), "" if s["step"] is None else str(s["step"]), behind, what,
                     str(s["exchange_id"] or ""), "" if s["age_s"] is None else f"{s['age_s']:.0f}",
                     "" if s["job"] is None or s["dead"] else s["job"]])
    print(markdown_table(["group", "newest step", "steps behind the lead", "state", "exchange id",
                          "file age s", "trained by"], rows))
    done = sum(s["final"] for s in states)
    print(f"\n{done} of {len(states)} group(s) finished")
    return 0 if done == len(states) else 1
