"""DC-ASGD on MPI one-sided windows: no lost update, the compensation formula, staleness, SSP, stop
flag, and end-to-end async training (alone and inside codistill groups) under real mpirun."""

import json
import sys
import textwrap

import numpy as np
import pytest
import torch

from hpcdistill.checkpoints import CheckpointManager
from hpcdistill.comm.shards import shard_bounds
from hpcdistill.strategies.dcasgd import MEANSQ_EPS, dc_delta

from conftest import ROOT, needs_mpi, run_mpi, train

# A worker script driving AsyncUpdater directly: gradient = a known constant per worker and update
# (loss = <c, w>, c drawn from a generator seeded with (worker, update)), so what each worker pushes
# is known exactly. Every worker dumps its trace. With T_RESUME_AT the lead keeps a checkpoint-style
# snapshot taken after its update T_RESUME_AT; once the first run is over, every rank builds a new
# updater (new windows), the workers restore that checkpoint as the loop does and run to T_UPDATES.
DRIVER = textwrap.dedent('''
    import json, os, sys, time
    import numpy as np, torch
    from hpcdistill.config import Settings
    from hpcdistill.comm.topology import build_topology
    from hpcdistill.strategies.async_rma import AsyncUpdater

    out = sys.argv[1]
    updates = int(os.environ["T_UPDATES"])
    slow = float(os.environ.get("T_SLOW", "0"))         # the last worker sleeps this long per update
    compute = float(os.environ.get("T_COMPUTE", "0"))   # every worker: seconds of "gradient work"
                                                        # between its pull and its push
    stop_at = int(os.environ.get("T_STOP_AT", "-1"))    # worker 1 raises the stop flag after this update
    integer = os.environ.get("T_INTEGER", "1") == "1"
    lr = float(os.environ.get("T_LR", "1.0"))
    rules = os.environ.get("T_RULES", "")            # per-worker rule:lambda0 overrides, comma-separated
    snap_every = int(os.environ.get("T_SNAP_EVERY", "0"))  # lead: checkpoint-style snapshot every k updates
    resume_at = int(os.environ.get("T_RESUME_AT", "0"))
    settings = Settings()
    topo = build_topology(1, horovod=False)
    torch.manual_seed(0)
    model = torch.nn.Linear(int(os.environ.get("T_IN", "64")), 32)
    with torch.no_grad():  # start on a 1/64 grid: with integer gradients and lr 1 every sum is exact
        for p in model.parameters():
            p.copy_(torch.round(p * 64) / 64)
    w0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy().copy()

    def flat(m):
        return torch.cat([p.detach().reshape(-1) for p in m.parameters()]).numpy().copy()

    def run(upd, start, me):
        snaps, ckpt = [], None
        sent = np.zeros(w0.size, np.float64)
        times, k, stopped = [], start, False
        while k < updates:
            rng = np.random.default_rng([1000 + me, k])
            if integer:
                c = rng.integers(-4, 5, size=w0.size).astype(np.float32)
            else:
                c = rng.normal(size=w0.size).astype(np.float32)
            c = torch.from_numpy(c)
            def loss_fn():
                if compute:  # others push meanwhile: staleness that does not hang on the scheduler
                    time.sleep(compute)
                flat = torch.cat([p.reshape(-1) for p in model.parameters()])
                return (flat * c).sum(), {"loss": 0.0}
            if slow and me == upd.num_workers - 1:
                time.sleep(slow)
            t_start = time.monotonic()
            upd.step(model, loss_fn, lr)
            times.append([t_start, time.monotonic()])
            sent += upd.trace[-1]["delta"]
            k += 1
            if me == 0 and ((snap_every and k % snap_every == 0) or k == resume_at):  # as the loop's _save
                snapshot, extra = upd.checkpoint_view(model)
                w = flat(snapshot)
                snaps.append((int(extra["async_version"][0]), extra["async_clocks"].copy(), w))
                if k == resume_at:
                    ckpt = (w, extra, k)
            if upd.agree(me == 1 and k == stop_at):
                stopped = True
                break
        return sent, times, k, stopped, snaps, ckpt

    upd = AsyncUpdater(settings, topo, model, None)
    if upd.is_host:
        upd.serve(); upd.close()
        if resume_at:
            upd = AsyncUpdater(settings, topo, model, None)
            upd.serve(); upd.close()
        sys.exit(0)
    upd.trace = []
    upd.begin(model, 0)
    me = upd.index
    if rules:
        rule, lam = rules.split(",")[me].split(":")
        upd.rule, upd.lambda0 = rule, float(lam)
    sent, times, k, stopped, snaps, ckpt = run(upd, 0, me)
    upd.finish()
    summary = upd.summary()
    final = flat(upd.current_model(model)) if me == 0 else None
    final_clocks = upd.checkpoint_view(model)[1]["async_clocks"] if me == 0 else None
    tr = upd.trace
    upd.close()
    arrays = {"sent": sent, "w0": w0, "times": np.array(times),
              "g": np.stack([t["g"] for t in tr]), "w_bak": np.stack([t["w_bak"] for t in tr]),
              "delta": np.stack([t["delta"] for t in tr]),
              "eta": np.array([t["eta"] for t in tr]), "v_pull": np.array([t["v_pull"] for t in tr]),
              "v_push": np.array([t["v_push"] for t in tr]), "clock": np.array([t["clock"] for t in tr]),
              "lead": np.array([t["lead"] for t in tr])}
    if tr and tr[0]["w_now"] is not None:
        arrays["w_now"] = np.stack([t["w_now"] for t in tr])
    if final is not None:
        arrays["final"], arrays["final_clocks"] = final, final_clocks
    if snaps:
        arrays["snap_version"] = np.array([v for v, _, _ in snaps])
        arrays["snap_clocks"] = np.stack([c for _, c, _ in snaps])
        arrays["snap_w"] = np.stack([w for _, _, w in snaps])
    info = {"summary": summary, "stopped": stopped, "updates": k, "workers": upd.num_workers}
    if resume_at:  # a new run from the checkpoint, as the loop restores it on every worker
        upd2 = AsyncUpdater(settings, topo, model, None)
        upd2.trace = []
        w, extra, step = upd2.comm.bcast(ckpt, root=0)
        with torch.no_grad():
            model.weight.copy_(torch.from_numpy(w[:model.weight.numel()]).view_as(model.weight))
            model.bias.copy_(torch.from_numpy(w[model.weight.numel():]))
        upd2.load_extra_state(extra)
        start = upd2.begin(model, step)
        sent2, _, k2, _, _, _ = run(upd2, start, me)
        upd2.finish()
        info["resume"] = {"start": start, "updates": k2, "summary": upd2.summary()}
        arrays["resume_sent"] = sent2
        if me == 0:
            arrays["resume_final"] = flat(upd2.current_model(model))
        upd2.close()
    np.savez(f"{out}/worker{me}.npz", **arrays)
    with open(f"{out}/worker{me}.json", "w") as f:
        json.dump(info, f)
''')


