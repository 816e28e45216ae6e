"""Distillation with real `mpirun` runs: a codistilled ensemble into a smaller student."""

from __future__ import annotations

import pytest

from conftest import builtin_model, summary, train

pytestmark = pytest.mark.mpi


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, data_dir):
    """A finished 2-group codistillation run (one rank per group) whose group models are the teachers;
    TEACHER_AGE=0 makes them the same in every run (the freshest file would depend on the groups' speeds)."""
    run = tmp_path_factory.mktemp("teacher") / "codistill"
    train(2, run, mode="codistill", groups=2, data_dir=data_dir, steps=300, teacher_age=0)
    return run


def test_distilled_student_beats_student_alone(tmp_path, data_dir, teacher_run):
    common = dict(data_dir=data_dir, model="mlp-small", steps=150, seed=3)
    train(2, tmp_path / "alone", **common)
    train(2, tmp_path / "distilled", mode="distill", teachers=teacher_run, temperature=4, distill_weight=0.7, **common)
    alone, distilled = summary(tmp_path / "alone"), summary(tmp_path / "distilled")
    a, d = alone["groups"][0], distilled["groups"][0]
    # here 0.944 / 0.232 against 0.914 / 0.334 (test accuracy / loss), the same in every run
    assert d["test_accuracy"] > a["test_accuracy"] and d["test_loss"] < a["test_loss"], (a, d)

    info = distilled["distill"]
    assert [p.rsplit("/", 3)[-3:] for p in info["teachers"]] == [
        ["checkpoints", "group-0", "step-00000300.h5"], ["checkpoints", "group-1", "step-00000300.h5"]]
    members = [g["test_accuracy"] for g in summary(teacher_run)["groups"]]
    assert info["teacher_member_test_accuracy"] == members  # the same files, evaluated again
    assert abs(info["teacher_test_accuracy"] - summary(teacher_run)["codistill"]["ensemble_test_accuracy"]) < 1e-12
    assert info["student_parameters"] * 10 < info["teacher_parameters"]
    assert (info["temperature"], info["alpha"], info["loss"]) == (4.0, 0.7, "soft")


def test_logit_matching_and_omitted_classes(tmp_path, data_dir, teacher_run):
    train(2, tmp_path / "logits", mode="distill", teachers=teacher_run, data_dir=data_dir, model="mlp-small",
          steps=100, lr=0.01, distill_loss="logits", distill_weight=1, omit_classes="3")
    s = summary(tmp_path / "logits")
    assert s["distill"]["loss"] == "logits" and s["distill"]["omitted_classes"] == [3]
    assert s["groups"][0]["test_accuracy"] > 0.5  # learned from soft targets alone, without any "3"


def test_a_teacher_that_does_not_verify_is_refused_before_training(tmp_path, data_dir, teacher_run):
    bad = tmp_path / "bad.h5"
    good = sorted((teacher_run / "checkpoints" / "group-0").glob("*.h5"))[-1]
    bad.write_bytes(good.read_bytes()[:1000])
    proc = train(2, tmp_path / "run", check=False, mode="distill", teachers=f"{good},{bad}", data_dir=data_dir,
                 steps=10)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "HPCDISTILL_TEACHERS: teacher refused" in proc.stderr and "bad.h5" in proc.stderr
    assert "truncated" in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before the first step


def test_a_teacher_for_another_dataset_is_refused_before_training(tmp_path, data_dir):
    from hpcdistill.checkpoints import CheckpointManager, capture
    arch, model = builtin_model("mlp", num_classes=5)  # digits has 10 classes
    arrays, meta = capture(model, step=1, arch=arch, rng=False)
    path = CheckpointManager(tmp_path / "teacher").save(1, arrays, meta)
    proc = train(2, tmp_path / "run", check=False, mode="distill", teachers=path, data_dir=data_dir, steps=10)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "teacher was trained for num_classes 5, this dataset has 10" in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_teachers_from_an_exchange_directory_and_its_status(tmp_path, data_dir, teacher_run):
    """`hpcdistill status` lists each group's newest step and state from the exchange files alone, and
    HPCDISTILL_TEACHERS=<exchange dir> distills from every group's final exchange file."""
    import json
    import shutil
    import subprocess

    from hpcdistill.launch import HPCDISTILL, job_env

    exchange = teacher_run / "exchange"
    proc = subprocess.run([HPCDISTILL, "status", str(exchange)], env=job_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "2 of 2 group(s) finished" in proc.stdout, proc.stdout + proc.stderr
    assert proc.stdout.count("| final ") == 2

    train(2, tmp_path / "student", mode="distill", teachers=exchange, data_dir=data_dir, model="mlp-small", steps=50)
    info = summary(tmp_path / "student")["distill"]
    assert [p.rsplit("/", 2)[-2:] for p in info["teachers"]] == [["group-0", "step-00000300.h5"],
                                                                ["group-1", "step-00000300.h5"]]
    members = [g["test_accuracy"] for g in summary(teacher_run)["groups"]]
    assert info["teacher_member_test_accuracy"] == members  # the final exchange files are the final models

    # a group that stopped before the end: its newest file is not final, and it says why
    copy = tmp_path / "exchange"
    shutil.copytree(exchange, copy)
    newest = sorted((copy / "group-1").glob("step-*.h5"))
    newest[-1].unlink()
    (copy / "group-1" / "gone.json").write_text(json.dumps({"reason": "stopped by SIGUSR2 at step 200"}))
    proc = subprocess.run([HPCDISTILL, "status", str(copy)], env=job_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and "1 of 2 group(s) finished" in proc.stdout, proc.stdout
    assert "left: stopped by SIGUSR2 at step 200" in proc.stdout
    proc = subprocess.run([HPCDISTILL, "status", str(tmp_path)], env=job_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "not an exchange directory" in proc.stderr
