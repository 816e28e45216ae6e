"""Experiment 1 — codistillation (Anil et al. 2018) where sync SGD has stopped scaling.

`digits-aug` (60k training, 5k validation, 10k test images), the default `mlp`, SGD with momentum 0.9,
20 warm-up steps, then a cosine decay; the same number of steps S for every run, so that every
comparison is at equal steps. The learning rate is tuned per batch on a sqrt(2) grid: a fixed scaling
rule cannot show saturation (with lr = 0.05 x sqrt(B / 32) every doubling of B cut the steps to target
by the ~29 % that the sqrt(2) larger lr alone gives, up to B = 1024).

1. **Where sync SGD stops scaling.** Sync SGD, one rank, batch B = 256 .. 4096, each at every lr of
   the grid (sweep seeds). Per seed the target is twice the loosest of the B's best validation losses,
   so that every B reaches it well before its run ends; a B's lr is the one that reaches it in the
   fewest steps (mean over seeds).
   B* is the smallest B where doubling the batch no longer cuts those steps by more than 10 %: adding
   workers to sync SGD has stopped paying there, the paper's precondition. If no B of the sweep
   saturates, the rows below run at B = 256, every verdict row says `sync_saturated: false`, and the
   ~2x claim is "not testable here".
2. **At B*, per seed** (each run at its batch's tuned lr: sync-2B at 2B*'s, the others at B*'s):

     sync-2B      sync SGD on 2 ranks x B* (a second worker added to sync SGD)
     alone        1 rank x B* (one codistilling group without its peer)
     codistill    2 groups x 1 rank x B*, disjoint data, HPCDISTILL_TEACHER_AGE=0: each exchange loads the
                  peer's model of that very step (teachers 0..49 steps old, whatever the machine's load)
     shared-data  the same, both groups drawing from all the data
     age-D        codistill with the teacher D steps older (TEACHER_AGE=D: D..D+49 steps old)
     ls-E         the label-smoothing control of the same weight, E chosen per seed on validation

   Every codistill-type run: exchange every 50 steps, weight 0.5, T = 1, burn-in 300 steps (so that the
   oldest controlled teacher exists when the term starts: both groups always have one).
3. **Churn** (paper section 3.5): sync-2B, alone and codistill run for seeds n .. 2n-1 too; seed pairs
   (0, n), (1, n+1), ... are disjoint, one value each: the share of test images whose top-1 class differs between
   seed a's and seed b's model (codistill: group 0 of each), and the mean total variation between their
   predicted distributions (1/2 sum_c |p_a,c - p_b,c|, "mean Δp").
"""

from __future__ import annotations

import math

import numpy as np

from common import DATA_DIR, crossing_step, fmt, load_model, mean_std, predict, table
from stats import Row, paired

DATA = "digits-aug"
ROWS = ["sync-2B", "alone", "codistill", "shared-data"]
CHURN = ["sync-2B", "alone", "codistill"]  # alone: churn of the same batch and data without the peer


def sizes(quick: bool) -> dict:
    # The lr grid: at B = 256 .. 4096 a wider grid by hand (0.2 .. 0.8, 2 seeds) found every B's best
    # lr among these three; 0.8 was never best and 0.2 only once, by 3 % (B = 256).
    full = {"steps": 1500, "batches": [256, 512, 1024, 2048, 4096],
            "lrs": [0.4 / math.sqrt(2), 0.4, 0.4 * math.sqrt(2)],
            "sweep_seeds": 2, "sweep_eval_every": 25, "eval_every": 50, "exchange_every": 50,
            "burn_in": 300, "ages": [250], "alpha": 0.5,
            "smoothing": [0.02, 0.05, 0.1], "saturation": 0.9, "default_bstar": 256,
            # Why twice: at the loosest best loss itself, every B = 256 .. 4096 crossed at 820 .. 1140 of its
            # 1500 steps, in no order: the cosine decay's end, not the batch, set those steps.
            "target_factor": 2.0}
    if not quick:
        return full
    # --quick: every kind of run once per seed, 200 steps (a run is then mostly start-up and evaluation,
    # 8-15 s on 2 cores): the suite's check, not its result
    return {**full, "steps": 200, "batches": [256, 512], "lrs": [0.4], "sweep_seeds": 1, "sweep_eval_every": 20,
            "exchange_every": 25, "burn_in": 100, "ages": [50], "smoothing": [0.05]}


