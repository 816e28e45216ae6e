"""Shared fixtures: real `mpirun` launches and prepared datasets in temporary directories."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HPCDISTILL = str(BIN / "hpcdistill")
needs_mpi = pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not found")


def mpirun_cmd(np_: int, *args: str) -> list[str]:
    cmd = ["mpirun", "--oversubscribe", "-np", str(np_)]
    if os.geteuid() == 0:
        cmd.insert(1, "--allow-run-as-root")
    return cmd + list(args)


def clean_env(**settings) -> dict:
    """The test process's environment without stray HPCDISTILL_* settings, plus `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPCDISTILL_")}
    env.update({"OMP_NUM_THREADS": "1", "PATH": f"{BIN}:{env.get('PATH', '')}"})
    env.update({k: str(v) for k, v in settings.items()})
    return env


def run_mpi(np_: int, args: list[str], timeout: float = 300, check: bool = False,
            **settings) -> subprocess.CompletedProcess:
    """`mpirun -np N args...` with environment variables given as keyword arguments; with `check`,
    exit status 0 is asserted (the output's tail is the message)."""
    proc = subprocess.run(mpirun_cmd(np_, *map(str, args)), env=clean_env(**settings), capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)
    if check:
        assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def train(np_: int, run_dir: Path, timeout: float = 300, check: bool = True, **settings) -> subprocess.CompletedProcess:
    """`mpirun -np N hpcdistill train` with HPCDISTILL_* settings given as keyword arguments."""
    env = {"HPCDISTILL_RUN_DIR": str(run_dir), "HPCDISTILL_RESUME": "never"}
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