def drive(tmp_path, np_, timeout=120, **env):
    tmp_path.mkdir(parents=True, exist_ok=True)
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    run_mpi(np_, [sys.executable, "-m", "mpi4py", script, out], timeout=timeout, check=True,
            **{"HPCDISTILL_MODE": "async", **env})
    workers = sorted(out.glob("worker*.npz"))
    traces = [dict(np.load(f)) for f in workers]
    infos = [json.loads(f.with_suffix(".json").read_text()) for f in workers]
    return traces, infos


# --- single process --------------------------------------------------------------------------------

def test_shard_bounds_cover_the_vector_contiguously():
    for n, parts in [(10, 1), (10, 3), (2, 4), (85002, 2)]:
        b = shard_bounds(n, parts)
        assert len(b) == parts and b[0][0] == 0 and b[-1][1] == n
        assert all(b[i][1] == b[i + 1][0] for i in range(parts - 1))
        assert max(hi - lo for lo, hi in b) - min(hi - lo for lo, hi in b) <= 1


def reference_delta(g, w_bak, w_now, rule, lr, lambda0, meansq, decay):
    """DC-ASGD (Zheng et al. 2017) written out in float64, independently of dc_delta."""
    g, w_bak, w_now = (np.asarray(a, np.float64) for a in (g, w_bak, w_now))
    if rule == "asgd":
        return -lr * g, meansq
    if rule == "dcasgd-c":
        lam = lambda0
    else:
        meansq = decay * meansq + (1 - decay) * g * g
        lam = lambda0 / np.sqrt(meansq + MEANSQ_EPS)
    return -lr * (g + lam * g * g * (w_now - w_bak)), meansq


