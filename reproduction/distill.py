"""Experiment 3 — knowledge distillation (Hinton, Vinyals, Dean 2015) on `digits`.

Runs, per seed (all on one rank; digits is 1257 training images):

  teacher          mlp-large (2 x 1200 ReLU, dropout 0.2: the paper's teacher shape), sync mode, 600 steps
  student-alone    mlp-small (2 x 32 ReLU) trained on the labels, 1500 steps (as every student: long
                   enough for the student alone to start overfitting, where the soft targets help most)
  distill-T{T}     mlp-small distilled from the teacher at temperature T (T sweep), weight a on the
                   soft term and 1 - a on the labels
  omit3-distill    the same at T = 20 with every "3" left out of the transfer set (HPCDISTILL_OMIT_CLASSES=3)
  omit3-labels     control: the same transfer set without 3s, labels only (a = 0: no teacher)

Test errors are counted on the 360 test images (Hinton et al.'s table counts errors on MNIST's 10000),
and the test cross-entropy is computed on the same images (continuous, so less coarse than a gap of
a few images).
For the omitted class, accuracy on the test set's 3s is computed here from the saved student
checkpoint, with and without the paper's bias correction: a constant added to the logit of class 3,
chosen here on the validation set (Hinton et al. chose theirs to do well on the test set).
"""

from __future__ import annotations

import numpy as np

from common import DATA_DIR, fmt, load_model, mean_std, predict

OMITTED = 3


def sizes(quick: bool) -> dict:
    return {"steps": 600, "student_steps": 1500, "batch": 32, "alpha": 0.9, "temperatures": [1, 2, 4, 8, 20],
            "omit_T": 20}


def run(runner, seeds: list[int], quick: bool) -> dict:
    z = sizes(quick)
    base = {"HPCDISTILL_DATASET": "digits", "HPCDISTILL_STEPS": z["steps"], "HPCDISTILL_BATCH_SIZE": z["batch"],
            "HPCDISTILL_EVAL_EVERY": 100, "HPCDISTILL_CHECKPOINT_EVERY": z["steps"], "HPCDISTILL_KEEP_CHECKPOINTS": 1}
    runs = {}
    for seed in seeds:
        b = {**base, "HPCDISTILL_SEED": seed}
        teacher = runner.run(f"distill/teacher-s{seed}", 1,
                             {**b, "HPCDISTILL_MODE": "sync", "HPCDISTILL_MODEL": "mlp-large"})
        runs[("teacher", seed)] = teacher
        b = {**b, "HPCDISTILL_STEPS": z["student_steps"], "HPCDISTILL_CHECKPOINT_EVERY": z["student_steps"]}
        runs[("student-alone", seed)] = runner.run(f"distill/student-alone-s{seed}", 1,
                                                   {**b, "HPCDISTILL_MODE": "sync", "HPCDISTILL_MODEL": "mlp-small"})
        if not teacher.ok:
            continue
        d = {**b, "HPCDISTILL_MODE": "distill", "HPCDISTILL_MODEL": "mlp-small",
             "HPCDISTILL_TEACHERS": teacher.checkpoint(), "HPCDISTILL_DISTILL_WEIGHT": z["alpha"]}
        for T in z["temperatures"]:
            runs[(f"distill-T{T}", seed)] = runner.run(f"distill/distill-T{T}-s{seed}", 1,
                                                       {**d, "HPCDISTILL_TEMPERATURE": T})
        omit = {**d, "HPCDISTILL_TEMPERATURE": z["omit_T"], "HPCDISTILL_OMIT_CLASSES": OMITTED}
        runs[("omit3-distill", seed)] = runner.run(f"distill/omit3-distill-s{seed}", 1, omit)
        runs[("omit3-labels", seed)] = runner.run(f"distill/omit3-labels-s{seed}", 1,
                                                  {**omit, "HPCDISTILL_DISTILL_WEIGHT": 0})
    return analyse(runs, seeds, quick)


def _test_stats(run) -> tuple[int, float]:
    """Test errors and mean cross-entropy (nats) of the run's (single) model on the digits test set,
    recomputed from its checkpoint."""
    logits, labels = predict(load_model(run.checkpoint()), DATA_DIR / "digits" / "test.h5")
    z = logits - logits.max(-1, keepdims=True)
    nll = np.log(np.exp(z).sum(-1)) - z[np.arange(len(labels)), labels]
    return int((logits.argmax(-1) != labels).sum()), float(nll.mean())


