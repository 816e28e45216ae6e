"""Codistillation with real `mpirun` runs: groups exchange HDF5 teachers, refuse bad ones, agree more."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from hpcdistill.checkpoints import CheckpointManager, model_arrays
from hpcdistill.checkpoints.manager import numbered_files
from hpcdistill.data import open_source
from hpcdistill.ensemble import ensemble_accuracy
from hpcdistill.exchange import Exchange
from hpcdistill.models import build_from_record
from hpcdistill.training import evaluate as ev

from conftest import ROOT, builtin_model, flip_stored_byte, metrics, run_mpi, summary, train

pytestmark = pytest.mark.mpi


def test_two_groups_codistill_on_four_ranks(tmp_path, data_dir):
    run = tmp_path / "run"
    out = tmp_path / "hashes.json"
    env = {"HPCDISTILL_MODE": "codistill", "HPCDISTILL_GROUPS": "2", "HPCDISTILL_RUN_DIR": str(run),
           "HPCDISTILL_DATA_DIR": str(data_dir), "HPCDISTILL_STEPS": "300", "HPCDISTILL_EXCHANGE_EVERY": "25",
           "HPCDISTILL_BURN_IN": "50", "HPCDISTILL_MAX_STALENESS": "100", "HPCDISTILL_LOG_EVERY": "5",
           "HPCDISTILL_RESUME": "never"}
    proc = run_mpi(4, [sys.executable, str(ROOT / "tests/mpi/train_and_hash.py"), str(out)], **env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # identical weights inside a group, different models across groups
    hashes = json.loads(out.read_text())
    by_group = {g: {h for gg, h in hashes.values() if gg == g} for g in (0, 1)}
    assert len(by_group[0]) == len(by_group[1]) == 1 and by_group[0] != by_group[1]

    s = summary(run)
    assert s["mode"] == "codistill" and s["num_groups"] == 2
    assert [g["ranks"] for g in s["groups"]] == [[0, 1], [2, 3]]
    assert all(g["test_accuracy"] >= 0.93 for g in s["groups"])
    c = s["codistill"]
    assert c["exchanges_published"] == 2 * (300 // 25 + 1)  # every 25 steps, plus the final model
    assert c["teachers_loaded"] >= 4 and c["teachers_rejected"] == 0
    assert 0 <= c["teacher_staleness"]["max"] <= 100
    # teachers read ahead by the leader's prefetcher are the same on both ranks of each group
    for g in c["groups"]:
        assert len(g["teacher_digests"]) == 2 and len(set(g["teacher_digests"])) == 1, g
    assert c["teachers_prefetched"] >= 1, c

    for g in (0, 1):  # the distillation term is exactly zero during burn-in and active after it
        recs = [m for m in metrics(run, f"metrics-g{g}.jsonl") if "distill_loss" in m]
        assert all(m["distill_loss"] == 0 for m in recs if m["step"] <= 50)
        late = [m for m in recs if m["step"] > 80]
        # the groups run independently; a peer too far behind (> MAX_STALENESS) is dropped, so on a
        # loaded machine not every late step has a teacher
        assert late and sum(m["teachers"] for m in late) >= 1
        assert all((m["distill_loss"] > 0) == (m["teachers"] == 1) for m in late)
        assert len(list((run / "exchange" / f"group-{g}").glob("*.h5"))) <= 3  # garbage-collected

    # churn and ensemble accuracy, recomputed here from the saved final group models
    probs = []
    for g in (0, 1):
        path, arrays, meta = CheckpointManager(run / "checkpoints" / f"group-{g}").latest_valid()
        assert meta["step"] == 300
        model = build_from_record(meta["arch"])
        model.load_state_dict(model_arrays(arrays))
        p, labels = ev.predict_probs(model, open_source("digits", data_dir).dataset("test"), batch_size=256,
                                     device="cpu")
        probs.append(p)
    assert c["churn"] == float((probs[0].argmax(1) != probs[1].argmax(1)).mean())
    assert c["churn_samples"] == len(labels) == 360
    assert abs(c["ensemble_test_accuracy"] - ensemble_accuracy(probs, labels)) < 1e-12


PLANTED = "planted"  # the exchange id the runs below are given, so that files planted beforehand belong to them


def _plant_bad_peer_files(exchange_dir: Path, data_dir: Path) -> dict[str, str]:
    """Write one bad checkpoint of each kind as group 1's newest files; return {file name: expected reason}."""
    ex = Exchange(exchange_dir, group=1, num_groups=2, keep=10, exchange_id=PLANTED)
    healthy = {"train_loss": 0.5, "initial_loss": 2.3}
    torch.manual_seed(0)
    arch, model = builtin_model("mlp")
    expected = {}

    path = ex.publish(1001, model, arch=arch, health=healthy)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    expected[path.name] = "truncated"

    path = ex.publish(1002, model, arch=arch, health=healthy)
    flip_stored_byte(path, "model/net.1.weight", at=100)
    expected[path.name] = "checksum"

    small, small_model = builtin_model("mlp-small")
    expected[ex.publish(1003, small_model, arch=small, health=healthy).name] = "architecture"

    broken = builtin_model("mlp")[1]
    with torch.no_grad():
        next(broken.parameters())[0, 0] = float("nan")
    expected[ex.publish(1004, broken, arch=arch, health=healthy).name] = "non-finite"

    expected[ex.publish(1005, model, arch=arch, health={"train_loss": 80.0, "initial_loss": 2.3}).name] = "diverged"

    path = ex.directory / "group-1" / "step-00001006.h5"
    path.write_bytes(os.urandom(4096))
    expected[path.name] = "not an HDF5 file"
    return expected