@pytest.mark.parametrize("rule,lambda0", [("asgd", 0.0), ("dcasgd-c", 0.04), ("dcasgd-a", 2.0)])
def test_dc_delta_matches_the_formula(rule, lambda0):
    rng = np.random.default_rng(0)
    n = 1000
    ms_impl, ms_ref = None, np.zeros(n)
    for _ in range(5):
        g = rng.normal(size=n).astype(np.float32)
        w_bak = rng.normal(size=n).astype(np.float32)
        w_now = (w_bak + 0.1 * rng.normal(size=n)).astype(np.float32)
        got, ms_impl = dc_delta(*map(torch.from_numpy, (g, w_bak, w_now)), rule=rule, lr=0.05, lambda0=lambda0,
                                meansq=ms_impl, decay=0.95)
        want, ms_ref = reference_delta(g, w_bak, w_now, rule, 0.05, lambda0, ms_ref, 0.95)
        assert got.dtype == torch.float32
        np.testing.assert_allclose(got.numpy(), want, rtol=2e-5, atol=1e-8)
        if rule == "dcasgd-a":
            np.testing.assert_allclose(ms_impl.numpy(), ms_ref, rtol=1e-5)
    if rule != "asgd":  # the compensation is really there
        plain, _ = dc_delta(*map(torch.from_numpy, (g, w_bak, w_now)), rule="asgd", lr=0.05, lambda0=0.0)
        assert (got - plain).abs().max() > 1e-4


def test_no_compensation_without_staleness():
    g = torch.tensor([1.0, -2.0, 3.0])
    w = torch.tensor([0.5, 0.5, 0.5])
    for rule in ("dcasgd-c", "dcasgd-a"):
        d, _ = dc_delta(g, w, w.clone(), rule=rule, lr=0.1, lambda0=2.0)
        np.testing.assert_allclose(d.numpy(), -0.1 * g.numpy(), rtol=1e-6)


# --- under mpirun ----------------------------------------------------------------------------------