def _base(z: dict, batch: int, lr: float, seed: int, eval_every: int) -> dict:
    return {"HPCDISTILL_DATASET": DATA, "HPCDISTILL_MODEL": "mlp", "HPCDISTILL_OPTIMIZER": "sgd",
            "HPCDISTILL_LR": f"{lr:.6g}", "HPCDISTILL_STEPS": z["steps"],
            "HPCDISTILL_BATCH_SIZE": batch, "HPCDISTILL_EVAL_EVERY": eval_every, "HPCDISTILL_LOG_EVERY": 50,
            "HPCDISTILL_CHECKPOINT_EVERY": z["steps"], "HPCDISTILL_KEEP_CHECKPOINTS": 1, "HPCDISTILL_SEED": seed}


def configs(z: dict, bstar: int, lrs: dict, seed: int) -> list[tuple[str, int, dict]]:
    """The runs at B* for one seed; `lrs` maps a global batch to its tuned lr (B* and 2B*)."""
    b = _base(z, bstar, lrs[bstar], seed, z["eval_every"])
    cod = {**b, "HPCDISTILL_MODE": "codistill", "HPCDISTILL_GROUPS": 2, "HPCDISTILL_DATA_SPLIT": "disjoint",
           "HPCDISTILL_EXCHANGE_EVERY": z["exchange_every"], "HPCDISTILL_BURN_IN": z["burn_in"],
           "HPCDISTILL_DISTILL_WEIGHT": z["alpha"], "HPCDISTILL_TEMPERATURE": 1,
           "HPCDISTILL_MAX_STALENESS": max(z["ages"]) + z["exchange_every"], "HPCDISTILL_STALE_WAIT": 600}
    out = [("sync-2B", 2, {**_base(z, bstar, lrs[2 * bstar], seed, z["eval_every"]), "HPCDISTILL_MODE": "sync"}),
           ("alone", 1, {**b, "HPCDISTILL_MODE": "sync"}),
           ("codistill", 2, {**cod, "HPCDISTILL_TEACHER_AGE": 0}),
           ("shared-data", 2, {**cod, "HPCDISTILL_TEACHER_AGE": 0, "HPCDISTILL_DATA_SPLIT": "shared"})]
    out += [(f"age-{d}", 2, {**cod, "HPCDISTILL_TEACHER_AGE": d}) for d in z["ages"]]
    out += [(f"ls-{e:g}", 2, {**cod, "HPCDISTILL_CODISTILL_TARGET": "label-smoothing",
                              "HPCDISTILL_LABEL_SMOOTHING": e}) for e in z["smoothing"]]
    return out


def run(runner, seeds: list[int], quick: bool) -> dict:
    z = sizes(quick)
    sweep = {}
    for seed in seeds[:z["sweep_seeds"]]:
        for B in z["batches"]:
            for lr in z["lrs"]:
                sweep[(B, lr, seed)] = runner.run(f"codistill/sweep-b{B}-lr{lr:.6g}-s{seed}", 1, {
                    **_base(z, B, lr, seed, z["sweep_eval_every"]), "HPCDISTILL_MODE": "sync"})
    found = saturation(sweep, z)
    bstar = found["bstar"] or z["default_bstar"]
    lrs = lrs_at(z, found, bstar)
    runs = {}
    for seed in seeds:  # seed-major: an interrupted suite has every row for its first seeds
        for name, np_, settings in configs(z, bstar, lrs, seed):
            runs[(name, seed)] = runner.run(f"codistill/{name}-b{bstar}-s{seed}", np_, settings)
    churn_seeds = list(range(len(seeds), 2 * len(seeds)))  # the second seed of each disjoint pair
    for seed in churn_seeds:
        for name, np_, settings in configs(z, bstar, lrs, seed):
            if name in CHURN:
                runs[(name, seed)] = runner.run(f"codistill/{name}-b{bstar}-s{seed}", np_, settings)
    return analyse(runs, found, seeds, churn_seeds, z)


