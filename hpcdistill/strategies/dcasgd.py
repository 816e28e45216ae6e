"""DC-ASGD's arithmetic and the staleness statistics, apart from the RMA layer (strategies/async_rma.py
uses them; importing this module starts no MPI, so unit tests and other tools can use it freely)."""

from __future__ import annotations

import numpy as np
import torch

from hpcdistill.config import ASYNC_RULES

MEANSQ_EPS = 1e-7  # the authors' epsilon in lambda0 / sqrt(MeanSquare + eps)
RULES = tuple(ASYNC_RULES)  # config.ASYNC_RULES is the table; dc_delta below implements each


def dc_delta(g: torch.Tensor, w_bak: torch.Tensor, w_now: torch.Tensor | None, *, rule: str, lr: float,
             lambda0: float, meansq: torch.Tensor | None = None, decay: float = 0.95,
             eps: float = MEANSQ_EPS, out: torch.Tensor | None = None, scratch: torch.Tensor | None = None,
             correction: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The pushed delta -lr * g_tilde of one DC-ASGD update, and the worker's new mean square.

    g_tilde = g + lambda_t * g * g * (w_now - w_bak); lambda_t = lambda0 (dcasgd-c) or, per element,
    lambda0 / sqrt(MS / correction + eps) with MS <- decay * MS + (1 - decay) * g * g (dcasgd-a; MS
    starts at 0; `correction` = 1 - m^t after a worker's t-th update with
    HPCDISTILL_DC_MEANSQ_BIAS_CORRECTION, else 1, the paper's rule); asgd: g_tilde = g.
    float32 tensors on one device, the model's: on a GPU the arithmetic stays there (one more
    host-to-device copy, of w_now, instead of a gradient's worth of host passes); on the host torch and
    NumPy take the same time (one thread: 3.3 ms each at 1M elements, 52.7 vs 48.3 ms at 10M).
    `meansq` is updated in place when given. Every step works in place in `out` and `scratch` (buffers
    of g's size, allocated when not given): a model-sized temporary per operation would cost more than
    the arithmetic."""
    if rule not in RULES:
        raise ValueError(f"unknown async rule {rule!r}; expected one of {RULES}")
    out = torch.empty_like(g) if out is None else out
    gg = torch.empty_like(g) if scratch is None else scratch
    if rule == "asgd" or lambda0 == 0:
        if rule == "dcasgd-a":  # keep the mean square current even when lambda0 = 0
            meansq = _update_meansq(torch.mul(g, g, out=gg), meansq, decay)
        torch.mul(g, -lr, out=out)
        return out, meansq
    torch.mul(g, g, out=gg)
    torch.sub(w_now, w_bak, out=out)
    out.mul_(gg)                                     # g * g * (w_now - w_bak)
    if rule == "dcasgd-a":
        meansq = _update_meansq(gg, meansq, decay)   # consumes gg
        torch.mul(meansq, 1.0 / correction, out=gg).add_(eps).sqrt_()
        out.div_(gg)
    out.mul_(lambda0).add_(g).mul_(-lr)
    return out, meansq


def _update_meansq(gg: torch.Tensor, meansq: torch.Tensor | None, decay: float) -> torch.Tensor:
    """MS <- decay * MS + (1 - decay) * g * g, in place; `gg` (g * g) is overwritten."""
    if meansq is None:
        meansq = torch.zeros_like(gg)
    return meansq.mul_(decay).add_(gg.mul_(1 - decay))


def mean_or_none(values: list) -> float | None:
    return float(np.mean(values)) if values else None


def staleness_stats(counts) -> dict:
    """mean, p50, p99 and max of the staleness values whose histogram is `counts` (counts[k]: updates
    that saw staleness k); percentiles as numpy's default (linear) on the values themselves."""
    counts = np.asarray(counts, np.int64)
    values = np.repeat(np.arange(counts.size), counts) if counts.sum() else np.zeros(1, np.int64)
    return {"mean": float(values.mean()), "p50": float(np.percentile(values, 50)),
            "p99": float(np.percentile(values, 99)), "max": int(values.max())}


def pooled_summary(parts: list[dict]) -> dict:
    """One `async` section over several groups' async parameter stores (codistill with
    GROUP_MODE=async): totals, staleness over every update of every group; per group under "groups"."""
    counts = np.zeros(max(len(p["staleness_counts"]) for p in parts), np.int64)
    for p in parts:
        counts[:len(p["staleness_counts"])] += p["staleness_counts"]
    first = parts[0]
    return {
        "rule": first["rule"], "workers": sum(p["workers"] for p in parts),
        "updates": sum(p["updates"] for p in parts), "updates_this_run": sum(p["updates_this_run"] for p in parts),
        "staleness": staleness_stats(counts), "staleness_counts": counts.tolist(),
        "updates_per_second": sum(p["updates_per_second"] for p in parts),
        **{k: first[k] for k in ("lambda0", "meansq_decay", "staleness_bound", "lr_rule", "momentum_applied",
                                 "schedule", "meansq_bias_correction")},
        "ssp": {"max_lead": max(p["ssp"]["max_lead"] for p in parts),
                "waits": sum(p["ssp"]["waits"] for p in parts),
                "wait_seconds": sum(p["ssp"]["wait_seconds"] for p in parts)},
        "overshoot_share": mean_or_none([p["overshoot_share"] for p in parts if p.get("overshoot_share") is not None]),
        "groups": parts,
    }