@needs_mpi
def test_no_lost_update_consistent_snapshots_and_exact_resume(tmp_path):
    """1 host, 4 workers, asgd, integer gradients and lr 1 (every sum is exact in float32):
    - the final weights are the initial ones plus every pushed update, exactly; every fetch-and-add
      got its own version;
    - every checkpoint-style snapshot (checkpoint_view(), as the loop saves) holds
      exactly the updates that its version and clocks count;
    - resuming from the snapshot taken after the lead's 75th update (new windows, each worker from its
      own clock) ends on exactly the weights of an uninterrupted run: no update lost or applied twice."""
    n = 150
    traces, infos = drive(tmp_path, 5, T_UPDATES=n, T_SNAP_EVERY=15, T_RESUME_AT=75, T_COMPUTE=0.001,
                          HPCDISTILL_ASYNC_RULE="asgd")
    assert len(traces) == 4
    lead = traces[0]
    w0 = lead["w0"].astype(np.float64)
    expect = w0 + sum(t["sent"] for t in traces)
    assert np.array_equal(lead["final"].astype(np.float64), expect)
    assert list(lead["final_clocks"]) == [n] * 4
    async_ = infos[0]["summary"]["async"]
    assert async_["updates"] == 4 * n and async_["workers"] == 4 and async_["hosts"] == [0]
    assert async_["staleness"]["mean"] > 0, async_  # four workers: others push between pull and push
    allv = np.sort(np.concatenate([t["v_push"] for t in traces]))
    assert np.array_equal(allv, np.arange(4 * n))  # every fetch-and-add got its own version
    assert len(lead["snap_version"]) == n // 15
    for version, clocks, w in zip(lead["snap_version"], lead["snap_clocks"], lead["snap_w"]):
        assert version == clocks.sum()
        want = w0 + sum(t["delta"][:c].astype(np.float64).sum(axis=0) for t, c in zip(traces, clocks))
        assert np.array_equal(w.astype(np.float64), want), clocks
    assert any(len(set(c)) > 1 for c in lead["snap_clocks"])  # taken while the others were pushing

    # resume: every worker starts from its own clock in the checkpoint; same gradients per (worker, update)
    ckpt_clocks = lead["snap_clocks"][list(lead["snap_clocks"][:, 0]).index(75)]
    assert [i["resume"]["start"] for i in infos] == list(ckpt_clocks)
    assert all(i["resume"]["updates"] == n for i in infos)
    assert np.array_equal(lead["resume_final"].astype(np.float64), expect)
    r = infos[0]["resume"]["summary"]["async"]
    assert r["updates"] == 4 * n and r["updates_this_run"] == 4 * n - ckpt_clocks.sum()


@needs_mpi
def test_sibling_groups_allocate_windows_without_clashing(tmp_path):
    """Regression: Open MPI 4.1 named the shared-memory file of a window after the communicator's
    context id, which sibling groups share; simultaneous allocation failed or hung about half the time."""
    out = tmp_path / "windows.json"
    proc = run_mpi(6, [sys.executable, ROOT / "tests/mpi/group_windows.py", out, 30], timeout=180, check=True)
    assert "system call failed" not in proc.stderr.lower()
    rows = json.loads(out.read_text())
    for r in rows:
        members = range(3 * r["group"], 3 * r["group"] + 3)
        assert r["sum"] == sum(10.0 ** m for m in members)


@needs_mpi
def test_two_hosts_no_lost_update_and_one_worker_has_no_staleness(tmp_path):
    traces, infos = drive(tmp_path, 3, T_UPDATES=60, HPCDISTILL_ASYNC_RULE="asgd", HPCDISTILL_PARAM_HOSTS="0,2")
    assert len(traces) == 1
    (t,) = traces
    assert np.array_equal(t["final"].astype(np.float64), t["w0"].astype(np.float64) + t["sent"])
    assert np.all(t["v_push"] - t["v_pull"] == 0)
    assert infos[0]["summary"]["async"]["staleness"]["max"] == 0
    assert infos[0]["summary"]["async"]["hosts"] == [0, 2]


