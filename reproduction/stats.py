"""The statistics behind every verdict of docs/reproduction.md and docs/reproduction.json, in one place.

An effect is measured *paired per seed*: one number per seed (the difference between two methods
trained from the same seed, hence the same initial weights and data order; for codistillation, the
mean over a run's groups), signed so that positive is the paper's direction. Its standard error is
the sample standard deviation of those numbers over sqrt(n). Two groups of one run, or a seed reused
in two pairs, are never counted as independent samples.

    reproduced       the paper's sign, more than 2 SE from zero, at least MIN_SEEDS seeds (and, where the
                     paper claims a size, e.g. "most of the gap", that size: `enough`)
    partly           the paper's sign, more than 2 SE, but too few seeds or short of the claimed size
    within noise     less than 2 SE from zero
    not reproduced   the opposite sign, more than 2 SE from zero
    not testable here (why)   the experiment cannot show it at this scale; the reason is given
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

MIN_SEEDS = 5
SE_FACTOR = 2.0


@dataclass
class Effect:
    """Paired per-seed values of an effect (positive = the paper's direction)."""

    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return sum(self.values) / self.n if self.n else math.nan

    @property
    def stderr(self) -> float:
        if self.n < 2:
            return math.nan
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in self.values) / (self.n - 1) / self.n)

    def text(self, digits: int = 4, scale: float = 1.0, unit: str = "") -> str:
        if self.n == 0:
            return "not measured"
        if math.isnan(self.stderr):
            return f"{self.mean * scale:+.{digits}f}{unit} ({self.n} seed{'s' if self.n > 1 else ''})"
        return f"{self.mean * scale:+.{digits}f}{unit} ± {self.stderr * scale:.{digits}f} (SE, {self.n} seeds)"


def paired(a: dict, b: dict, sign: float = 1.0) -> Effect:
    """sign * (a[seed] - b[seed]) for every seed present, finite, in both (seed -> value maps)."""
    keys = sorted(k for k in a if k in b and a[k] is not None and b[k] is not None
                  and math.isfinite(a[k]) and math.isfinite(b[k]))
    return Effect([sign * (a[k] - b[k]) for k in keys])


def verdict(effect: Effect, enough: bool = True, untestable: str | None = None) -> str:
    """The rule of the module docstring. `enough`: the effect reaches the size the paper claims (when
    it claims one); `untestable`: why this experiment cannot show the claim (then that is the verdict)."""
    if untestable:
        return f"not testable here ({untestable})"
    if effect.n < 2:
        return "not testable here (fewer than 2 seeds measured)"
    m, se = effect.mean, effect.stderr
    beyond = abs(m) > SE_FACTOR * se if se > 0 else m != 0
    if not beyond:
        return "within noise"
    if m < 0:
        return "not reproduced"
    return "reproduced" if effect.n >= MIN_SEEDS and enough else "partly"


@dataclass
class Row:
    """One verdict row of docs/reproduction.md and docs/reproduction.json."""

    experiment: str
    claim: str
    verdict: str
    seeds: int
    effect: float | None
    stderr: float | None
    evidence: str
    extra: dict = field(default_factory=dict)  # workers, staleness_mean, sync_saturated, ...

    @classmethod
    def of(cls, experiment: str, claim: str, effect: Effect, evidence: str, enough: bool = True,
           untestable: str | None = None, **extra) -> "Row":
        finite = lambda x: None if x is None or not math.isfinite(x) else x  # noqa: E731
        return cls(experiment, claim, verdict(effect, enough, untestable), effect.n, finite(effect.mean),
                   finite(effect.stderr), evidence, extra)

    def json(self) -> dict:
        out = asdict(self)
        return {**{k: v for k, v in out.items() if k != "extra"}, **out["extra"]}
