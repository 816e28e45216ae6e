"""scripts/setup.sh's choice of build (HPCD_SETUP_PLAN=1 prints it and stops): CPU here, the CUDA
build where a GPU and a toolkit are visible, a clear refusal where a GPU has no toolkit. The GPU
machine is faked with stand-in `nvidia-smi` and `nvcc` programs on PATH: nothing is installed."""

import os
import subprocess

import pytest

from conftest import ROOT

SMI = "#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-0)'\necho 'GPU 1: NVIDIA H200 (UUID: GPU-1)'\n"


def nvcc(release):
    return f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.41'\n"


def plan(tmp_path, *, smi=None, nvcc_text=None, cuda_home=False, **env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    programs = {"nvidia-smi": smi}
    if nvcc_text and not cuda_home:
        programs["nvcc"] = nvcc_text
    for name, text in programs.items():
        if text:
            (bin_dir / name).write_text(text)
            (bin_dir / name).chmod(0o755)
    # this machine's own PATH without the directories holding a real nvcc (a CUDA toolkit is installed
    # here; no GPU is): the stand-ins decide
    path = [d for d in os.environ["PATH"].split(":") if d and not os.path.exists(os.path.join(d, "nvcc"))]
    full = {**os.environ, "PATH": ":".join([str(bin_dir), *path]), "HPCD_SETUP_PLAN": "1",
            "VENV_DIR": str(tmp_path / "venv"), **env}
    full.pop("CUDA_HOME", None)
    if cuda_home:  # a toolkit that is not on PATH, named by CUDA_HOME
        home = tmp_path / "cuda"
        (home / "bin").mkdir(parents=True)
        (home / "bin" / "nvcc").write_text(nvcc_text)
        (home / "bin" / "nvcc").chmod(0o755)
        full["CUDA_HOME"] = str(home)
    proc = subprocess.run(["bash", ROOT / "scripts" / "setup.sh"], env=full, capture_output=True, text=True,
                          timeout=120)
    values = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line and not line.startswith("["))
    return proc, values


@pytest.mark.parametrize("toolkit", [None, "13.0"])
def test_cpu_machine_keeps_the_cpu_build(tmp_path, toolkit):
    """No GPU: the CPU build, with or without a CUDA toolkit installed (this machine has one)."""
    proc, v = plan(tmp_path, nvcc_text=toolkit and nvcc(toolkit))
    assert proc.returncode == 0, proc.stderr
    assert v == {"build": "cpu", "cuda_tag": "cpu", "cuda_home": "", "torch_index": "",
                 "horovod_gpu_operations": "none"}
    assert not (tmp_path / "venv").exists()  # the plan installs nothing


@pytest.mark.parametrize("release,tag", [("12.4", "cu126"), ("12.8", "cu128"), ("12.9", "cu128"), ("13.0", "cu130")])
def test_gpu_with_toolkit_builds_for_cuda_and_nccl(tmp_path, release, tag):
    proc, v = plan(tmp_path, smi=SMI, nvcc_text=nvcc(release))
    assert proc.returncode == 0, proc.stderr
    assert v["build"] == "gpu" and v["cuda_tag"] == tag and v["horovod_gpu_operations"] == "NCCL"
    assert v["torch_index"] == f"https://download.pytorch.org/whl/{tag}"
    assert v["cuda_home"] == str(tmp_path)  # nvcc's bin/.. when CUDA_HOME is not set
    assert "GPUs visible: 2" in proc.stdout


def test_cuda_home_names_the_toolkit(tmp_path):
    proc, v = plan(tmp_path, smi=SMI, nvcc_text=nvcc("12.8"), cuda_home=True)
    assert proc.returncode == 0, proc.stderr
    assert v["build"] == "gpu" and v["cuda_home"] == str(tmp_path / "cuda") and v["cuda_tag"] == "cu128"


def test_gpu_without_toolkit_says_what_to_load(tmp_path):
    proc, _ = plan(tmp_path, smi=SMI)
    assert proc.returncode != 0
    assert "2 GPU(s) visible but no CUDA toolkit" in proc.stderr and "module load cuda" in proc.stderr
    proc, v = plan(tmp_path, smi=SMI, HPCD_CUDA="no")  # the way out it names
    assert proc.returncode == 0 and v["build"] == "cpu"


def test_bad_choices_are_refused(tmp_path):
    proc, _ = plan(tmp_path, smi=SMI, nvcc_text=nvcc("11.8"))
    assert proc.returncode != 0 and "CUDA 11.8" in proc.stderr and "HPCD_TORCH_INDEX" in proc.stderr
    proc, _ = plan(tmp_path, HPCD_CUDA="maybe")
    assert proc.returncode != 0 and "HPCD_CUDA=maybe" in proc.stderr


@pytest.mark.parametrize("env,device,warned", [
    ({"SLURM_GPUS_ON_NODE": "4", "SLURM_TASKS_PER_NODE": "4(x2)"}, "cuda", False),
    ({"SLURM_GPUS_ON_NODE": "4", "SLURM_TASKS_PER_NODE": "8"}, "cuda", True),
    ({"SLURM_GPUS_ON_NODE": "2", "SLURM_TASKS_PER_NODE": "2", "HPCDISTILL_DEVICE": "cpu"}, "cpu", False),
    ({"SLURM_TASKS_PER_NODE": "4"}, "", False),                        # a CPU job: nothing changes
])
def test_slurm_jobs_given_gpus_train_on_them(env, device, warned):
    """slurm/common.sh's hpcd_gpus, the part of every template that reads the job's GPUs (the local
    Slurm of test_slurm has none to give)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "HPCDISTILL_"))}
    script = f'source "{ROOT}/slurm/common.sh"; hpcd_gpus; echo "device=$HPCDISTILL_DEVICE"'
    proc = subprocess.run(["bash", "-c", script], env={**base, **env}, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == f"device={device}"
    assert ("--ntasks-per-node=" in proc.stdout) == warned