@needs_mpi
def test_dc_formula_ssp_bound_and_stop_flag_under_mpi(tmp_path):
    """One 5-rank run checks three things (each mpirun costs a torch start-up per rank):
    - DC-ASGD arithmetic: workers 0, 1 push with dcasgd-c, workers 2, 3 with dcasgd-a, concurrently on
      one window; every push equals the formula computed in NumPy from its recorded (g, w_bak, w_now);
    - SSP: bound s = 2 and the last worker sleeps before every update: at every pull and in the
      timelines no worker is more than s updates ahead of the slowest unfinished one;
    - stop flag: worker 1 raises it after its 40th update (no collective); every worker stops within a
      few updates of 40."""
    s, stop_at, lr = 2, 40, 0.05
    lam = {"dcasgd-c": 0.5, "dcasgd-a": 2.0}
    per_worker = ["dcasgd-c", "dcasgd-c", "dcasgd-a", "dcasgd-a"]
    traces, infos = drive(tmp_path, 5, T_UPDATES=400, T_SLOW=0.01, T_COMPUTE=0.002, T_STOP_AT=stop_at, T_INTEGER=0,
                          T_LR=lr, T_IN=16, T_RULES=",".join(f"{r}:{lam[r]}" for r in per_worker),
                          HPCDISTILL_ASYNC_RULE="dcasgd-a", HPCDISTILL_STALENESS_BOUND=s)
    assert len(traces) == 4

    stale = dict.fromkeys(lam, 0)
    for t, rule in zip(traces, per_worker):
        ms = np.zeros(t["g"].shape[1])
        for k in range(len(t["g"])):
            want, ms = reference_delta(t["g"][k], t["w_bak"][k], t["w_now"][k], rule, lr, lam[rule], ms, 0.95)
            g = t["g"][k].astype(np.float64)
            comp = want / -lr - g  # the compensation term; g + comp may cancel: float32 error scales
            err = np.abs(t["delta"][k] - want)  # with |g| + |comp|, not with the result
            assert np.all(err <= 1e-5 * lr * (np.abs(g) + np.abs(comp)) + 1e-10), (rule, err.max())
            stale[rule] += int(np.any(t["w_now"][k] != t["w_bak"][k]))
    assert all(stale.values()), stale  # some updates of each rule really were compensated
    lead = traces[0]  # and the window received exactly what was pushed (up to float32 sum order)
    np.testing.assert_allclose(lead["final"], lead["w0"] + sum(t["sent"] for t in traces), rtol=1e-5, atol=1e-5)

    # SSP, observed at every pull: this worker's clock minus the slowest unfinished worker's <= s.
    for t in traces:
        assert t["lead"].max() <= s
    # Independent check from the timelines (one monotonic clock on one machine): worker w ran its
    # update k (clock k at the pull) only if every other unfinished worker u had done >= k - s
    # updates at the pull; so by the end of w's update k, u had begun at least k - s updates.
    starts = [t["times"][:, 0] for t in traces]
    last_end = [t["times"][-1, 1] for t in traces]
    for w, t in enumerate(traces):
        for k, t_end in enumerate(t["times"][:, 1]):
            for u in range(len(traces)):
                if u == w or last_end[u] < t_end:  # u may have finished before w's pull
                    continue
                begun = int(np.sum(starts[u] <= t_end))
                assert k - begun <= s, (w, k, u, begun)
    summary = infos[0]["summary"]["async"]
    assert summary["staleness_bound"] == s and summary["ssp"]["max_lead"] <= s
    assert summary["ssp"]["waits"] > 0  # the straggler really held the others back

    # the stop flag: worker 1 stops at once, the others after the update in which they see it
    assert all(i["stopped"] for i in infos)
    assert infos[1]["updates"] == stop_at
    assert all(abs(i["updates"] - stop_at) <= s + 2 for i in infos), [i["updates"] for i in infos]


@needs_mpi
def test_codistill_workers_stop_together_at_an_exchange_step(tmp_path):
    """In codistill the loop's teacher refresh is collective at multiples of EXCHANGE_EVERY, so a stop
    raised at update 10 is agreed on at update 16 by every worker (no worker left in a collective)."""
    traces, infos = drive(tmp_path, 3, T_UPDATES=200, T_STOP_AT=10, HPCDISTILL_MODE="codistill",
                          HPCDISTILL_GROUPS=1, HPCDISTILL_EXCHANGE_EVERY=16, HPCDISTILL_ASYNC_RULE="asgd")
    assert [i["updates"] for i in infos] == [16, 16] and all(i["stopped"] for i in infos)


