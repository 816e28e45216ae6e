"""Shared fixtures: real `mpirun` launches and prepared datasets in temporary directories.

Two tiers: tests that start MPI (mpirun, srun, sbatch, or MPI initialised in the test process) carry
the `mpi` marker; `pytest -m "not mpi"` runs the rest, the fast tier. An unmarked test that starts
mpirun/srun/sbatch or initialises MPI in this process fails, saying so (`_tier_guard`).
Launch commands and job environments come from `hpcdistill.launch` (mpirun_command, job_env).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hpcdistill.launch import HPCDISTILL, job_env, mpirun_command

ROOT = Path(__file__).resolve().parents[1]
_no_mpirun = pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not found")


def needs_mpi(test):
    """Skipped where there is no mpirun; an `mpi` test (the slow tier)."""
    return pytest.mark.mpi(_no_mpirun(test))


LAUNCHERS = {"mpirun", "mpiexec", "orterun", "srun", "sbatch", "salloc"}


@pytest.fixture(autouse=True)
def _tier_guard(request, monkeypatch):
    """Fail a test without the `mpi` marker that starts MPI: a launcher in a subprocess, or MPI
    initialised in this process (mpi4py.MPI imported during the test)."""
    if request.node.get_closest_marker("mpi") is not None:
        yield
        return
    name = request.node.nodeid

    class Popen(subprocess.Popen):
        def __init__(self, args, *a, **kw):
            argv0 = args if isinstance(args, (str, bytes, os.PathLike)) else next(iter(args), "")
            if os.path.basename(os.fsdecode(argv0).split()[0] if argv0 else "") in LAUNCHERS:
                pytest.fail(f"{name} starts {os.fsdecode(argv0)!r} but is not marked @pytest.mark.mpi", pytrace=False)
            super().__init__(args, *a, **kw)

    monkeypatch.setattr(subprocess, "Popen", Popen)
    had_mpi = "mpi4py.MPI" in sys.modules
    yield
    if not had_mpi and "mpi4py.MPI" in sys.modules:
        pytest.fail(f"{name} initialised MPI in the test process but is not marked @pytest.mark.mpi", pytrace=False)


def run_mpi(np_: int, args: list[str], timeout: float = 300, check: bool = False,
            **settings) -> subprocess.CompletedProcess:
    """`mpirun -np N args...` with environment variables given as keyword arguments; with `check`,
    exit status 0 is asserted (the output's tail is the message)."""
    proc = subprocess.run(mpirun_command(np_, *args), env=job_env(**settings), capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)
    if check:
        assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def train(np_: int, run_dir: Path, timeout: float = 300, check: bool = True, env: dict | None = None,
          **settings) -> subprocess.CompletedProcess:
    """`mpirun -np N hpcdistill train` with HPCDISTILL_* settings given as keyword arguments (any case:
    `steps=5` and `STEPS=5` are both HPCDISTILL_STEPS), and other variables in `env`."""
    env = {**(env or {}), "HPCDISTILL_RUN_DIR": str(run_dir), "HPCDISTILL_RESUME": "never"}
    env.update({f"HPCDISTILL_{k.upper()}": v for k, v in settings.items()})
    return run_mpi(np_, [HPCDISTILL, "train"], timeout=timeout, check=check, **env)


def flip_stored_byte(path: Path, dataset: str, at: int = 0, mask: int = 0xFF) -> None:
    """Damage one byte of `dataset`'s stored data in the HDF5 file `path`, behind HDF5's back (bit rot,
    a bad copy): the file still opens, only a checksum can tell."""
    import h5py

    with h5py.File(path, "r") as f:
        ds = f[dataset].id
        offset = ds.get_offset() if ds.get_offset() is not None else ds.get_chunk_info(0).byte_offset
    with open(path, "r+b") as fh:
        fh.seek(offset + at)
        byte = fh.read(1)[0]
        fh.seek(offset + at)
        fh.write(bytes([byte ^ mask]))


def builtin_model(name: str = "mlp", input_shape=(1, 8, 8), num_classes: int = 10, args: str | None = None):
    """(model record, freshly built model) of a built-in model, as a training job would make them."""
    from hpcdistill.models import resolve_model

    spec = resolve_model(name, args)
    return spec.record(input_shape, num_classes), spec.build(input_shape, num_classes)


def summary(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def metrics(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / name).read_text().splitlines()]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """digits and text prepared once per session."""
    from hpcdistill.data import prepare

    d = tmp_path_factory.mktemp("datasets")
    prepare("digits", d)
    prepare("text", d)
    return d
