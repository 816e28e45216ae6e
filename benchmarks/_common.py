"""Helpers shared by the benchmarks: interleaved timing, medians, tables, the machine's description.

Every benchmark measures the baseline and the candidate in the same run, alternating them
repetition by repetition (ABAB...), so that noise from other work on the machine hits both alike,
and reports medians and the ratio of the medians.
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def table(header, rows) -> str:
    rows = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|", *map(line, rows)])


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if n == int(n) else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def machine(world_size: int | None = None) -> str:
    """One line: CPU model, cores, load, MPI, and whether the ranks oversubscribe the cores."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = os.cpu_count() or 1
    try:
        mpi = subprocess.run(["mpirun", "--version"], capture_output=True, text=True, timeout=10).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        mpi = "mpirun ?"
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    over = ""
    if world_size is not None:
        over = f", {world_size} ranks on {cores} cores ({'oversubscribed' if world_size > cores else 'not oversubscribed'})"
    return f"{cpu}, {cores} cores, {mpi}, load average {load}{over}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"


def train_env(**settings) -> dict:
    """This process's environment without stray HPCDISTILL_* settings, plus `settings`, for a job."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPCDISTILL_")}
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update({k: str(v) for k, v in settings.items()})
    return env


def train_cmd(np_: int) -> list[str]:
    """`mpirun -np N hpcdistill train`, unbound (Open MPI binds np <= 2 jobs to cores, and two jobs
    started side by side would share core 0)."""
    cmd = [shutil.which("mpirun") or "mpirun", "--oversubscribe", "--bind-to", "none", "-np", str(np_),
           str(VENV_BIN / "hpcdistill"), "train"]
    if os.geteuid() == 0:
        cmd.insert(1, "--allow-run-as-root")
    return cmd