def test_bad_peer_checkpoints_are_refused_and_training_goes_on(tmp_path, data_dir):
    """Group 1 is slowed down and group 0 looks for teachers at step 1 (burn-in), so it first finds
    only the planted bad files; group 1 replaces them with real checkpoints later."""
    run = tmp_path / "run"
    expected = _plant_bad_peer_files(run / "exchange", data_dir)
    proc = train(2, run, mode="codistill", groups=2, data_dir=data_dir, steps=150, exchange_every=10, burn_in=1,
                 straggler_rank=1, straggler_delay=20, timeout=400, exchange_id=PLANTED)
    refused = [line for line in proc.stdout.splitlines() if "refused teacher" in line]
    for name, reason in expected.items():
        assert any(name in line and reason in line for line in refused), (name, reason, refused)
    assert all("[g0 r0/1 w0] WARNING" in line for line in refused)  # the leader of the reading group says it
    s = summary(run)
    assert s["codistill"]["teachers_rejected"] == len(expected)
    assert s["codistill"]["teachers_loaded"] >= 1  # group 1's real checkpoints were used once published
    assert all(g["steps"] == 150 for g in s["groups"])


def test_label_smoothing_control_uses_no_peers(tmp_path, data_dir):
    run = tmp_path / "control"
    train(2, run, mode="codistill", groups=2, codistill_target="label-smoothing", label_smoothing=0.2, burn_in=20,
          data_dir=data_dir, steps=60, log_every=5)
    s = summary(run)
    assert s["codistill"]["target"] == "label-smoothing" and s["codistill"]["teachers_loaded"] == 0
    assert not (run / "exchange").exists()
    recs = [m for m in metrics(run, "metrics-g0.jsonl") if "distill_loss" in m]
    assert all((m["distill_loss"] > 0) == (m["step"] > 20) for m in recs)


def test_stale_policy_wait_keeps_the_teacher_and_drop_loses_it(tmp_path, data_dir):
    """Group 1 runs 50x slower, and an old group-1 checkpoint (step 1) is already in the exchange
    directory, so group 0 has a teacher from the end of burn-in (step 10) whichever group started
    first. Group 0 then gets more than MAX_STALENESS=20 steps ahead of every group-1 file: "drop"
    trains on without that teacher, "wait" holds group 0 back until group 1 has published a fresh
    enough one, so the teacher never goes."""
    seen = {}
    for policy in ("drop", "wait"):
        run = tmp_path / policy
        torch.manual_seed(0)
        arch, model = builtin_model("mlp")
        Exchange(run / "exchange", group=1, num_groups=2, exchange_id=PLANTED).publish(
            1, model, arch=arch, health={"train_loss": 2.0, "initial_loss": 2.3})
        train(2, run, mode="codistill", groups=2, data_dir=data_dir, steps=60, exchange_every=10, burn_in=10,
              max_staleness=20, stale_policy=policy, straggler_rank=1, straggler_delay=49, log_every=5, timeout=400,
              exchange_id=PLANTED)
        s = summary(run)
        assert all(g["steps"] == 60 for g in s["groups"])
        seen[policy] = (s["codistill"], [m["teachers"] for m in metrics(run, "metrics-g0.jsonl")
                                         if "teachers" in m and m["step"] > 10])
    drop, drop_teachers = seen["drop"]
    assert drop["stale_policy"] == "drop" and drop["teachers_dropped"] >= 1 and drop["stale_waits"] == 0
    assert 0 in drop_teachers, drop_teachers  # steps trained without the stale peer
    wait, wait_teachers = seen["wait"]
    assert wait["stale_policy"] == "wait" and wait["stale_waits"] >= 1 and wait["stale_wait_seconds"] > 0
    assert wait["teachers_dropped"] == 0 and wait_teachers and all(t == 1 for t in wait_teachers), wait_teachers
    assert wait["teacher_staleness"]["max"] <= 20


def test_teacher_age_fixes_the_staleness_whatever_the_speeds(tmp_path, data_dir):
    """HPCDISTILL_TEACHER_AGE=D: from step t a group distills from the peer's file of step
    floor((t-D)/50)*50 exactly, waiting for it when the peer is behind (group 1 runs 3x slower here).
    Over the steps with the term on (150..299) the staleness is D..D+49: mean D+24.5, max D+49, in
    both groups, with no step lacking a teacher; the last teacher loaded (at step 300) is of step 300-D."""
    for d in (0, 100):
        run = tmp_path / f"age-{d}"
        train(2, run, mode="codistill", groups=2, data_dir=data_dir, steps=300, exchange_every=50, burn_in=150,
              teacher_age=d, max_staleness=160, straggler_rank=1, straggler_delay=2, log_every=50, timeout=400)
        c = summary(run)["codistill"]
        assert c["teacher_age"] == d and c["teachers_prefetched"] == 0
        assert c["teacher_staleness"]["mean"] == pytest.approx(d + 24.5), c["teacher_staleness"]
        assert c["teacher_staleness"]["max"] == d + 49
        assert c["steps_without_teacher"] == 0 and c["teachers_dropped"] == 0 and c["teachers_rejected"] == 0
        assert [g["last_loaded"] for g in c["groups"]] == [{"1": 300 - d}, {"0": 300 - d}]
        keep = max(3, 2 * d // 50 + 3)  # a faster peer needs files 2D + E back
        for g in (0, 1):  # every file a peer may wait for was written (none coalesced away by a writer)
            assert [s for s, _ in numbered_files(run / "exchange" / f"group-{g}")] == list(range(300, 0, -50))[:keep]
