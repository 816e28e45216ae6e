"""A user's own package (tests/userpkg: a BatchNorm model and a dataset factory with augmentation,
which hpcdistill never saw) trained in every mode with only environment variables and PYTHONPATH set;
every bad-input case refused before MPI starts; exported teachers; exact resume mid-epoch."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from hpcdistill.checkpoints import CheckpointManager, read_h5
from hpcdistill.launch import HPCDISTILL, job_env, mpirun_command

from conftest import ROOT, summary, train

TESTS = Path(__file__).resolve().parent
USER = {"model": "userpkg.models:bn_net", "dataset": "userpkg.data:blobs"}


@pytest.fixture(scope="module", autouse=True)
def userpkg_on_pythonpath():
    """As a user would: the package's parent directory on PYTHONPATH, nothing else."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", str(TESTS))
        yield


def _newest(run: Path, group: str = "") -> tuple[dict, dict]:
    path, arrays, meta = CheckpointManager(run / "checkpoints" / group).latest_valid()
    return arrays, meta


@pytest.fixture(scope="module")
def codistill_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("user") / "codistill"
    train(4, run, mode="codistill", groups=2, steps=150, **USER)
    return run


@pytest.mark.mpi
def test_sync_trains_a_user_batchnorm_model_and_records_its_factory(tmp_path):
    run = tmp_path / "sync"
    train(2, run, steps=150, model_args='{"width": 8}', **USER)
    g = summary(run)["groups"][0]
    assert g["test_accuracy"] > 0.75 and g["val_accuracy"] > 0.75, g  # 4 classes: chance is 0.25
    assert summary(run)["model"] == "userpkg.models:bn_net"
    arrays, meta = _newest(run)
    assert meta["arch"] == {"name": "userpkg.models:bn_net", "factory": "userpkg.models:bn_net",
                            "args": {"width": 8}, "input_shape": [1, 6, 6], "num_classes": 4}
    assert meta["manifest"]["model/1.running_var"] == [[8], "float32"]
    assert meta["manifest"]["model/1.num_batches_tracked"] == [[], "int64"]
    # BatchNorm statistics were learned (not the initial 0/1) and went into the checkpoint
    assert np.abs(np.asarray(arrays["model/1.running_mean"])).max() > 0.01
    assert int(np.asarray(arrays["model/1.num_batches_tracked"])) == 150


@pytest.mark.mpi
def test_codistill_groups_load_each_others_user_models(codistill_run):
    s = summary(codistill_run)
    c = s["codistill"]
    assert c["teachers_loaded"] >= 2 and c["teachers_rejected"] == 0, c
    assert all(g["test_accuracy"] > 0.7 for g in s["groups"]), s["groups"]
    for g in (0, 1):
        assert _newest(codistill_run, f"group-{g}")[1]["arch"]["factory"] == "userpkg.models:bn_net"


@pytest.mark.mpi
def test_async_workers_train_a_user_model_and_keep_their_own_batchnorm_statistics(tmp_path):
    """Buffers are not in the RMA windows: each worker keeps its own, and the lead worker's go into
    evaluation and the checkpoint (here: learned statistics, counted over the lead worker's batches)."""
    run = tmp_path / "async"
    train(3, run, mode="async", steps=120, **USER)
    s = summary(run)
    assert s["async"]["workers"] == 2 and s["async"]["updates"] == 240
    assert s["groups"][0]["test_accuracy"] > 0.6, s["groups"]
    arrays, meta = _newest(run)
    assert meta["step"] == 120 and int(np.asarray(arrays["model/1.num_batches_tracked"])) == 120
    assert np.abs(np.asarray(arrays["model/1.running_mean"])).max() > 0.01


@pytest.mark.mpi
def test_distill_from_the_codistill_run_into_a_smaller_model_of_the_same_package(tmp_path, codistill_run):
    run = tmp_path / "student"
    train(2, run, mode="distill", teachers=codistill_run, steps=150, model_args='{"width": 2}', **USER)
    d = summary(run)["distill"]
    assert len(d["teachers"]) == 2 and d["student_parameters"] * 5 < d["teacher_parameters"]
    assert abs(d["teacher_test_accuracy"] - summary(codistill_run)["codistill"]["ensemble_test_accuracy"]) < 1e-12
    assert summary(run)["groups"][0]["test_accuracy"] > 0.7


