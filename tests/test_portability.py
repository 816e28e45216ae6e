"""The network path: Open MPI with its TCP transport only (`OMPI_MCA_btl=self,tcp`: no shared memory),
what ranks on different nodes use. The portability tier of the cluster issue: doctor, the topology
with its per-group Horovod, codistillation 2 x 2 and async RMA with 2 parameter hosts. A control
shows the setting takes effect: with `btl=self` alone two ranks cannot reach each other and the
same doctor fails."""

from __future__ import annotations

import json
import sys

import pytest

from hpcdistill.launch import HPCDISTILL

from conftest import ROOT, run_mpi, summary, train

pytestmark = pytest.mark.mpi

TCP = {"OMPI_MCA_btl": "self,tcp"}


def test_doctor_over_tcp_and_the_control(tmp_path):
    proc = run_mpi(2, [HPCDISTILL, "doctor", "--run-dir", str(tmp_path)], timeout=120, **TCP)
    assert proc.returncode == 0 and "all checks passed" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert "sum 400/400" in proc.stdout  # RMA accumulates over TCP
    control = run_mpi(2, [HPCDISTILL, "doctor", "--run-dir", str(tmp_path)], timeout=120, OMPI_MCA_btl="self")
    assert control.returncode != 0 and "unable to reach each other" in control.stdout + control.stderr


def test_topology_over_tcp(tmp_path):
    out = tmp_path / "topo.json"
    proc = run_mpi(4, [sys.executable, str(ROOT / "tests/mpi/topology_check.py"), "2", str(out)], timeout=120, **TCP)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [r["allreduce"] for r in rows] == [11.0, 11.0, 1100.0, 1100.0]  # each group sums its own ranks


def test_codistill_and_async_over_tcp(tmp_path, data_dir):
    train(4, tmp_path / "co", mode="codistill", groups=2, steps=60, exchange_every=20, burn_in=20,
          data_dir=data_dir, env=TCP)
    s = summary(tmp_path / "co")
    assert s["codistill"]["teachers_loaded"] >= 2 and all(g["test_accuracy"] > 0.5 for g in s["groups"])
    train(4, tmp_path / "async", mode="async", param_hosts="0:1", steps=40, data_dir=data_dir, env=TCP)
    a = summary(tmp_path / "async")["async"]
    assert a["workers"] == 2 and a["updates"] == 80
