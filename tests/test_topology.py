"""Topology under a real `mpirun -np 4`: groups, process sets, leaders; allreduce stays in the group."""

from __future__ import annotations

import json
import sys

import pytest

from hpcdistill.launch import HPCDISTILL

from conftest import ROOT, run_mpi

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_groups_process_sets_and_leaders(tmp_path, groups):
    out = tmp_path / "topo.json"
    proc = run_mpi(4, [sys.executable, str(ROOT / "tests/mpi/topology_check.py"), str(groups), str(out)], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    per = 4 // groups
    assert [r["rank"] for r in rows] == [0, 1, 2, 3]
    for r in rows:
        g = r["rank"] // per
        members = list(range(g * per, (g + 1) * per))
        assert r["group"] == g and r["group_ranks"] == members and r["group_size"] == per == r["group_comm_size"]
        assert r["group_rank"] == r["rank"] - g * per
        assert r["leader"] == (r["rank"] == members[0]) == r["in_leaders_comm"]
        assert r["leader_world_rank"] == members[0]
        # Each rank contributed 10**rank: the sum shows exactly which ranks took part.
        assert r["allreduce"] == sum(10.0 ** m for m in members)
        assert r["device"] == "cpu" and r["tag"] == f"[g{g} r{r['group_rank']}/{per} w{r['rank']}]"


def test_doctor_passes_under_mpirun(tmp_path):
    proc = run_mpi(4, [HPCDISTILL, "doctor", "--run-dir", str(tmp_path)], timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "4 rank(s)" in out and "all checks passed" in out
    assert "2 group(s) of 2 rank(s)" in out and "sum 800/800" in out and "MPI_THREAD_MULTIPLE" in out
    import torch

    if not torch.cuda.is_available():
        assert "ok   CUDA / NCCL        no GPU visible" in out and "training runs on the CPU" in out


def test_doctor_fails_with_a_remedy_when_hdf5_cannot_write(tmp_path):
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("x")
    proc = run_mpi(1, [HPCDISTILL, "doctor", "--run-dir", str(blocked / "sub")], timeout=120)
    assert proc.returncode != 0
    assert "FAIL HDF5 file locking" in proc.stdout and "fix:" in proc.stdout