def lrs_at(z: dict, found: dict, bstar: int) -> dict:
    """The lr of B* and of 2B* (sync-2B): the sweep's tuned one, else (its sweep runs failed) the grid's
    middle."""
    middle = z["lrs"][len(z["lrs"]) // 2]
    return {B: found["lr"].get(str(B), middle) for B in (bstar, 2 * bstar)}


# --- analysis -------------------------------------------------------------------------------------

def saturation(sweep: dict, z: dict) -> dict:
    """{(B, lr, seed): run} -> each B's tuned lr, its steps to the sweep's target per seed, and B*, the
    smallest B whose doubling cuts the mean steps by less than 1 - saturation (10 %).

    Per seed the target is twice the loosest of the B's best validation losses (each B at its best lr),
    so every B reaches it well before its run ends; a B's lr is the grid's fastest to it on the mean
    over seeds (an lr that never reaches it counts as the run's length)."""
    seeds = sorted({s for _, _, s in sweep})
    lrs = sorted({lr for _, lr, _ in sweep})
    by_lr: dict[int, dict] = {B: {lr: [] for lr in lrs} for B in z["batches"]}
    targets = {}
    for seed in seeds:
        curves = {(B, lr): r.val_curve() for (B, lr, s), r in sweep.items() if s == seed and r.ok}
        best = {B: min((min(v for _, v in c) for (b, _), c in curves.items() if b == B), default=None)
                for B in z["batches"]}
        if None in best.values():
            continue
        targets[seed] = z["target_factor"] * max(best.values())  # every B reaches it at one lr at least
        for (B, lr), c in curves.items():
            by_lr[B][lr].append(crossing_step(c, targets[seed]))
    tuned, steps = {}, {}
    for B, per_lr in by_lr.items():
        scored = [(np.mean([z["steps"] if v is None else v for v in vals]), lr)
                  for lr, vals in per_lr.items() if len(vals) == len(targets) and vals]
        if scored:
            tuned[B] = min(scored)[1]
            steps[B] = by_lr[B][tuned[B]]
    mean = {B: mean_std(v)[0] if v else None for B, v in steps.items()}
    bstar, saturated = None, False
    for B in z["batches"]:
        if mean.get(B) and mean.get(2 * B) and mean[2 * B] > z["saturation"] * mean[B]:
            bstar, saturated = B, True
            break
    first = seeds[0] if seeds else None
    return {"batches": z["batches"], "lrs": lrs, "seeds": seeds,
            "targets": {str(s): t for s, t in targets.items()},
            "lr": {str(B): lr for B, lr in tuned.items()},
            "steps_by_lr": {str(B): {f"{lr:.6g}": v for lr, v in per_lr.items()} for B, per_lr in by_lr.items()},
            "steps": {str(B): v for B, v in steps.items()}, "steps_mean": {str(B): m for B, m in mean.items()},
            "bstar": bstar, "saturated": saturated,
            "commands": {f"sweep-b{B}-lr{lr:.6g}": r.command for (B, lr, s), r in sweep.items() if s == first},
            "failed": [f"{r.name}: {r.error}" for r in sweep.values() if not r.ok]}


def _figures(r, target: float | None) -> dict:
    groups = r.groups()
    out = {"test_loss": float(np.mean([g["test_loss"] for g in groups])),
           "test_error": float(np.mean([1 - g["test_accuracy"] for g in groups])),
           "val_loss": float(np.mean([g["val_loss"] for g in groups]))}
    if target is not None:  # group 0: the same initial weights as the sync runs of this seed
        out["steps_to_sync"] = crossing_step(r.val_curve(0), target)
    cd = r.summary.get("codistill") or {}
    if cd.get("target") == "peers":
        out["staleness_mean"] = cd["teacher_staleness"]["mean"]
        out["staleness_max"] = cd["teacher_staleness"]["max"]
        out["steps_without_teacher"] = cd["steps_without_teacher"]
        out["within_run_churn"] = cd["churn"]
    return out


def analyse(runs: dict, found: dict, seeds: list[int], churn_seeds: list[int], z: dict) -> dict:
    res = {"sizes": z, "seeds": seeds, "churn_seeds": churn_seeds, "sweep": found,
           "commands": dict(found["commands"]), "failed": list(found["failed"]), "values": {}, "curves": {}}
    ok = {k: r for k, r in runs.items() if r.ok}
    for (name, seed), r in runs.items():
        if seed == seeds[0]:
            res["commands"][name] = r.command
        if not r.ok:
            res["failed"].append(f"{r.name}: {r.error}")
    for key, r in list(ok.items()):  # a controlled age that did not hold (a peer's file never came) is no data
        cd = r.summary.get("codistill") or {}
        d, st = cd.get("teacher_age"), cd.get("teacher_staleness", {})
        e = z["exchange_every"]
        if d is not None and (st.get("mean") != d + (e - 1) / 2 or cd.get("steps_without_teacher")):
            res["failed"].append(f"{r.name}: teacher age {st} and {cd.get('steps_without_teacher')} steps without "
                                 f"a teacher, not the controlled {d}..{d + e - 1}")
            del ok[key]
    for (name, seed), r in sorted(ok.items()):
        sync = ok.get(("sync-2B", seed))
        target = sync.groups()[0]["val_loss"] if sync else None
        res["values"].setdefault(name, {})[str(seed)] = _figures(r, target)
    for name in {n for n, _ in ok}:
        res["curves"][name] = _mean_curve([r.val_curve(g["group"]) for (n, s), r in ok.items() if n == name
                                           and s in seeds for g in r.groups()])
    ls = {}
    for seed in map(str, seeds):  # the control's E: per seed, the lowest validation loss
        options = [(v[seed]["val_loss"], n) for n, v in res["values"].items() if n.startswith("ls-") and seed in v]
        if options:
            name = min(options)[1]
            ls[seed] = {**res["values"][name][seed], "epsilon": float(name.removeprefix("ls-"))}
    res["values"]["ls"] = ls
    res["churn"] = _churn(ok, seeds, churn_seeds)
    return res


def _mean_curve(curves: list) -> list:
    """[(step, mean, std)] over the curves, at the steps they all share."""
    if not curves:
        return []
    common = set.intersection(*(set(s for s, _ in c) for c in curves))
    out = []
    for step in sorted(common):
        vals = [dict(c)[step] for c in curves]
        out.append((step, float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0))
    return out


def _probs(run) -> np.ndarray:
    logits, _ = predict(load_model(run.checkpoint(0)), DATA_DIR / DATA / "test.h5")
    z = np.exp(logits - logits.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def _churn(ok: dict, seeds: list[int], churn_seeds: list[int]) -> dict:
    """name -> pair index -> {top1, tv}: seed seeds[i] against churn_seeds[i] (disjoint pairs)."""
    out = {}
    for name in CHURN:
        for i, (a, b) in enumerate(zip(seeds, churn_seeds)):
            if (name, a) in ok and (name, b) in ok:
                pa, pb = _probs(ok[(name, a)]), _probs(ok[(name, b)])
                out.setdefault(name, {})[str(i)] = {
                    "seeds": [a, b], "top1": float((pa.argmax(-1) != pb.argmax(-1)).mean()),
                    "tv": float(0.5 * np.abs(pa - pb).sum(-1).mean())}
    return out


# --- the document's section and verdicts (reproduction/doc.py calls these) -------------------------

def _col(res: dict, name: str, what: str = "test_loss") -> dict:
    return {s: v.get(what) for s, v in res["values"].get(name, {}).items() if v.get(what) is not None}


def section(res: dict) -> str:
    z, sw = res["sizes"], res["sweep"]
    bstar = sw["bstar"] or z["default_bstar"]
    cuts = _cuts(sw)
    out = ["## 1. Codistillation where sync SGD has stopped scaling (Anil et al. 2018)\n",
           f"`{DATA}` (60k training, 5k validation, 10k test images), `mlp`, SGD with momentum 0.9, the learning "
           f"rate tuned per global batch B on the grid {', '.join(f'{v:.3g}' for v in sw.get('lrs', []))}, "
           f"{z['steps']} steps for every run. Codistillation: 2 groups of one "
           f"rank, weight {z['alpha']}, T = 1, burn-in {z['burn_in']} steps, exchange every {z['exchange_every']} "
           f"steps with the teacher age controlled (`HPCDISTILL_TEACHER_AGE`). Seeds {res['seeds']} (churn: "
           f"also {res['churn_seeds']}).\n",
           f"**Where sync SGD stops scaling** (1 rank, validation every {z['sweep_eval_every']} steps, seeds "
           f"{sw['seeds']}): steps to each seed's target (twice the loosest of the batches' best validation losses: "
           f"{', '.join(f'{t:.4f}' for t in sw['targets'].values()) or '—'}) at every lr of the grid; a batch's "
           "lr is the one fastest on the mean over seeds (\"—\": the lr never reached the target).\n"]
    lrs = sw.get("lrs", [])
    rows = [[B, *(fmt(sw["steps_by_lr"].get(str(B), {}).get(f"{v:.6g}", []), 0) for v in lrs),
             f"{sw['lr'][str(B)]:.3g}" if str(B) in sw["lr"] else "—", fmt(sw["steps"].get(str(B), []), 0),
             f"{cuts[B] * 100:.0f} %" if B in cuts else "—"] for B in sw["batches"]]
    out.append(table(["batch B", *(f"steps at lr {v:.3g}" for v in lrs), "tuned lr", "steps to target",
                      "doubling B cuts them by"], rows))
    out.append(f"\nB* = {bstar}: the smallest batch whose doubling cuts the steps by less than "
               f"{(1 - z['saturation']) * 100:.0f} %: sync SGD has stopped scaling there." if sw["saturated"] else
               f"\nNo batch of the sweep saturated: doubling the batch still cut the steps by "
               f"{min(cuts.values()) * 100:.0f} % or more up to B = {max(sw['batches'])}, so sync SGD was still "
               f"scaling and the paper's precondition does not hold; the rows below run at B = {bstar} "
               "(`sync_saturated: false`)." if cuts else "\nThe sweep did not finish.")
    at = f"B* = {bstar}" if sw["saturated"] else f"B = {bstar}"
    out.append(f"\n**At {at}**: test cross-entropy and error (the mean over a run's group models), steps "
               "for group 0 to reach sync-2B's final validation loss of the same seed (the same initial weights; "
               "interpolated between validation points; \"(k/n)\": only k of n got there), and the teachers' "
               f"measured age. {', '.join(CHURN)}: seeds {res['seeds'] + res['churn_seeds']} (the churn seeds "
               f"included); the other rows: seeds {res['seeds']}.\n")
    names = ROWS + [f"age-{d}" for d in z["ages"]] + ["ls"]
    used = lrs_at(z, sw, bstar)
    labels = {"sync-2B": f"sync, 2 ranks x {bstar} (lr {used[2 * bstar]:.3g})",
              "alone": f"one group alone, 1 rank x {bstar} (lr {used[bstar]:.3g}, every row below too)",
              "codistill": "codistill, teacher age 0",
              "ls": "label-smoothing control (2 groups on disjoint halves, E chosen on validation)"}
    out.append(table(["run", "test cross-entropy", "test error %", "steps to sync-2B's loss", "teacher age (mean)"], [
        [labels.get(n, n.replace("age-", "codistill, teacher age ")), fmt(_col(res, n).values(), 4),
         fmt(_col(res, n, "test_error").values(), 2, 100),
         fmt([v.get("steps_to_sync") for v in res["values"].get(n, {}).values()], 0),
         fmt(_col(res, n, "staleness_mean").values(), 1)] for n in names]))
    eps = [v["epsilon"] for v in res["values"].get("ls", {}).values()]
    if eps:
        out.append(f"\nThe control's E per seed: {', '.join(f'{e:g}' for e in eps)}.")
    ch = res.get("churn", {})
    if ch:
        out.append("\n**Churn between retrains** (disjoint seed pairs, the 10k test images):\n")
        out.append(table(["models", "pairs", "top-1 disagreement %", "mean Δp (total variation)"], [
            [n, len(v), fmt([p["top1"] for p in v.values()], 2, 100), fmt([p["tv"] for p in v.values()], 4)]
            for n, v in ch.items()]))
    within = _col(res, "codistill", "within_run_churn")
    if within:
        out.append(f"\nThe two groups of one codistill run disagree on {fmt(within.values(), 2, 100)} % of test "
                   "images (summary.json `codistill.churn`).")
    return "\n".join(out)


def _cuts(sw: dict) -> dict:
    """B -> the share of the steps to target that doubling B cut (from the sweep's means)."""
    m = {int(B): v for B, v in sw["steps_mean"].items() if v}
    return {B: 1 - m[2 * B] / m[B] for B in m if 2 * B in m}


def verdicts(res: dict) -> list[Row]:
    """Effects paired per seed (churn: per disjoint seed pair), positive = the paper's direction."""
    z, sw = res["sizes"], res["sweep"]
    extra = {"sync_saturated": bool(sw["saturated"]), "batch": sw["bstar"] or z["default_bstar"]}
    note = "" if sw["saturated"] else " (sync SGD was not saturated: the precondition does not hold)"
    rows = []
    sync_steps, cod_steps = _col(res, "sync-2B", "steps_to_sync"), _col(res, "codistill", "steps_to_sync")
    capped = {s: res["values"]["codistill"][s].get("steps_to_sync") or float(z["steps"])
              for s in res["values"].get("codistill", {})}  # not reached: the run's length, a lower bound
    faster = paired(sync_steps, capped)
    ratio = mean_std(sync_steps.values())[0] / mean_std(capped.values())[0] if capped else float("nan")
    reached = f"{len(cod_steps)}/{len(capped)}"
    cuts = _cuts(sw)
    still = None if sw["saturated"] or not cuts else (
        f"sync SGD still scaling: doubling its batch cut the steps to target by {min(cuts.values()) * 100:.0f} % or "
        f"more up to B = {max(sw['batches'])}")
    rows.append(Row.of("codistill", "where sync SGD stops scaling, 2-way codistillation reaches the loss of sync at "
                       "twice the batch in about half the steps", faster,
                       f"steps to sync-2B's final loss, sync-2B − codistill: {faster.text(0)} (codistill reached it "
                       f"in {reached} seeds, the others counted at {z['steps']}); codistill took {1 / ratio:.2f}x "
                       f"sync-2B's steps{note}", enough=ratio >= 1.5, untestable=still, **extra))
    for claim, a, b in (("each codistilled model beats its group trained alone (test cross-entropy)", "alone",
                         "codistill"),
                        ("codistillation beats the label-smoothing control of equal weight, E tuned", "ls",
                         "codistill"),
                        ("disjoint data beats shared data (finite data, several epochs)", "shared-data",
                         "codistill")):
        e = paired(_col(res, a), _col(res, b))
        err = paired(_col(res, a, "test_error"), _col(res, b, "test_error"))
        rows.append(Row.of("codistill", claim, e, f"test cross-entropy {a} − {b}: {e.text(4)}; test error "
                           f"{err.text(2, 100, ' pt')}", **extra))
    ages = z["ages"]
    if ages:
        stale = paired(_col(res, f"age-{max(ages)}"), _col(res, "codistill"))
        more = "; ".join(f"age {d} − age 0: {paired(_col(res, f'age-{d}'), _col(res, 'codistill')).text(4)}"
                         for d in ages if d != max(ages))
        rows.append(Row.of("codistill", f"very stale teachers ({max(ages)} steps, {max(ages) / z['steps']:.0%} of the "
                           "run) train worse than fresh ones", stale,
                           f"test cross-entropy, age {max(ages)} − age 0: {stale.text(4)}"
                           + (f"; {more}" if more else ""), **extra))
    ch = res.get("churn", {})
    for what, label, digits, scale in (("top1", "top-1 disagreement", 2, 100),
                                       ("tv", "mean Δp, the total variation", 4, 1)):
        a = {i: p[what] for i, p in ch.get("sync-2B", {}).items()}
        b = {i: p[what] for i, p in ch.get("codistill", {}).items()}
        c = {i: p[what] for i, p in ch.get("alone", {}).items()}
        e = paired(a, b)
        rows.append(Row.of("codistill", f"codistillation reduces churn between retrains ({label})", e,
                           f"sync-2B − codistill over {e.n} disjoint seed pairs: {e.text(digits, scale)}; sync-2B "
                           f"{fmt(a.values(), digits, scale)}, codistill {fmt(b.values(), digits, scale)}"
                           + (f"; alone − codistill {paired(c, b).text(digits, scale)} (alone "
                              f"{fmt(c.values(), digits, scale)})" if c else ""), **extra))
    return rows


# --- plots ----------------------------------------------------------------------------------------

def plots(res: dict, img_dir, rel: str) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    sw = res["sweep"]
    pts = [(B, sw["steps_mean"].get(str(B))) for B in sw["batches"] if sw["steps_mean"].get(str(B))]
    if pts:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(*zip(*pts), marker="o", label="sync SGD, 1 rank")
        if sw["bstar"]:
            ax.axvline(sw["bstar"], color="grey", ls="--", label=f"B* = {sw['bstar']}")
        ax.set(xscale="log", xlabel="batch B", ylabel="steps to the target validation loss")
        ax.set_xticks([B for B, _ in pts], [str(B) for B, _ in pts])
        ax.minorticks_off()  # log-scale minor labels (3 x 10^2 ...) overlap the batch labels
        ax.set_title("Where sync SGD stops scaling", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.savefig(img_dir / "codistill_batch_sweep.png", dpi=150, bbox_inches="tight")
        plt.close(fig)
        made.append(("Batch-size sweep", f"{rel}/codistill_batch_sweep.png"))
    z = res["sizes"]
    panels = [("codistill_val_loss.png", "Codistillation at B* (validation loss, mean over seeds and groups)",
               ROWS + [f"ls-{e:g}" for e in z["smoothing"]]),
              ("codistill_teacher_age.png", "Teacher age (TEACHER_AGE = D)",
               ["alone", "codistill"] + [f"age-{d}" for d in z["ages"]])]
    for fname, title, names in panels:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        drawn = []
        for name in names:
            curve = res["curves"].get(name)
            if not curve:
                continue
            s, m, sd = (np.array(v) for v in zip(*curve))
            line, = ax.plot(s, m, label="codistill, age 0" if name == "codistill" else name, zorder=3)
            ax.fill_between(s, m - sd, m + sd, alpha=0.12, color=line.get_color(), lw=0, zorder=2)
            drawn.append(m)
        if not drawn:
            plt.close(fig)
            continue
        late = np.concatenate([d[len(d) // 3:] for d in drawn])  # where the runs differ
        lo, hi = float(late.min()), float(late.max())
        ax.set_ylim(lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo))
        ax.axvline(z["burn_in"], color="grey", lw=0.8, ls=":")
        ax.set(xlabel="step", ylabel="validation cross-entropy")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        fig.savefig(img_dir / fname, dpi=150, bbox_inches="tight")
        plt.close(fig)
        made.append((title, f"{rel}/{fname}"))
    return made
