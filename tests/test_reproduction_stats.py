"""The verdict rule of docs/reproduction.md (reproduction/stats.py): paired per seed, 2 standard errors,
at least 5 seeds for "reproduced"."""

import json
import math
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "reproduction"))

from stats import Effect, Row, paired, verdict  # noqa: E402


def test_paired_effect_and_its_standard_error():
    a = {0: 1.0, 1: 2.0, 2: 3.0, 3: float("nan"), 5: 9.0}
    b = {0: 0.5, 1: 1.0, 2: 2.0, 3: 1.0, 4: 7.0}
    e = paired(a, b)  # seeds 0, 1, 2: 3 is not finite, 4 and 5 are in one map only
    assert e.values == [0.5, 1.0, 1.0]
    assert e.mean == pytest.approx(2.5 / 3)
    assert e.stderr == pytest.approx(math.sqrt(((0.5 - 2.5 / 3) ** 2 + 2 * (1 - 2.5 / 3) ** 2) / 2 / 3))
    assert paired(a, b, sign=-1).values == [-0.5, -1.0, -1.0]


@pytest.mark.parametrize("values,enough,word", [
    ([1.0, 1.1, 0.9, 1.2, 1.0], True, "reproduced"),
    ([1.0, 1.1, 0.9, 1.2, 1.0], False, "partly"),        # short of the size the paper claims
    ([1.0, 1.1, 0.9, 1.2], True, "partly"),              # 4 seeds: not enough for "reproduced"
    ([0.1, -0.2, 0.3, -0.1, 0.05], True, "within noise"),
    ([-1.0, -1.1, -0.9, -1.2, -1.0], True, "not reproduced"),
    ([1.0], True, "not testable here (fewer than 2 seeds measured)"),
])
def test_verdict_rule(values, enough, word):
    assert verdict(Effect(values), enough=enough) == word


def test_a_row_says_why_it_cannot_be_tested_and_serialises_flat():
    row = Row.of("dcasgd", "DC-ASGD recovers the gap", Effect([0.1, 0.2]), "no gap", untestable="ASGD has no gap",
                 workers=16, staleness_mean=15.0)
    data = json.loads(json.dumps(row.json()))
    assert data["verdict"] == "not testable here (ASGD has no gap)" and data["seeds"] == 2
    assert data["workers"] == 16 and data["staleness_mean"] == 15.0 and "extra" not in data
    assert Row.of("x", "y", Effect([]), "none").json()["effect"] is None


class _Finished:
    """A finished sweep run as reproduction/codistill.py reads it: ok and its validation curve."""

    def __init__(self, curve):
        self.ok, self.curve, self.command, self.name, self.error = True, curve, "", "", ""

    def val_curve(self, group=0):
        return self.curve


def test_the_batch_where_sync_sgd_stops_scaling():
    """Steps to the loosest best loss (1.0 here) at each batch's fastest lr: B=32 needs 800, 64 needs
    350 (-56 %), 128 needs 300 (-14 %), 256 needs 290 (-3 %: saturated), so B* = 128; lr 0.1 is the
    faster at every B but 64 (450 there), whose tuned lr is 0.2, and lr 0.2 never reaches the target at
    128; without the last point no B saturates (no B*: the experiment runs at its default batch and says
    so)."""
    import codistill

    def curve(at):  # validation loss 2.0 until `at`, then 1.0 (crossing interpolated from at-100)
        return sorted([(s, 2.0 if s < at else 1.0) for s in range(0, 1001, 100) if s != at] + [(at, 1.0)])

    def never():  # an lr that diverged: never reaches the target
        return [(s, 3.0) for s in range(0, 1001, 100)]

    steps = {0.1: {32: 800, 64: 450, 128: 300, 256: 290}, 0.2: {32: 900, 64: 350, 128: None, 256: 600}}
    z = {**codistill.sizes(False), "batches": [32, 64, 128, 256], "target_factor": 1.0}

    def sweep(batches):
        return {(B, lr, 0): _Finished(curve(at[B]) if at[B] else never()) for lr, at in steps.items()
                for B in batches}

    found = codistill.saturation(sweep(z["batches"]), z)
    assert found["steps_mean"] == {"32": 800.0, "64": 350.0, "128": 300.0, "256": 290.0}
    assert found["lr"] == {"32": 0.1, "64": 0.2, "128": 0.1, "256": 0.1}
    assert found["steps_by_lr"]["128"] == {"0.1": [300.0], "0.2": [None]}
    assert (found["bstar"], found["saturated"]) == (128, True)
    assert codistill.lrs_at(z, found, 128) == {128: 0.1, 256: 0.1}
    z["batches"] = [32, 64, 128]
    found = codistill.saturation(sweep(z["batches"]), z)
    assert (found["bstar"], found["saturated"]) == (None, False)
    assert codistill._cuts(found) == {32: 1 - 350 / 800, 64: 1 - 300 / 350}
    assert codistill.lrs_at(z, found, 128) == {128: 0.1, 256: z["lrs"][1]}  # 256 not swept: the grid's middle


