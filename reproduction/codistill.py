"""Experiment 1 — codistillation (Anil et al. 2018) against sync SGD at the same number of ranks (4).

Character-level language model (`text`, charlm-small, AdamW): the data-rich regime of the paper (no
window is seen twice within these step counts). Runs, per seed:

  sync-4           one model, 4 ranks, global batch 4 x B (adding workers to sync SGD)
  sync-2           one model, 2 ranks, global batch 2 x B (what one codistilling group is, alone)
  codistill        2 groups x 2 ranks, disjoint data, peer checkpoints every 50 steps
  label-smoothing  same, the peers' predictions replaced by smoothed labels of the same weight
  shared-data      same as codistill, both groups drawing from all the data
  burn-in-150      codistill with the distillation term switched on at step 150 instead of 50
  exchange-K       codistill with checkpoints exchanged every K steps (staleness sweep)

Churn (paper section 3.5) is measured between two retrains with different seeds: the final models of
sync-4 seed a and seed b, against group g of codistill seed a and group g of codistill seed b
(recomputed here from the checkpoints); the disagreement of the two groups inside one codistill run
(summary.json codistill.churn) is shown too.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np

from common import DATA_DIR, crossing_step, fmt, load_model, mean_std, predict

CHURN_WINDOWS = 2048  # test windows used for churn, as the trainer's own summary (131072 tokens)


def sizes(quick: bool) -> dict:
    return {"steps": 300, "batch": 32, "eval_every": 25,
            "exchange_sweep": [1, 10, 200] if quick else [1, 10, 100, 200]}


def configs(quick: bool) -> list[tuple[str, int, dict]]:
    z = sizes(quick)
    base = {"HPCDISTILL_DATASET": "text", "HPCDISTILL_MODEL": "charlm-small", "HPCDISTILL_STEPS": z["steps"],
            "HPCDISTILL_BATCH_SIZE": z["batch"], "HPCDISTILL_EVAL_EVERY": z["eval_every"],
            "HPCDISTILL_CHECKPOINT_EVERY": z["steps"], "HPCDISTILL_KEEP_CHECKPOINTS": 1}
    codist = {**base, "HPCDISTILL_MODE": "codistill", "HPCDISTILL_GROUPS": 2, "HPCDISTILL_EXCHANGE_EVERY": 50,
              "HPCDISTILL_BURN_IN": 50, "HPCDISTILL_DISTILL_WEIGHT": 0.5, "HPCDISTILL_TEMPERATURE": 1.0,
              "HPCDISTILL_DATA_SPLIT": "disjoint", "HPCDISTILL_CODISTILL_TARGET": "peers"}
    out = [("sync-4", 4, {**base, "HPCDISTILL_MODE": "sync"}),
           ("sync-2", 2, {**base, "HPCDISTILL_MODE": "sync"}),
           ("codistill", 4, codist),
           ("label-smoothing", 4, {**codist, "HPCDISTILL_CODISTILL_TARGET": "label-smoothing"}),
           ("shared-data", 4, {**codist, "HPCDISTILL_DATA_SPLIT": "shared"}),
           # diagnostic, not in the paper's list: the distillation term starts at step 150 instead of 50
           ("burn-in-150", 4, {**codist, "HPCDISTILL_BURN_IN": 150})]
    out += [(f"exchange-{k}", 4, {**codist, "HPCDISTILL_EXCHANGE_EVERY": k}) for k in z["exchange_sweep"]]
    return out


def run(runner, seeds: list[int], quick: bool) -> dict:
    runs = {}
    for seed in seeds:  # seed-major: an interrupted suite still has every config for the first seeds
        for name, np_, settings in configs(quick):
            runs[(name, seed)] = runner.run(f"codistill/{name}-s{seed}", np_, {**settings, "HPCDISTILL_SEED": seed})
    return analyse(runs, seeds, quick)


# --- analysis -------------------------------------------------------------------------------------

def _models(run) -> list[int]:
    return [g["group"] for g in run.groups()]


def _top1(run, group: int) -> np.ndarray:
    logits, _ = predict(load_model(run.checkpoint(group)), DATA_DIR / "text" / "test.h5", limit=CHURN_WINDOWS)
    return logits.argmax(-1)


def analyse(runs: dict, seeds: list[int], quick: bool) -> dict:
    names = [n for n, _, _ in configs(quick)]
    ok = {k: r for k, r in runs.items() if r.ok}
    res = {"sizes": sizes(quick), "seeds": seeds, "commands": {}, "failed": [], "rows": [], "curves": {}}
    for (name, seed), r in runs.items():
        if seed == seeds[0]:
            res["commands"][name] = r.command
        if not r.ok:
            res["failed"].append(f"{r.name}: {r.error}")
    # targets, per seed (same initialisation): the final validation loss of sync-4 and of sync-2
    targets = {ref: {s: ok[(ref, s)].groups()[0]["val_loss"] for s in seeds if (ref, s) in ok}
               for ref in ("sync-4", "sync-2")}
    res["targets"] = {ref: {str(s): v for s, v in t.items()} for ref, t in targets.items()}
    res["final"] = {}  # name -> {"seed/group": final val loss}, for paired comparisons
    for name in names:
        per_seed = [(s, ok[(name, s)]) for s in seeds if (name, s) in ok]
        models = [(s, r, g) for s, r in per_seed for g in r.groups()]  # every trained model counts once
        row = {
            "name": name, "ranks": per_seed[0][1].np if per_seed else None, "runs": len(per_seed),
            "models": len(models),
            "val_loss": fmt([g["val_loss"] for _, _, g in models], 4),
            "test_loss": fmt([g["test_loss"] for _, _, g in models], 4),
            "test_accuracy": fmt([g["test_accuracy"] for _, _, g in models], 2, 100),
            "val_loss_mean": mean_std([g["val_loss"] for _, _, g in models])[0],
            "wall_seconds": fmt([r.summary["wall_seconds"] for _, r in per_seed], 0),
            "samples_per_second": fmt([r.summary["samples_per_second"] for _, r in per_seed], 0),
        }
        for ref, t in targets.items():
            cross = [crossing_step(r.val_curve(g["group"]), t[s]) if s in t else None
                     for s, r, g in models if g["group"] == 0]  # group 0: the same initial weights as the sync run
            row[f"steps_to_{ref}"] = fmt(cross, 0, total=len(cross))
            row[f"steps_to_{ref}_mean"] = mean_std(cross)[0]
            row[f"reached_{ref}"] = sum(c is not None for c in cross)
            row["group0_models"] = len(cross)
        res["final"][name] = {f"{s}/{g['group']}": g["val_loss"] for s, _, g in models}
        cd = [r.summary.get("codistill") for _, r in per_seed if r.summary.get("codistill")]
        if cd:
            row["ensemble_accuracy"] = fmt([c["ensemble_test_accuracy"] for c in cd], 2, 100)
            row["within_run_churn"] = fmt([c["churn"] for c in cd], 2, 100)
            row["staleness_mean"] = fmt([c["teacher_staleness"]["mean"] for c in cd], 1)
            row["staleness_max"] = fmt([c["teacher_staleness"]["max"] for c in cd], 0)
            row["teachers_loaded"] = fmt([c["teachers_loaded"] for c in cd], 0)
            row["exchange_seconds"] = fmt([c["exchange_seconds"] for c in cd], 1)
        res["rows"].append(row)
        res["curves"][name] = _mean_curve([r.val_curve(g["group"]) for _, r, g in models])
        res.setdefault("model_curves", {})[name] = {f"{s}/{g['group']}": r.val_curve(g["group"]) for s, r, g in models}
    res["churn"] = _churn(ok, seeds)
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


def _churn(ok: dict, seeds: list[int]) -> dict:
    """Disagreement (top-1 next character) on the first CHURN_WINDOWS test windows."""
    out = {}
    cache = {}

    def top1(name, seed, group):
        key = (name, seed, group)
        if key not in cache:
            cache[key] = _top1(ok[(name, seed)], group)
        return cache[key]

    for name in ("sync-4", "sync-2", "codistill", "exchange-1", "label-smoothing"):
        pairs = [(a, b) for a, b in combinations(seeds, 2) if (name, a) in ok and (name, b) in ok]
        values = []
        for a, b in pairs:
            for g in _models(ok[(name, a)]):
                values.append(float((top1(name, a, g) != top1(name, b, g)).mean()))
        if values:
            out[f"{name} retrains"] = {"values": values, "text": fmt(values, 2, 100), "pairs": len(values)}
    within = [ok[("codistill", s)].summary["codistill"]["churn"] for s in seeds if ("codistill", s) in ok]
    if within:
        out["codistill groups within a run"] = {"values": within, "text": fmt(within, 2, 100), "pairs": len(within)}
    return out


def plots(res: dict, img_dir, rel: str) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    panels = [("codistill_val_loss.png", "Codistillation vs sync at 4 ranks (text, charlm-small)",
               ["sync-4", "sync-2", "codistill", "label-smoothing", "shared-data"]),
              ("codistill_staleness.png", "Staleness sweep: checkpoints exchanged every K steps",
               ["sync-4"] + sorted([n for n in res["curves"] if n.startswith("exchange-")],
                                   key=lambda n: int(n.split("-")[1])) + ["codistill"])]
    for fname, title, names in panels:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for name in names:
            curve = res["curves"].get(name)
            if not curve:
                continue
            label = "codistill (exchange-50)" if name == "codistill" and "staleness" in fname else name
            s, m, sd = (np.array(v) for v in zip(*curve))
            line, = ax.plot(s, m, label=label, zorder=3)
            ax.fill_between(s, m - sd, m + sd, alpha=0.12, color=line.get_color(), lw=0, zorder=2)
        ax.set(xlabel="step (per group)", ylabel="validation loss (nats/char)")
        ax.set_title(title, fontsize=10, wrap=True)
        drawn = [np.array(v[1]) for n in names if res["curves"].get(n) for v in [list(zip(*res["curves"][n]))]]
        if drawn:  # y limits from every drawn curve (their later half, where they differ), with a margin
            late = np.concatenate([d[len(d) // 2:] for d in drawn])
            lo, hi = float(late.min()), float(np.concatenate(drawn).max())
            ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # off the bands
        fig.savefig(img_dir / fname, dpi=150, bbox_inches="tight")
        plt.close(fig)
        made.append((title, f"{rel}/{fname}"))
    made += _delta_plot(res, img_dir, rel, plt)
    return made


def _delta_plot(res, img_dir, rel, plt) -> list:
    """Validation loss minus sync-2's at the same step and seed (group 0: the same initial weights)."""
    curves = res.get("model_curves", {})
    ref = curves.get("sync-2", {})
    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn = False
    for name, per_model in curves.items():
        if name == "sync-2":
            continue
        deltas = []
        for key, curve in per_model.items():
            if key.endswith("/0") and key in ref:
                r = dict(ref[key])
                deltas.append({st: v - r[st] for st, v in curve if st in r})
        if not deltas:
            continue
        steps = sorted(set.intersection(*(set(d) for d in deltas)))
        mean = [float(np.mean([d[st] for d in deltas])) for st in steps]
        ax.plot(steps, mean, label=name, ls="-" if name in ("sync-4", "codistill", "label-smoothing") else "--")
        drawn = True
    if not drawn:
        plt.close(fig)
        return []
    ax.axhline(0, color="grey", lw=1)
    ax.set(xlabel="step (per group)", ylabel="val loss − sync-2's (same seed)")
    ax.set_title("Paired difference to sync-2\n(group 0 models, mean over seeds; below 0 = better)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.savefig(img_dir / "codistill_delta_vs_sync2.png", dpi=150, bbox_inches="tight")
    plt.close(fig)
    return [("Paired difference to sync-2", f"{rel}/codistill_delta_vs_sync2.png")]
