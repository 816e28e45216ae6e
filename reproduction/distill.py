"""Experiment 3 — knowledge distillation (Hinton, Vinyals, Dean 2015) on `digits-aug`, every model
selected on validation.

Runs, per seed s (one rank each; digits-aug: 60k training, 5k validation, 10k test images):

  teacher-k        mlp-large (2 x 1200 ReLU, dropout 0.2: the paper's teacher shape), k = 0, 1, 2
                   (HPCDISTILL_SEED = s + 1000 k)
  student-alone    mlp-small (2 x 32 ReLU) on the labels
  student-ls-E     the same with labels smoothed by E (HPCDISTILL_TASK_LABEL_SMOOTHING), E = 0.05, 0.1,
                   0.2: the control, a soft target that knows nothing of which classes look alike; per
                   seed the E with the lowest validation loss is the control's model
  distill-T{T}     mlp-small distilled from teacher-0 at temperature T (1, 2, 4, 8), weight 0.9 on the soft
                   term and 0.1 on the labels
  ensemble-T4      the same from the averaged soft targets of teachers 0, 1 and 2 at T = 4
  omit3-distill    distilled at T = 20 with every "3" left out of the transfer set
  omit3-labels     control: the same transfer set without 3s, labels only (weight 0: no teacher)

**Model selection (early stopping)**: validation every EVAL steps with a checkpoint at each; a run's model
is the checkpoint with the lowest validation loss, and its test error and cross-entropy are computed
here from that checkpoint. Students train long enough to pass their best validation loss.
For the omitted class, accuracy on the test set's 3s is computed with and without the paper's bias
correction: a constant added to the logit of class 3, chosen on the validation set.
"""

from __future__ import annotations

import numpy as np

from common import DATA_DIR, fmt, load_model, mean_std, predict, table
from stats import Row, paired

OMITTED = 3
DATA = "digits-aug"
SEEDS = 8  # the 8-10: distillation's effects are a few tenths of a point of test error


def sizes(quick: bool) -> dict:
    full = {"teacher_steps": 1500, "student_steps": 3000, "batch": 64, "eval_every": 200, "alpha": 0.9,
            "temperatures": [1, 2, 4, 8], "ensemble_T": 4, "teachers": 3, "smoothing": [0.05, 0.1, 0.2],
            "omit_T": 20}
    if not quick:
        return full
    # --quick: every kind of run once per seed but the T sweep, a few hundred steps: the suite's check
    return {**full, "teacher_steps": 200, "student_steps": 400, "eval_every": 100, "temperatures": [4],
            "teachers": 2, "smoothing": [0.1]}


def run(runner, seeds: list[int], quick: bool) -> dict:
    z = sizes(quick)
    base = {"HPCDISTILL_DATASET": DATA, "HPCDISTILL_BATCH_SIZE": z["batch"],
            "HPCDISTILL_EVAL_EVERY": z["eval_every"], "HPCDISTILL_CHECKPOINT_EVERY": z["eval_every"],
            "HPCDISTILL_KEEP_CHECKPOINTS": 1000}  # every evaluated step: the selected one must be there
    runs = {}
    for seed in seeds:
        teachers = []
        for k in range(z["teachers"]):
            t = runner.run(f"distill/teacher{k}-s{seed}", 1,
                           {**base, "HPCDISTILL_MODE": "sync", "HPCDISTILL_MODEL": "mlp-large",
                            "HPCDISTILL_STEPS": z["teacher_steps"], "HPCDISTILL_SEED": seed + 1000 * k})
            runs[(f"teacher{k}", seed)] = t
            teachers.append(t)
        s = {**base, "HPCDISTILL_MODEL": "mlp-small", "HPCDISTILL_STEPS": z["student_steps"], "HPCDISTILL_SEED": seed}
        runs[("student-alone", seed)] = runner.run(f"distill/student-alone-s{seed}", 1,
                                                   {**s, "HPCDISTILL_MODE": "sync"})
        for eps in z["smoothing"]:
            runs[(f"student-ls-{eps:g}", seed)] = runner.run(
                f"distill/student-ls-{eps:g}-s{seed}", 1,
                {**s, "HPCDISTILL_MODE": "sync", "HPCDISTILL_TASK_LABEL_SMOOTHING": eps})
        if not all(t.ok for t in teachers):
            continue
        chosen = [str(_selected(t)) for t in teachers]
        d = {**s, "HPCDISTILL_MODE": "distill", "HPCDISTILL_DISTILL_WEIGHT": z["alpha"]}
        for T in z["temperatures"]:
            runs[(f"distill-T{T}", seed)] = runner.run(
                f"distill/distill-T{T}-s{seed}", 1,
                {**d, "HPCDISTILL_TEACHERS": chosen[0], "HPCDISTILL_TEMPERATURE": T})
        runs[("ensemble", seed)] = runner.run(
            f"distill/ensemble-T{z['ensemble_T']}-s{seed}", 1,
            {**d, "HPCDISTILL_TEACHERS": ":".join(chosen), "HPCDISTILL_TEMPERATURE": z["ensemble_T"]})
        omit = {**d, "HPCDISTILL_TEACHERS": chosen[0], "HPCDISTILL_TEMPERATURE": z["omit_T"],
                "HPCDISTILL_OMIT_CLASSES": OMITTED}
        runs[("omit3-distill", seed)] = runner.run(f"distill/omit3-distill-s{seed}", 1, omit)
        runs[("omit3-labels", seed)] = runner.run(f"distill/omit3-labels-s{seed}", 1,
                                                  {**omit, "HPCDISTILL_DISTILL_WEIGHT": 0})
    return analyse(runs, seeds, quick)