def _omitted_class(run) -> dict:
    """Errors overall and on the omitted class, raw and after a val-chosen bias on its logit."""
    model = load_model(run.checkpoint())
    zv, yv = predict(model, DATA_DIR / "digits" / "val.h5")
    zt, yt = predict(model, DATA_DIR / "digits" / "test.h5")
    grid = np.arange(0.0, 20.01, 0.25)
    def acc(z, y, b):
        z = z.copy()
        z[:, OMITTED] += b
        return (z.argmax(-1) == y)
    best = max(grid, key=lambda b: (acc(zv, yv, b).mean(), -b))  # smallest bias among the best
    raw, fixed = acc(zt, yt, 0.0), acc(zt, yt, best)
    is3 = yt == OMITTED
    return {"errors": int((~raw).sum()), "errors_3": int((~raw[is3]).sum()), "n3": int(is3.sum()),
            "acc_3": float(raw[is3].mean()), "bias": float(best), "errors_bias": int((~fixed).sum()),
            "errors_3_bias": int((~fixed[is3]).sum()), "acc_3_bias": float(fixed[is3].mean())}


def analyse(runs: dict, seeds: list[int], quick: bool) -> dict:
    z = sizes(quick)
    ok = {k: r for k, r in runs.items() if r.ok}
    res = {"sizes": z, "seeds": seeds, "commands": {}, "failed": [], "rows": [], "temperature": []}
    for (name, seed), r in runs.items():
        if seed == seeds[0]:
            res["commands"][name] = r.command
        if not r.ok:
            res["failed"].append(f"{r.name}: {r.error}")
    stats = {k: _test_stats(r) for k, r in ok.items() if not k[0].startswith("omit3")}
    errors = {k: e for k, (e, _) in stats.items()}
    losses = {k: nll for k, (_, nll) in stats.items()}
    n_test = 360

    def col(name, table=errors):
        return [table.get((name, s)) for s in seeds]

    def gap_closed(name, table=errors):
        out = []
        for s in seeds:
            t, a, d = table.get(("teacher", s)), table.get(("student-alone", s)), table.get((name, s))
            if None not in (t, a, d) and a != t:
                out.append((a - d) / (a - t))
        return out

    for name in ["teacher", "student-alone"] + [f"distill-T{T}" for T in z["temperatures"]]:
        row = {"name": name, "errors": fmt(col(name), 1), "error_pct": fmt([e / n_test if e is not None else None
                                                                            for e in col(name)], 2, 100),
               "errors_mean": mean_std(col(name))[0], "errors_list": col(name),
               "loss": fmt(col(name, losses), 3), "loss_list": col(name, losses)}
        if name.startswith("distill"):
            row["gap_closed"] = fmt(gap_closed(name), 0, 100)
            row["gap_closed_mean"] = mean_std(gap_closed(name))[0]
            row["loss_gap_closed"] = fmt(gap_closed(name, losses), 0, 100)
            row["loss_gap_closed_list"] = gap_closed(name, losses)
        res["rows"].append(row)
    dsum = next((r.summary["distill"] for (n, _), r in ok.items()
                 if n.startswith("distill-") and r.summary.get("distill")), {})
    teacher_params = dsum.get("teacher_parameters")
    for row in res["rows"]:
        row["parameters"] = teacher_params if row["name"] == "teacher" else dsum.get("student_parameters")
    res["teacher_parameters"] = teacher_params
    res["omitted"] = {}
    for name in ("omit3-labels", "omit3-distill"):
        parts = [_omitted_class(ok[(name, s)]) for s in seeds if (name, s) in ok]
        if parts:
            res["omitted"][name] = {k: fmt([p[k] for p in parts], 1 if "errors" in k or k == "bias" else 2,
                                           100 if k.startswith("acc") else 1)
                                    for k in parts[0] if k != "n3"} | {"n3": parts[0]["n3"], "raw": parts}
    return res


def plots(res: dict, img_dir, rel: str) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    temps = res["sizes"]["temperatures"]
    rows = {r["name"]: r for r in res["rows"]}
    ys = [rows.get(f"distill-T{T}", {}).get("errors_mean") for T in temps]
    if all(y is None for y in ys):
        return []
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot(temps, ys, "o-", label="distilled mlp-small")
    for name, style in (("teacher", "g--"), ("student-alone", "r--")):
        if rows.get(name, {}).get("errors_mean") is not None:
            ax.axhline(rows[name]["errors_mean"], ls=style[1:], color=style[0],
                       label=(f"{name} ({res['sizes']['steps']} steps)" if name == "teacher" else
                              f"{name} ({res['sizes'].get('student_steps', res['sizes']['steps'])} steps)"))
    ax.set_xscale("log")
    ax.set_xticks(temps, [str(t) for t in temps])
    ax.set(xlabel="temperature T", ylabel="test errors (of 360), mean over seeds",
           title="Distillation on digits: temperature sweep")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(img_dir / "distill_temperature.png", dpi=110)
    plt.close(fig)
    return [("Distillation temperature sweep", f"{rel}/distill_temperature.png")]