@needs_mpi
def test_train_async_dcasgd_a_on_digits(tmp_path, data_dir):
    """`HPCDISTILL_MODE=async HPCDISTILL_ASYNC_RULE=dcasgd-a mpirun -np 5 hpcdistill train` with the
    default steps and learning rate (resume is checked exactly, and faster, through the updater above)."""
    run = tmp_path / "run"
    proc = train(5, run, mode="async", async_rule="dcasgd-a", data_dir=data_dir, timeout=240)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["mode"] == "async" and summary["groups"][0]["test_accuracy"] >= 0.93, summary
    a = summary["async"]
    assert a["rule"] == "dcasgd-a" and a["workers"] == 4 and a["hosts"] == [0] and a["updates"] == 4 * 300
    assert a["staleness"]["mean"] > 0 and a["staleness"]["max"] >= a["staleness"]["p99"] >= a["staleness"]["p50"]
    assert a["updates_per_second"] > 0 and a["lambda0"] == 2.0 and a["lr_rule"] == "constant"
    assert "staleness_bound" in a
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("staleness" in x and "version" in x for x in lines)
    out = proc.stdout + proc.stderr
    assert "freed the RMA windows (host" in out and "freed the RMA windows (worker" in out
    # the last checkpoint is the final model: written once every worker was done
    _, arrays, meta = CheckpointManager(run / "checkpoints").latest_valid()
    assert meta["step"] == 300 and int(arrays["extra/async_version"][0]) == 4 * 300
    assert list(arrays["extra/async_clocks"]) == [300] * 4



@needs_mpi
@pytest.mark.parametrize("workers", [3, 8])
def test_round_robin_schedule_makes_staleness_exactly_workers_minus_one(tmp_path, data_dir, workers):
    """HPCDISTILL_ASYNC_SCHEDULE=round-robin on 2 cores (8 workers oversubscribed): after the first round
    every gradient is exactly M - 1 updates stale; the first round's are 0 .. M - 2 (and one M - 1)."""
    run, steps = tmp_path / "run", 30
    train(workers + 1, run, mode="async", async_schedule="round-robin", async_rule="dcasgd-a",
          dc_meansq_bias_correction="true", data_dir=data_dir, steps=steps, timeout=300)
    a = json.loads((run / "summary.json").read_text())["async"]
    assert a["schedule"] == "round-robin" and a["meansq_bias_correction"] is True
    assert a["updates"] == workers * steps and a["worker_updates"] == [steps] * workers
    assert a["staleness_counts"] == [1] * (workers - 1) + [workers * steps - (workers - 1)]
    assert a["staleness"]["p50"] == a["staleness"]["max"] == workers - 1
    # the bias correction's t is checkpointed (the lead worker's: its `steps` mean-square updates)
    _, arrays, _ = CheckpointManager(run / "checkpoints").latest_valid()
    assert int(arrays["extra/async_meansq_updates"][0]) == steps


@needs_mpi
def test_codistill_with_async_groups(tmp_path, data_dir):
    run = tmp_path / "run"
    train(6, run, mode="codistill", group_mode="async", groups=2, data_dir=data_dir, steps=120, exchange_every=40,
          burn_in=40, timeout=240)
    summary = json.loads((run / "summary.json").read_text())
    groups = summary["async"]["groups"]
    assert len(groups) == 2 and all(g["workers"] == 2 and g["updates"] == 240 for g in groups)
    total = summary["async"]  # the interface's fields, over both groups
    assert total["rule"] == "dcasgd-a" and total["workers"] == 4 and total["updates"] == 480
    counts = np.add(*[np.pad(g["staleness_counts"], (0, 64 - len(g["staleness_counts"]))) for g in groups])
    assert list(np.trim_zeros(counts, "b")) == total["staleness_counts"] and sum(counts) == 480
    values = np.repeat(np.arange(len(counts)), counts)
    assert total["staleness"] == {"mean": float(values.mean()), "p50": float(np.percentile(values, 50)),
                                  "p99": float(np.percentile(values, 99)), "max": int(values.max())}
    assert [g["group"] for g in summary["groups"]] == [0, 1]
    assert summary["codistill"]["exchanges_published"] >= 2
    assert all(g["test_accuracy"] > 0.5 for g in summary["groups"])
