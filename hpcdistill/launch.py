"""How a program starts a job: the `mpirun` command line and the job's environment.

The one launcher used by the tests, the benchmarks and the reproduction suite (each used to build its
own command line and environment, and they had drifted apart). A job started from Python is

    subprocess.run(mpirun_command(2, HPCDISTILL, "train"), env=job_env(mode="codistill", groups=2))

Nothing here imports torch or MPI: it is safe to import from a process that never starts MPI.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

PREFIX = "HPCDISTILL_"

#: The directory of the Python running this (a virtual environment's bin/): the `hpcdistill` entry
#: point installed with the package is there.
VENV_BIN = Path(sys.executable).parent

#: The `hpcdistill` command of this installation (the venv's entry point, else the one on PATH).
HPCDISTILL = str(VENV_BIN / "hpcdistill") if (VENV_BIN / "hpcdistill").exists() else (
    shutil.which("hpcdistill") or "hpcdistill")


def mpi_launcher(venv_bin: Path | None = None) -> tuple[str, str]:
    """(launcher, flavor) of the MPI an installation was built against: `scripts/setup.sh` records them
    in <venv>/hpcdistill-mpi.env (mpiexec.mpich and "mpich" for MPICC=mpicc.mpich); ("mpirun",
    "openmpi") when there is no record."""
    record = Path(venv_bin or VENV_BIN).parent / "hpcdistill-mpi.env"
    values = {}
    if record.is_file():
        for line in record.read_text().splitlines():
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values.get("HPCD_MPIEXEC") or "mpirun", values.get("HPCD_MPI_FLAVOR") or "openmpi"


def mpirun_command(np: int, *args, oversubscribe: bool = True, bind_to: str | None = "none",
                   venv_bin: Path | None = None) -> list[str]:
    """The launch command of `np` ranks running `args`, for the MPI the installation (`venv_bin`, default
    this one) was built against. Open MPI: `mpirun [--allow-run-as-root] [--oversubscribe] [--bind-to B]
    -np N args...`; MPICH (Hydra): `mpiexec.mpich [-bind-to B] -n N args...` (Hydra oversubscribes and
    runs as root without being asked).

    --allow-run-as-root is added when this process runs as root (containers, CI), --oversubscribe
    unless `oversubscribe=False` (more ranks than cores is the normal case on a laptop or CI). Ranks
    are not bound to cores by default (`bind_to="none"`): Open MPI binds jobs of np <= 2 to cores, so
    two jobs started side by side would both be pinned to core 0; `bind_to=None` leaves the MPI's
    default. Arguments are converted with str() (paths welcome).
    """
    launcher, flavor = mpi_launcher(venv_bin)
    if flavor == "mpich":
        cmd = [launcher] + (["-bind-to", bind_to] if bind_to is not None else [])
        return cmd + ["-n", str(int(np))] + [str(a) for a in args]
    cmd = [launcher]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    if oversubscribe:
        cmd.append("--oversubscribe")
    if bind_to is not None:
        cmd += ["--bind-to", bind_to]
    return cmd + ["-np", str(int(np))] + [str(a) for a in args]


def rank_pids(launcher_pid: int) -> dict[int, int]:
    """{world rank: pid} of the ranks a launcher (mpirun, mpiexec) started on this host: its children
    whose environment names their rank (OMPI_COMM_WORLD_RANK, or PMI_RANK under MPICH's Hydra). For
    tests and benchmarks that kill a rank (Linux /proc)."""
    pids = []
    for task in Path(f"/proc/{launcher_pid}/task").glob("*/children"):  # any of its threads may fork
        try:
            pids += [int(p) for p in task.read_text().split()]
        except OSError:
            continue
    out = {}
    for pid in pids:
        try:
            env = dict(v.split(b"=", 1) for v in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in v)
        except OSError:
            continue
        rank = env.get(b"OMPI_COMM_WORLD_RANK", env.get(b"PMI_RANK"))
        if rank is not None and rank.isdigit():
            out[int(rank)] = pid
    return out


def setting_name(key: str) -> str:
    """The environment variable of a setting: lower-case names are HPCDISTILL_ settings
    (`steps` -> HPCDISTILL_STEPS); any other name (HPCDISTILL_STEPS, PYTHONPATH) is taken as given."""
    return PREFIX + key.upper() if key.islower() else key


def job_env(base: Mapping[str, str] | None = None, **settings) -> dict[str, str]:
    """The environment of a job: `base` (default: this process's environment) without any stray
    HPCDISTILL_* variable, with OMP_NUM_THREADS=1 and MKL_NUM_THREADS=1 (ranks share the cores), this
    installation's bin directory first on PATH, then `settings`.

    A setting is given by its variable's name (`HPCDISTILL_MODE="sync"`, `PYTHONPATH=...`) or, for
    HPCDISTILL_* settings, by its lower-case name (`mode="sync"`, `run_dir=path`); values are
    converted with str() and a value of None removes the variable. Settings override everything above
    (OMP_NUM_THREADS included).
    """
    base = os.environ if base is None else base
    env = {k: str(v) for k, v in base.items() if not k.startswith(PREFIX)}
    env["OMP_NUM_THREADS"] = "1"
    env["MKL_NUM_THREADS"] = "1"
    path = env.get("PATH", "")
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{path}" if path else str(VENV_BIN)
    for key, value in settings.items():
        name = setting_name(key)
        if value is None:
            env.pop(name, None)
        else:
            env[name] = str(value)
    return env


def command_line(np: int, env: Mapping[str, str], *args: str, relative_to: str | Path | None = None) -> str:
    """The job as a person would type it, for logs and documents:
    `HPCDISTILL_A=1 HPCDISTILL_B=x mpirun -np N hpcdistill train`.

    Only the HPCDISTILL_* variables of `env` are shown (sorted; HPCDISTILL_RUN_DIR left out: every
    run has its own), then `args` (default: `hpcdistill train`); paths under `relative_to` are shown
    relative to it. The flags that only depend on the machine (--allow-run-as-root, --oversubscribe,
    --bind-to) are left out.
    """
    settings = " ".join(f"{k}={v}" for k, v in sorted(env.items())
                        if k.startswith(PREFIX) and k != PREFIX + "RUN_DIR")
    line = " ".join(x for x in (settings, f"mpirun -np {int(np)}", " ".join(args or ("hpcdistill", "train"))) if x)
    if relative_to is not None:
        line = line.replace(f"{Path(relative_to)}{os.sep}", "")
    return line
