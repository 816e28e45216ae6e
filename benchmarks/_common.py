"""Helpers shared by the benchmarks: interleaved timing, medians, tables, the machine's description.
Jobs are launched with hpcdistill.launch (mpirun_command, job_env), as the tests and the reproduction do.

Every benchmark measures the baseline and the candidate in the same run, alternating them
repetition by repetition (ABAB...), so that noise from other work on the machine hits both alike,
and reports medians and the ratio of the medians.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess


def prepared(data_dir, dataset: str = "digits"):
    """`data_dir` (resolved) holding the built-in `dataset`, prepared with `hpcdistill data prepare` if
    it is not there yet."""
    from pathlib import Path

    from hpcdistill.launch import HPCDISTILL, job_env

    data_dir = Path(data_dir).resolve()
    if not (data_dir / dataset / "train.h5").exists():
        subprocess.run([HPCDISTILL, "data", "prepare", dataset], check=True, env=job_env(HPCDISTILL_DATA_DIR=data_dir))
    return data_dir


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def table(header, rows) -> str:
    """A markdown table of numbers (right-aligned): hpcdistill.report.markdown_table, the one table helper."""
    from hpcdistill.report import markdown_table

    return markdown_table(header, rows, align="right", missing="None")


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
        over = (f", {world_size} ranks on {cores} cores "
                f"({'oversubscribed' if world_size > cores else 'not oversubscribed'})")
    return (f"{cpu}, {cores} cores, {mpi}, load average {load}{over}, "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
