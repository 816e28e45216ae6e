"""Experiment 2 — DC-ASGD (Zheng et al. 2017): the paper's Table 1 layout at M = 4 and 8 workers.

`digits`, the default mlp, plain SGD at lr 0.5 (the best of 0.1 / 0.25 / 0.5 for sequential SGD in a
trial run of seed 0) without momentum (the async updater applies none, so neither does any baseline),
the same number of training samples for every method:

  sequential    1 async worker + 1 parameter host (-np 2): plain SGD, N steps, no staleness
  sync-M        Horovod allreduce over M ranks, N / M steps of M x B samples
  asgd-M        M async workers + 1 parameter host (-np M+1), N / M steps each, stale gradients as they are
  dcasgd-c-M    the same with the constant delay compensation (lambda0 = 0.04)
  dcasgd-a-M    the same with the adaptive one (lambda0 = 2, m = 0.95)
  lambda sweep  dcasgd-a-8 and dcasgd-c-8 again with other lambda0 (the defaults are the papers')
  lr 0.25       sequential, asgd-8 and dcasgd-a-8 again at half the learning rate
  tput-*        sync (2 ranks) and dcasgd-a (2 workers + 1 host) on `mlp-large`, one worker per core,
                without and (right after) with the last worker sleeping as long as its step takes
                (2x slower): throughput (benchmarks/async_throughput.py measures the same)

Test error is on the 360 digits test images, test loss on the same; staleness is what summary.json's
async section reports (updates applied by others between a worker's pull and its push).
"""

from __future__ import annotations

import math

from common import fmt, mean_std

RULES = ["asgd", "dcasgd-c", "dcasgd-a"]


def sizes(quick: bool) -> dict:
    return {"total_steps": 800, "batch": 32, "lr": 0.5, "workers": [4, 8], "straggler_delay": 1.0,
            "alt_lr": 0.25, "lambda_sweep": {"dcasgd-c": [1.0], "dcasgd-a": [0.5]},
            "tput": {"workers": 2, "model": "mlp-large", "steps": 300, "lr": 0.1}}


