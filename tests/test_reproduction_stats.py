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
