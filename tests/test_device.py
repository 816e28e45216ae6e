"""HPCDISTILL_DEVICE and HPCDISTILL_PRECISION on a CPU machine: cuda without a GPU is refused before MPI
starts, bf16 autocast runs the forward passes in bfloat16 and the losses in fp32, and a bf16 run
trains. The CUDA paths themselves (one GPU per local rank, DC-ASGD's arithmetic on the device, the
CUDA RNG state in checkpoints) need a GPU: the tests at the end run where one is visible (skipped, and
counted as skipped, elsewhere), and scripts/gpu-check.sh checks a GPU machine end to end (issue 16)."""

from __future__ import annotations

import subprocess

import pytest
import torch

from hpcdistill.launch import HPCDISTILL, job_env


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: cuda is not refused here")
def test_device_cuda_without_a_gpu_exits_2_before_mpi(tmp_path, data_dir):
    proc = subprocess.run([HPCDISTILL, "train"], capture_output=True, text=True, timeout=120,
                          env=job_env(device="cuda", data_dir=data_dir, run_dir=tmp_path / "run"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "HPCDISTILL_DEVICE=cuda: no GPU is visible" in proc.stderr and "HPCDISTILL_DEVICE=cpu" in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing was started


def _objective(precision: str, kind: str = "task"):
    from hpcdistill.config import Settings
    from hpcdistill.training.objective import Objective

    return Objective(Settings(precision=precision, mode="sync"), 10, kind=kind)


def test_bf16_autocast_runs_the_forward_in_bfloat16_and_the_loss_in_fp32():
    from hpcdistill.models import resolve_model

    torch.manual_seed(0)
    model = resolve_model("mlp").build((1, 8, 8), 10)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    seen = []
    model.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    loss32, _ = _objective("fp32")(model, x, y, 0)
    loss16, _ = _objective("bf16")(model, x, y, 0)
    assert seen == [torch.float32, torch.bfloat16]  # the model's output under each precision
    assert loss32.dtype == loss16.dtype == torch.float32
    assert loss16.item() != loss32.item() and abs(loss16.item() - loss32.item()) < 0.05 * loss32.item()
    loss16.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


@pytest.mark.mpi
def test_a_bf16_codistill_run_trains(tmp_path, data_dir):
    from conftest import summary, train

    proc = train(2, tmp_path / "run", mode="codistill", groups=2, precision="bf16", device="cpu", steps=200,
                 exchange_every=20, burn_in=20, data_dir=data_dir)
    assert "precision bf16 (HPCDISTILL_DEVICE=cpu)" in proc.stdout + proc.stderr
    s = summary(tmp_path / "run")
    assert all(g["test_accuracy"] > 0.85 for g in s["groups"]), s["groups"]
    assert s["codistill"]["teachers_loaded"] >= 2


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU visible: CUDA paths need one")


@needs_cuda
def test_dc_delta_on_the_gpu_matches_the_host():
    """Async workers do DC-ASGD's arithmetic on the model's device: the same numbers as on the host."""
    from hpcdistill.strategies.dcasgd import dc_delta

    g, w_bak, w_now = (torch.randn(100_000, generator=torch.Generator().manual_seed(i)) for i in range(3))
    for rule, lam in (("dcasgd-c", 0.04), ("dcasgd-a", 2.0)):
        host, ms_host = dc_delta(g, w_bak, w_now, rule=rule, lr=0.1, lambda0=lam)
        dev, ms_dev = dc_delta(g.cuda(), w_bak.cuda(), w_now.cuda(), rule=rule, lr=0.1, lambda0=lam)
        torch.testing.assert_close(dev.cpu(), host, rtol=1e-5, atol=1e-7)
        if ms_host is not None:
            torch.testing.assert_close(ms_dev.cpu(), ms_host, rtol=1e-5, atol=1e-9)


@needs_cuda
@pytest.mark.mpi
@pytest.mark.parametrize("mode,np_", [("sync", 2), ("async", 3)])
def test_training_on_the_gpu(tmp_path, data_dir, mode, np_):
    """Ranks share the machine's GPU(s) (local rank mod GPUs); the run trains and says its device."""
    import json

    from hpcdistill.launch import mpirun_command

    run = tmp_path / "run"
    proc = subprocess.run(mpirun_command(np_, HPCDISTILL, "train"), capture_output=True, text=True, timeout=600,
                          env=job_env(mode=mode, device="cuda", data_dir=data_dir, run_dir=run, steps=100,
                                      resume="never"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "device cuda" in proc.stdout + proc.stderr
    assert json.loads((run / "summary.json").read_text())["groups"][0]["test_accuracy"] > 0.8