def run(runner, seeds: list[int], quick: bool) -> dict:
    z = sizes(quick)
    base = {"HPCDISTILL_DATASET": "digits", "HPCDISTILL_MODEL": "mlp", "HPCDISTILL_OPTIMIZER": "sgd",
            "HPCDISTILL_MOMENTUM": 0, "HPCDISTILL_LR": z["lr"], "HPCDISTILL_BATCH_SIZE": z["batch"],
            "HPCDISTILL_EVAL_EVERY": 100000, "HPCDISTILL_CHECKPOINT_EVERY": 100000, "HPCDISTILL_KEEP_CHECKPOINTS": 1}
    runs = {}
    for seed in seeds:
        b = {**base, "HPCDISTILL_SEED": seed}
        N = z["total_steps"]
        runs[("sequential", 1, seed)] = runner.run(
            f"dcasgd/sequential-s{seed}", 2, {**b, "HPCDISTILL_MODE": "async", "HPCDISTILL_ASYNC_RULE": "asgd",
                                               "HPCDISTILL_STEPS": N})
        for M in z["workers"]:
            runs[("sync", M, seed)] = runner.run(f"dcasgd/sync-{M}-s{seed}", M,
                                                 {**b, "HPCDISTILL_MODE": "sync", "HPCDISTILL_STEPS": N // M})
            for rule in RULES:
                runs[(rule, M, seed)] = runner.run(
                    f"dcasgd/{rule}-{M}-s{seed}", M + 1,
                    {**b, "HPCDISTILL_MODE": "async", "HPCDISTILL_ASYNC_RULE": rule, "HPCDISTILL_STEPS": N // M})
        for rule, lams in z["lambda_sweep"].items():  # the compensation's strength, M = 8
            for lam in lams:
                runs[(f"{rule}-lam{lam}", 8, seed)] = runner.run(
                    f"dcasgd/{rule}-lam{lam}-8-s{seed}", 9,
                    {**b, "HPCDISTILL_MODE": "async", "HPCDISTILL_ASYNC_RULE": rule, "HPCDISTILL_DC_LAMBDA": lam,
                     "HPCDISTILL_STEPS": N // 8})
        if seed == seeds[0] or not quick:  # learning-rate sensitivity: half the lr, M = 8
            hb = {**b, "HPCDISTILL_LR": z["alt_lr"], "HPCDISTILL_MODE": "async"}
            runs[("sequential-altlr", 1, seed)] = runner.run(
                f"dcasgd/lr{z['alt_lr']}-sequential-s{seed}", 2,
                {**hb, "HPCDISTILL_ASYNC_RULE": "asgd", "HPCDISTILL_STEPS": N})
            for rule in ("asgd", "dcasgd-a"):
                runs[(f"{rule}-altlr", 8, seed)] = runner.run(
                    f"dcasgd/lr{z['alt_lr']}-{rule}-8-s{seed}", 9,
                    {**hb, "HPCDISTILL_ASYNC_RULE": rule, "HPCDISTILL_STEPS": N // 8})
        # throughput: each method without and with a straggler, back to back, so that both runs see
        # about the same load from whatever else the machine is doing; one worker per core (a sleeping
        # straggler would otherwise free a core for the others)
        tp, W = z["tput"], z["tput"]["workers"]
        slow = {"HPCDISTILL_STRAGGLER_DELAY": z["straggler_delay"]}
        for name, np_, extra in (("sync", W, {"HPCDISTILL_MODE": "sync"}),
                                 ("dcasgd-a", W + 1,
                                  {"HPCDISTILL_MODE": "async", "HPCDISTILL_ASYNC_RULE": "dcasgd-a"})):
            t = {**b, **extra, "HPCDISTILL_MODEL": tp["model"], "HPCDISTILL_STEPS": tp["steps"],
                 "HPCDISTILL_LOG_EVERY": 10, "HPCDISTILL_LR": tp["lr"]}
            runs[(f"tput-{name}", W, seed)] = runner.run(f"dcasgd/tput-{name}-{W}-s{seed}", np_, t)
            runs[(f"tput-{name}-straggler", W, seed)] = runner.run(
                f"dcasgd/tput-{name}-{W}-straggler-s{seed}", np_, {**t, **slow, "HPCDISTILL_STRAGGLER_RANK": np_ - 1})
    return analyse(runs, seeds, quick)


def throughput(run) -> float | None:
    """Training samples per second over the lead worker's logged span (start-up and teardown excluded).

    sync: steps x world size x batch; async: the global update counter ("version") x batch, which
    counts every worker's updates, the straggler's included."""
    recs = [r for r in run.metrics() if "loss" in r]
    if len(recs) < 2 or recs[-1]["time"] <= recs[0]["time"]:
        return None
    batch = int(run.env["HPCDISTILL_BATCH_SIZE"])
    dt = recs[-1]["time"] - recs[0]["time"]
    if "version" in recs[0]:
        return (recs[-1]["version"] - recs[0]["version"]) * batch / dt
    return (recs[-1]["step"] - recs[0]["step"]) * run.np * batch / dt


def updates_share(run) -> float | None:
    """Async only, independent of the machine's speed: global updates per step of the lead worker,
    divided by the number of workers (1.0: every worker kept pace with the lead; a 2x straggler among
    W workers: (W - 0.5) / W)."""
    recs = [r for r in run.metrics() if "version" in r]
    if len(recs) < 2 or recs[-1]["step"] == recs[0]["step"]:
        return None
    workers = run.np - 1
    return (recs[-1]["version"] - recs[0]["version"]) / (recs[-1]["step"] - recs[0]["step"]) / workers


def analyse(runs: dict, seeds: list[int], quick: bool) -> dict:
    z = sizes(quick)
    ok = {k: r for k, r in runs.items() if r.ok}
    res = {"sizes": z, "seeds": seeds, "commands": {}, "failed": [], "table": {}, "staleness": {}, "throughput": {}}
    for (name, M, seed), r in runs.items():
        if seed == seeds[0]:
            res["commands"][f"{name}-{M}"] = r.command
        if not r.ok:
            res["failed"].append(f"{r.name}: {r.error}")

    def err(name, M):
        return [1 - ok[(name, M, s)].groups()[0]["test_accuracy"] if (name, M, s) in ok else None for s in seeds]

    def loss(name, M):
        return [ok[(name, M, s)].groups()[0]["test_loss"] if (name, M, s) in ok else None for s in seeds]

    seq, seq_loss = err("sequential", 1), loss("sequential", 1)
    for M in z["workers"]:
        row = {"sequential": fmt(seq, 2, 100), "sequential_loss": fmt(seq_loss, 3)}
        for name in ["asgd", "sync"] + RULES[1:]:
            row[name] = fmt(err(name, M), 2, 100)
            row[name + "_mean"] = mean_std(err(name, M))[0]
            row[name + "_loss"] = fmt(loss(name, M), 3)
            row[name + "_diverged"] = sum(not math.isfinite(x) for x in loss(name, M) if x is not None)
        row["sequential_mean"] = mean_std(seq)[0]
        res["table"][M] = row
        for rule in RULES:
            st = [ok[(rule, M, s)].summary.get("async", {}).get("staleness") for s in seeds if (rule, M, s) in ok]
            st = [x for x in st if x]
            if st:
                res["staleness"][f"{rule}-{M}"] = {k: fmt([x[k] for x in st], 1) for k in ("mean", "p50", "p99", "max")}
    res["lambda_sweep"] = {}
    for rule, lams in z["lambda_sweep"].items():
        default = {"dcasgd-c": 0.04, "dcasgd-a": 2.0}[rule]
        for lam, name in [(default, rule)] + [(lam, f"{rule}-lam{lam}") for lam in lams]:
            ls = loss(name, 8)
            res["lambda_sweep"][f"{rule}, lambda0 {lam:g}"] = {
                "error": fmt(err(name, 8), 2, 100), "loss": fmt([x for x in ls if x is None or math.isfinite(x)], 3),
                "diverged": sum(x is not None and not math.isfinite(x) for x in ls),
                "runs": sum(x is not None for x in ls)}
    res["lambda_sweep"]["asgd (lambda0 0)"] = {"error": fmt(err("asgd", 8), 2, 100), "loss": fmt(loss("asgd", 8), 3),
                                               "diverged": res["table"][8]["asgd_diverged"],
                                               "runs": sum(x is not None for x in loss("asgd", 8))}
    st = [ok[("sequential", 1, s)].summary.get("async", {}).get("staleness")
          for s in seeds if ("sequential", 1, s) in ok]
    if any(st):
        res["staleness"]["sequential"] = {k: fmt([x[k] for x in st if x], 1) for k in ("mean", "p50", "p99", "max")}
    res["alt_lr"] = {}
    res["alt_lr_seeds"] = [s for s in seeds if ("asgd-altlr", 8, s) in ok]
    for name, M in (("sequential-altlr", 1), ("asgd-altlr", 8), ("dcasgd-a-altlr", 8)):
        rs = [ok[(name, M, s)] for s in seeds if (name, M, s) in ok]
        if rs:
            res["alt_lr"][f"{name.removesuffix('-altlr')}" + (f"-{M}" if M > 1 else "")] = {
                "error": fmt([1 - r.groups()[0]["test_accuracy"] for r in rs], 2, 100),
                "diverged": sum(any(x.get("loss") != x.get("loss") for x in r.metrics()) for r in rs),
                "runs": len(rs)}
    W = z["tput"]["workers"]
    for label, name in ((f"sync-{W}", "sync"), (f"dcasgd-a-{W}", "dcasgd-a")):
        pairs = [(ok[(f"tput-{name}", W, s)], ok[(f"tput-{name}-straggler", W, s)]) for s in seeds
                 if (f"tput-{name}", W, s) in ok and (f"tput-{name}-straggler", W, s) in ok]
        if not pairs:
            continue
        normal, slow = [throughput(a) for a, _ in pairs], [throughput(b) for _, b in pairs]
        ratio = [y / x for x, y in zip(normal, slow) if x and y]
        row = {"normal": fmt(normal, 0), "straggler": fmt(slow, 0), "ratio": fmt(ratio, 2),
               "ratio_mean": mean_std(ratio)[0], "ratio_list": ratio, "pairs": len(pairs)}
        if name != "sync":
            row["updates_share"] = fmt([updates_share(b) for _, b in pairs], 2)
            row["updates_share_list"] = [updates_share(b) for _, b in pairs]
            row["updates_share_normal"] = fmt([updates_share(a) for a, _ in pairs], 2)
        res["throughput"][label] = row
    return res