def _selected(run):
    """The checkpoint of the evaluated step with the lowest validation loss (early stopping)."""
    from hpcdistill.checkpoints.manager import numbered_files

    curve = run.val_curve()
    files = dict(numbered_files(run.path / "checkpoints"))
    candidates = [(loss, step) for step, loss in curve if step in files]
    if not candidates:
        raise FileNotFoundError(f"no checkpoint at an evaluated step in {run.path}")
    return files[min(candidates)[1]]


def _test_stats(path) -> dict:
    """Test error and mean cross-entropy (nats) of a checkpoint's model on the test set."""
    logits, labels = predict(load_model(path), DATA_DIR / DATA / "test.h5")
    z = logits - logits.max(-1, keepdims=True)
    nll = np.log(np.exp(z).sum(-1)) - z[np.arange(len(labels)), labels]
    return {"error": float((logits.argmax(-1) != labels).mean()), "loss": float(nll.mean())}


def _omitted_class(path) -> dict:
    """Accuracy on the omitted class's test images, raw and after a val-chosen bias on its logit."""
    model = load_model(path)
    zv, yv = predict(model, DATA_DIR / DATA / "val.h5")
    zt, yt = predict(model, DATA_DIR / DATA / "test.h5")
    grid = np.arange(0.0, 20.01, 0.25)

    def acc(z, y, b):
        z = z.copy()
        z[:, OMITTED] += b
        return z.argmax(-1) == y

    best = max(grid, key=lambda b: (acc(zv, yv, b).mean(), -b))  # the smallest bias among the best
    raw, fixed = acc(zt, yt, 0.0), acc(zt, yt, best)
    is3 = yt == OMITTED
    return {"acc_3": float(raw[is3].mean()), "acc_3_bias": float(fixed[is3].mean()), "bias": float(best),
            "error_bias": float((~fixed).mean())}


def analyse(runs: dict, seeds: list[int], quick: bool) -> dict:
    """seed -> figures of each run's selected model; the label-smoothing control is, per seed, the E
    with the lowest validation loss."""
    z = sizes(quick)
    res = {"sizes": z, "seeds": seeds, "commands": {}, "failed": [], "values": {}, "selected_step": {}}
    for (name, seed), r in runs.items():
        if seed == seeds[0]:
            res["commands"][name] = r.command
        if not r.ok:
            res["failed"].append(f"{r.name}: {r.error}")
            continue
        path = _selected(r)
        figures = _omitted_class(path) if name.startswith("omit3") else _test_stats(path)
        figures["val_loss"] = min(loss for _, loss in r.val_curve())
        res["values"].setdefault(name, {})[str(seed)] = figures
        res["selected_step"].setdefault(name, {})[str(seed)] = int(path.stem.split("-")[1])
    ls = {}
    for seed in map(str, seeds):
        options = [(v[seed]["val_loss"], name) for name, v in res["values"].items()
                   if name.startswith("student-ls-") and seed in v]
        if options:
            name = min(options)[1]
            ls[seed] = {**res["values"][name][seed], "epsilon": float(name.split("-")[-1])}
            res["selected_step"].setdefault("student-ls", {})[seed] = res["selected_step"][name][seed]
    res["values"]["student-ls"] = ls
    dsum = next((r.summary["distill"] for (n, _), r in runs.items() if r.ok and r.summary.get("distill")), {})
    res["parameters"] = {"teacher": dsum.get("teacher_parameters"), "student": dsum.get("student_parameters")}
    return res


# --- the document's section and verdicts (reproduction/doc.py calls these) -------------------------

def _col(res, name, what="error") -> dict:
    return {s: v[what] for s, v in res["values"].get(name, {}).items() if what in v}