@pytest.mark.mpi
@pytest.mark.parametrize("fmt,suffix", [("safetensors", ".safetensors"), ("torch", ".pt")])
def test_exported_teacher_distills_and_a_misfit_one_is_refused_naming_both_sides(tmp_path, codistill_run, fmt, suffix):
    ckpt = CheckpointManager(codistill_run / "checkpoints" / "group-0").paths()[0]
    out = tmp_path / f"teacher{suffix}"
    proc = subprocess.run([HPCDISTILL, "export", str(ckpt), "--format", fmt, "--out", str(out)], env=job_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and out.exists(), proc.stderr
    if fmt == "safetensors":
        from safetensors.torch import load_file
        state = load_file(str(out))
    else:
        state = torch.load(out, weights_only=True)
    arrays, _ = read_h5(ckpt)
    assert set(state) == {k.removeprefix("model/") for k in arrays if k.startswith("model/")}
    assert all(np.array_equal(state[k].numpy(), np.asarray(arrays[f"model/{k}"])) for k in state)

    common = dict(mode="distill", teachers=out, teacher_model="userpkg.models:bn_net", steps=60,
                  model_args='{"width": 2}', **USER)
    train(2, tmp_path / "ok", teacher_model_args='{"width": 8}', **common)
    assert summary(tmp_path / "ok")["distill"]["teacher_parameters"] == sum(
        v.numel() for k, v in state.items() if "running" not in k and "tracked" not in k)
    proc = train(2, tmp_path / "misfit", check=False, teacher_model_args='{"width": 4}', **common)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "0.weight: the file (8, 1, 3, 3) float32, the model userpkg.models:bn_net builds (4, 1, 3, 3)" in proc.stderr
    assert not (tmp_path / "misfit" / "metrics.jsonl").exists()


@pytest.mark.mpi
def test_a_teacher_checkpoint_whose_tensors_do_not_match_its_record_is_refused(tmp_path, codistill_run):
    """A file claiming width 2 but holding width-8 tensors: refused from its metadata alone."""
    from hpcdistill.checkpoints import write_h5

    ckpt = CheckpointManager(codistill_run / "checkpoints" / "group-0").paths()[0]
    arrays, meta = read_h5(ckpt)
    meta["arch"]["args"] = {"width": 2}
    write_h5(tmp_path / "lying.h5", arrays, meta)
    proc = train(2, tmp_path / "run", check=False, mode="distill", teachers=tmp_path / "lying.h5", steps=20, **USER)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "its tensors do not match its model record" in proc.stderr and "(8, 1, 3, 3)" in proc.stderr
    # a record naming code the job does not name is refused too, whatever its tensors
    meta["arch"] = {**meta["arch"], "factory": "os:system", "args": {}}
    write_h5(tmp_path / "foreign.h5", arrays, meta)
    proc = train(2, tmp_path / "run2", check=False, mode="distill", teachers=tmp_path / "foreign.h5", steps=20, **USER)
    assert proc.returncode == 2 and "'os:system', which this job does not name" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.mpi
def test_resume_mid_epoch_is_bit_identical_even_with_loader_workers(tmp_path):
    """The reference runs 60 steps with 0 loader workers. A second run is the reference's directory
    cut back to its step-40 checkpoint (15 batches per epoch: epoch 2, batch 10), resumed with 2 loader workers:
    its step-60 weights, optimizer state and BatchNorm statistics are the reference's, bit for bit
    (the augmentation noise is drawn per sample from (seed, epoch, row), not from worker state)."""
    common = dict(steps=60, checkpoint_every=10, keep_checkpoints=10, seed=5, **USER)
    reference = tmp_path / "reference"
    train(2, reference, **common)
    resumed = tmp_path / "resumed"
    shutil.copytree(reference, resumed)
    (resumed / "summary.json").unlink()
    for p in (resumed / "checkpoints").glob("step-*.h5"):
        if int(p.stem.split("-")[1]) > 40:
            p.unlink()
    assert read_h5(CheckpointManager(resumed / "checkpoints").paths()[0])[1]["data_state"] == {"epoch": 2, "batch": 10}
    proc = train(2, resumed, resume="auto", loader_workers=2, **common)
    assert "resuming from" in proc.stdout and "(step 40)" in proc.stdout
    ref, got = _newest(reference)[0], _newest(resumed)[0]
    assert ref.keys() == got.keys()
    assert [k for k in ref if not np.array_equal(np.asarray(ref[k]), np.asarray(got[k]))] in ([], ["extra/rng"])
    assert summary(resumed)["groups"][0]["test_loss"] == summary(reference)["groups"][0]["test_loss"]


@pytest.mark.mpi
def test_token_data_from_a_user_factory_trains(tmp_path):
    run = tmp_path / "tokens"
    train(1, run, model="userpkg.models:tagger", dataset="userpkg.data:tokens", steps=150, lr=0.03)
    g = summary(run)["groups"][0]
    assert g["test_accuracy"] > 0.9, g  # a fixed next-token map: learnable exactly


# --- bad input: refused before MPI, exit 2, naming the variable, the value and the fix ---------------
BAD = [
    (dict(model="userpkg.broken:model"), "HPCDISTILL_MODEL='userpkg.broken:model': module 'userpkg.broken' does "
     "not import (ModuleNotFoundError: No module named 'not_installed_dependency_xyz')"),
    (dict(model="userpkg.nosuch:model"), "module 'userpkg.nosuch' does not import"),
    (dict(model="userpkg.models:missing"), "'userpkg.models' has no attribute 'missing'"),
    (dict(model="userpkg.models:not_callable"), "int object is not callable"),
    (dict(model="userpkg.models"), None),  # no colon: an unknown built-in name
    (dict(model_args='["width", 8]'), "HPCDISTILL_MODEL_ARGS='[\"width\", 8]': a JSON list, expected a JSON object"),
    (dict(model_args='{"width": 8'), "HPCDISTILL_MODEL_ARGS"),
    (dict(model_args='{"depth": 3}'), "raised TypeError: bn_net() got an unexpected keyword argument 'depth'"),
    (dict(model="userpkg.models:raises"), "raised RuntimeError: the factory is broken on purpose"),
    (dict(model="userpkg.models:not_a_module"), "returned a dict, not a torch.nn.Module"),
    (dict(model="userpkg.models:wrong_classes"), "to (2, 5), expected logits (2, 4)"),
    (dict(dataset="userpkg.data:no_num_classes"), "num_classes attribute is None"),
    (dict(dataset="userpkg.data:raises"), "factory('train', **{}) raised OSError: cannot open the train files"),
    (dict(dataset="userpkg.data:not_a_dataset"), "returned a int, not a map-style torch.utils.data.Dataset"),
    (dict(dataset_args='{"classes": 1}'), "num_classes attribute is 1"),
    (dict(teacher_model="userpkg.models:missing"), "HPCDISTILL_TEACHER_MODEL='userpkg.models:missing'"),
]


@pytest.mark.parametrize("settings,message", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_user_code_and_arguments_fail_before_mpi(monkeypatch, settings, message):
    from hpcdistill import preflight
    from hpcdistill.config import ConfigError, load_settings
    from hpcdistill.data import DataError
    from hpcdistill.models import ModelError

    for k in list(os.environ):
        if k.startswith("HPCDISTILL_"):
            monkeypatch.delenv(k)
    for k, v in {**USER, **settings}.items():
        monkeypatch.setenv(f"HPCDISTILL_{k.upper()}", v)
    with pytest.raises((ConfigError, DataError, ModelError)) as err:
        preflight.check(load_settings())
    text = str(err.value)
    if message is None:
        assert "unknown model" in text and "package.module:callable" in text
    else:
        assert message in text, text


@pytest.mark.mpi
@pytest.mark.parametrize("settings,message", [BAD[0], BAD[11]], ids=["model", "dataset"])
def test_bad_user_code_exits_2_under_mpirun_and_in_config(tmp_path, settings, message):
    env = job_env(**{**USER, **settings}, run_dir=tmp_path / "run")
    for cmd in (mpirun_command(2, HPCDISTILL, "train"), [HPCDISTILL, "config"]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert proc.returncode == 2 and message in proc.stderr, (cmd, proc.stderr[-2000:])
    assert not (tmp_path / "run").exists()  # nothing started


@pytest.mark.mpi
def test_a_bad_label_or_a_nan_input_met_mid_run_is_a_data_error_not_a_crash_or_divergence(tmp_path):
    """Sample 500 of the train split (a user's dataset is not scanned up front) has label 12 of 4
    classes, or a NaN pixel: the batch holding it stops the job with exit 2 and says what and where,
    instead of an IndexError or "training diverged: lower the LR"."""
    for flaw, phrase in (("label", "holds labels 0..12 (torch.int64), outside [0, 4)"),
                         ("nan", "holds NaN or infinite inputs")):
        proc = train(2, tmp_path / flaw, check=False, model="userpkg.models:bn_net", dataset="userpkg.data:mislabelled",
                     dataset_args=f'{{"flaw": "{flaw}"}}', steps=60, data_split="shared")
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert ("HPCDISTILL_DATASET=userpkg.data:mislabelled" in proc.stderr
                and phrase in proc.stderr), proc.stderr[-2000:]
        assert "diverged" not in proc.stdout + proc.stderr