def test_a_family_resumes_from_its_committed_run_records(tmp_path):
    """A run kept in a family's records file (reproduction/results/<family>-runs.json) with the same
    settings is reused without its run directory (another checkout); other settings are run again."""
    import common

    settings = {"HPCDISTILL_MODE": "async", "HPCDISTILL_STEPS": "10"}
    summary = {"groups": [{"group": 0, "test_accuracy": 0.9, "test_loss": 0.3}], "async": {"staleness": {}}}
    records = tmp_path / "dcasgd-runs.json"
    records.write_text(json.dumps({"dcasgd/x-s0": {"np": 3, "settings": settings, "seconds": 12.0,
                                                   "summary": summary}}))
    runner = common.Runner(tmp_path / "runs", dry=True, records=records)
    run = runner.run("dcasgd/x-s0", 3, settings)
    assert run.ok and run.reused and run.seconds == 12.0 and run.groups()[0]["test_accuracy"] == 0.9
    other = runner.run("dcasgd/x-s0", 3, {**settings, "HPCDISTILL_STEPS": "20"})
    assert not other.ok and not other.reused  # a dry runner only says what it would run
    assert not common.Runner(tmp_path / "runs", dry=True, fresh=True, records=records).run("dcasgd/x-s0", 3,
                                                                                   settings).reused


def test_a_quick_page_is_written_apart_from_the_committed_one(tmp_path, monkeypatch):
    """`run.py --quick` writes the page, its JSON and plots where the quick layout says, with the quick
    banner and without the full suite's notes; docs/reproduction.md and its JSON are not touched. The
    quick layout itself lies wholly in one git-ignored directory."""
    import shutil
    import subprocess

    import run

    import common

    for path in (common.QUICK.runs, common.QUICK.results, common.QUICK.doc, common.QUICK.json, common.QUICK.img):
        assert path.is_relative_to(common.QUICK_DIR), path
    ignored = subprocess.run(["git", "check-ignore", "-q", str(common.QUICK_DIR / "reproduction.md")], cwd=ROOT)
    assert ignored.returncode == 0, "reproduction/quick/ must be git-ignored"

    results = tmp_path / "results"
    shutil.copytree(common.FULL.results, results)  # the committed results stand in for a quick run's
    layout = common.Layout(runs=tmp_path / "runs", results=results, doc=tmp_path / "page.md",
                           json=tmp_path / "page.json", img=tmp_path / "img", rel="img", notes=None)
    monkeypatch.setattr(run, "QUICK", layout)
    before = {p: p.read_bytes() for p in (common.FULL.doc, common.FULL.json)}
    assert run.main(["--quick", "--doc-only"]) == 0
    page = layout.doc.read_text()
    assert page.count("**A `--quick` run**") == 1 and "its verdicts are not the reproduction" in page
    assert f"HPCDISTILL_RUN_DIR={tmp_path}/runs/" in page and "run.py --doc-only --quick" in page
    assert common.FULL.notes.read_text().strip().splitlines()[0] not in page  # the notes read the full run
    assert json.loads(layout.json.read_text()) == json.loads(before[common.FULL.json])  # same results, same rows
    assert sorted(p.name for p in layout.img.glob("*.png")) and all(
        f"](img/{p.name})" in page for p in layout.img.glob("*.png"))
    assert {p: p.read_bytes() for p in before} == before