def section(res: dict) -> str:
    z, p = res["sizes"], res.get("parameters", {})
    out = ["## 3. Knowledge distillation (Hinton et al. 2015)\n",
           f"`digits-aug` (60k training, 5k validation, 10k test images), one rank, batch {z['batch']}. Teachers: "
           f"`mlp-large` ({p.get('teacher') or '?'} parameters), {z['teacher_steps']} steps, {z['teachers']} per seed. "
           f"Students: `mlp-small` ({p.get('student') or '?'} parameters), {z['student_steps']} steps, distilled "
           f"with weight {z['alpha']} on the soft term. Every model is the checkpoint with the lowest validation "
           f"loss (validation every {z['eval_every']} steps). Seeds {res['seeds']}.\n"]
    names = ([f"teacher{k}" for k in range(z["teachers"])] + ["student-alone", "student-ls"]
             + [f"distill-T{T}" for T in z["temperatures"]] + ["ensemble"])
    labels = {"student-ls": "student, labels smoothed (E chosen on validation)",
              "ensemble": f"distilled from {z['teachers']} teachers, T = {z['ensemble_T']}"}
    out.append(table(["model", "test error %", "test cross-entropy", "selected step (mean)"], [
        [labels.get(n, n), fmt(_col(res, n).values(), 2, 100), fmt(_col(res, n, "loss").values(), 4),
         fmt(res["selected_step"].get(n, {}).values(), 0)] for n in names]))
    om = res["values"].get("omit3-distill"), res["values"].get("omit3-labels")
    if all(om):
        out.append(f"\nA student that never saw a 3 (T = {z['omit_T']}): accuracy on the test 3s "
                   f"{fmt([v['acc_3'] for v in om[0].values()], 1, 100)} % raw, "
                   f"{fmt([v['acc_3_bias'] for v in om[0].values()], 1, 100)} % with a bias on the 3 logit chosen "
                   f"on validation; labels-only control {fmt([v['acc_3'] for v in om[1].values()], 1, 100)} %.\n")
    return "\n".join(out)


def verdicts(res: dict) -> list[Row]:
    """Effects paired per seed, positive = the paper's direction (stats.py)."""
    z, rows = res["sizes"], []
    alone, teacher, T = _col(res, "student-alone"), _col(res, "teacher0"), z["ensemble_T"]
    best = f"distill-T{T}"
    gain, gap = paired(alone, _col(res, best)), paired(alone, teacher)
    closed = gain.mean / gap.mean if gain.n and gap.n and gap.mean > 0 else float("nan")
    rows.append(Row.of("distill", f"a distilled small student (T = {T}) closes most of its gap to the teacher "
                       "(test error)", gain,
                       f"student alone − distilled: {gain.text(2, 100, ' pt')}; teacher gap "
                       f"{gap.text(2, 100, ' pt')}; {closed * 100:.0f} % of it closed", enough=closed >= 0.5))
    lgain, lgap = paired(_col(res, "student-alone", "loss"), _col(res, best, "loss")), \
        paired(_col(res, "student-alone", "loss"), _col(res, "teacher0", "loss"))
    lclosed = lgain.mean / lgap.mean if lgain.n and lgap.n and lgap.mean > 0 else float("nan")
    rows.append(Row.of("distill", "the same by test cross-entropy", lgain,
                       f"student alone − distilled: {lgain.text(4)}; {lclosed * 100:.0f} % of the gap closed",
                       enough=lclosed >= 0.5))
    ls = paired(_col(res, "student-ls"), _col(res, best))
    rows.append(Row.of("distill", "distillation beats the label-smoothing student control (test error)", ls,
                       f"smoothed labels − distilled: {ls.text(2, 100, ' pt')}"))
    ens = paired(_col(res, best), _col(res, "ensemble"))
    rows.append(Row.of("distill", f"an ensemble of {z['teachers']} teachers distills a better student than one", ens,
                       f"one teacher − ensemble: {ens.text(2, 100, ' pt')}"))
    if "distill-T1" in res["values"]:
        t1 = paired(_col(res, "distill-T1"), _col(res, best))
        rows.append(Row.of("distill", f"a raised temperature (T = {T}) beats T = 1", t1,
                           f"T = 1 − T = {T}: {t1.text(2, 100, ' pt')}"))
    om, lab = res["values"].get("omit3-distill", {}), res["values"].get("omit3-labels", {})
    got = paired({s: v["acc_3_bias"] for s, v in om.items()}, {s: v["acc_3"] for s, v in lab.items()})
    acc3 = mean_std([v["acc_3_bias"] for v in om.values()])[0]
    rows.append(Row.of("distill", "a student that never saw a 3 still recognises most 3s (after the bias "
                       "correction)", got,
                       f"accuracy on the test 3s, distilled − labels only: {got.text(1, 100, ' pt')}; distilled "
                       f"{acc3 * 100:.1f} %", enough=acc3 >= 0.5))
    return rows
