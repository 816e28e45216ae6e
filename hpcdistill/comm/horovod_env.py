"""Horovod's knobs as hpcdistill sets them: tuned defaults where a measurement justifies one, the
user's `HOROVOD_*` variables always winning, and a table saying which value came from where.

The one knob that matters on CPU is the negotiation cycle. Stock Horovod sleeps HOROVOD_CYCLE_TIME
(1 ms) between background cycles and only then looks at a newly enqueued tensor, so every allreduce
up to 4 MB took ~1.07 ms on 2 ranks where raw MPI took 2 us to 0.48 ms (docs/benchmarks.md (a)).
`scripts/setup.sh` builds Horovod with scripts/horovod-latency.patch, which wakes the loop on enqueue:
the cycle time then only paces idle cycles and Horovod's default (1 ms) is kept. A Horovod built
without the patch (a site's own) gets HOROVOD_CYCLE_TIME=0.1, which measured 0.17 ms for a small
allreduce instead of 1.07 ms; lower values make the background thread run ~10k collectives a second,
which steals the cores from training when ranks outnumber them.
The fusion threshold (128 MiB) and the response cache (1024 entries) are Horovod's defaults: the
cache turns a negotiation's gather and broadcasts into one bit-vector allreduce, and
HOROVOD_FUSION_THRESHOLD=0 segfaulted (a zero-byte fusion buffer).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

PATCH_MARK = b"HOROVOD_WAKE_ON_ENQUEUE"  # a string only the patched build's library holds

# variable -> (Horovod's own default, hpcdistill's default with the patch, without it, why)
KNOBS: dict[str, tuple[str, str | None, str | None, str]] = {
    "HOROVOD_CYCLE_TIME": ("1", None, "0.1", "ms between background cycles; without the latency patch every "
                                           "collective waits for the next cycle"),
    "HOROVOD_FUSION_THRESHOLD": ("134217728", None, None, "bytes fused into one allreduce (never 0: segfault)"),
    "HOROVOD_CACHE_CAPACITY": ("1024", None, None, "negotiations cached (0: a full gather every cycle)"),
    "HOROVOD_WAKE_ON_ENQUEUE": ("1", None, None, "latency patch: wake the loop when a tensor is enqueued "
                                                  "(0: the stock timed sleep)"),
}


_SET_HERE: set[str] = set()  # variables apply_defaults set in this process (their source is hpcdistill)


@lru_cache(maxsize=1)
def latency_patched() -> bool | None:
    """Whether the installed Horovod carries scripts/horovod-latency.patch (None: no Horovod)."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("horovod")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    libs = list(Path(next(iter(spec.submodule_search_locations))).glob("torch/mpi_lib_v2*.so"))
    if not libs:
        return None
    import mmap

    with open(libs[0], "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        return m.find(PATCH_MARK) >= 0


def effective(env=None) -> list[dict]:
    """One row per knob: variable, value, source ("environment", "hpcdistill", "horovod default"), meaning."""
    env = os.environ if env is None else env
    patched = latency_patched()
    rows = []
    for var, (stock, with_patch, without_patch, meaning) in KNOBS.items():
        if var == "HOROVOD_WAKE_ON_ENQUEUE" and not patched:
            continue
        ours = with_patch if patched else without_patch
        if env.get(var, "") != "":
            value, source = env[var], "hpcdistill" if var in _SET_HERE and env[var] == ours else "environment"
        elif ours is not None:
            value, source = ours, "hpcdistill"
        else:
            value, source = stock, "horovod default"
        rows.append({"variable": var, "value": value, "source": source, "meaning": meaning})
    return rows


def apply_defaults(env=None) -> dict[str, str]:
    """Set hpcdistill's defaults in `env` (os.environ) where the user set nothing; what was set."""
    env = os.environ if env is None else env
    set_here = {}
    for row in effective(env):
        if row["source"] == "hpcdistill" and row["variable"] not in env:
            env[row["variable"]] = set_here[row["variable"]] = row["value"]
            _SET_HERE.add(row["variable"])
    return set_here
