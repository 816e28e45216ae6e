"""Asynchronous SGD with delay compensation (DC-ASGD, Zheng et al. 2017) on MPI one-sided windows.

A group's ranks are parameter hosts (HPCDISTILL_PARAM_HOSTS, group-local ranks) or workers. The
flat float32 parameter vector lives in RMA windows sharded over the hosts; hosts never take part in
an access (passive target) and only poll MPI until the workers are done. A worker, each update:

    SSP    with a bound s: wait while (own clock - slowest unfinished worker's clock) > s
    pull   v_pull <- version (atomic read), w_bak <- w (shared lock, Get)
    g      <- gradient of the loss at w_bak (+ weight_decay * w_bak)
    DC     w_now <- w (read again just before pushing)
           g~ = g + lambda_t * g * g * (w_now - w_bak)
               dcasgd-c: lambda_t = lambda0
               dcasgd-a: MS <- m MS + (1 - m) g*g (one MS per worker), lambda_t = lambda0 / sqrt(MS + 1e-7)
               asgd:     g~ = g
    push   under shared locks on every shard: w += -eta * g~ (MPI_Accumulate SUM, element-wise
           atomic), then v_push <- fetch_and_add(version, 1) and clock += 1, then unlock: a snapshot
           (exclusive locks) sees an update together with its counts, or neither
           staleness = v_push - v_pull (updates pushed by others between the pull and the push)
           eta = lr, or lr / max(1, v_now - v_pull) with HPCDISTILL_ASYNC_LR=staleness-aware

HPCDISTILL_ASYNC_SCHEDULE=round-robin makes the staleness exact instead of whatever the machine gives:
worker i's k-th update is global update u = v0 + k M + i (M workers). It waits until the turn counter
(a slot of the clock window) reads u, pushes, pulls the weights (which now hold updates ..u) and sets
the turn to u + 1; its next gradient is computed on those weights and pushed as update u + M, so every
gradient after the first round is exactly M - 1 updates stale, on 2 cores or 2000. The first round
pulls the initial weights together (staleness 0 .. M-1). A stop flag, or the turn's owner having
finished, releases the waiting workers into the free schedule.

The update is plain SGD plus the compensation: the optimizer's momentum is not applied (a per-worker
momentum buffer would add a second, uncompensated source of staleness; the paper's DC-ASGD has none).
docs/async.md explains the design: hosts, SSP, stop flag, snapshots, checkpoints and resume.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch

from hpcdistill.comm.rma import MPI, ClockWindow, CounterWindow, ShardedVector, in_turn
from hpcdistill.comm.wait import polite_barrier, polite_wait
from hpcdistill.log import get_logger
from hpcdistill.strategies.dcasgd import dc_delta, mean_or_none, pooled_summary, staleness_stats

log = get_logger("async")

def flatten_parameters(model: torch.nn.Module) -> tuple[torch.Tensor, list[torch.nn.Parameter]]:
    """Make every parameter of `model` a view into one contiguous float32 buffer (values kept);
    loading weights is then one copy into the buffer. Returns (buffer, parameters)."""
    params = [p for p in model.parameters()]
    bad = [str(p.dtype) for p in params if p.dtype != torch.float32]
    if bad:
        raise TypeError(f"async training needs float32 parameters, found {sorted(set(bad))}")
    device = params[0].device if params else torch.device("cpu")
    flat = torch.empty(sum(p.numel() for p in params), dtype=torch.float32, device=device)
    offset = 0
    with torch.no_grad():
        for p in params:
            k = p.numel()
            flat[offset:offset + k].copy_(p.reshape(-1))
            p.data = flat[offset:offset + k].view_as(p)
            offset += k
    return flat, params


class AsyncUpdater:
    """DC-ASGD worker or parameter host of one group (see the module docstring).

    Built on every rank of the group (window allocation is collective on topo.group_comm). Hosts
    call serve() then close(); workers run the training loop with begin/step/agree/finish.
    """

    eval_comm = None  # evaluation and checkpoints: the lead worker alone, no collectives

    def __init__(self, settings, topo, model, optimizer=None):
        self.s = settings
        self.topo = topo
        # The loop checkpoints `updater.optimizer`. DC-ASGD applies its own update (plain SGD plus the
        # compensation), so this optimizer is never stepped; it is kept so checkpoints have the same
        # layout in every mode. DC-ASGD's own state (mean square, clocks, version) comes with checkpoint_view().
        self.optimizer = optimizer
        self.group_comm = gc = topo.group_comm
        self.hosts = sorted(settings.host_ranks)
        bad = [h for h in self.hosts if h >= gc.Get_size()]
        if bad:
            raise ValueError(f"HPCDISTILL_PARAM_HOSTS={settings.param_hosts}: rank(s) {bad} do not exist "
                             f"in a group of {gc.Get_size()}")
        self.worker_ranks = [r for r in range(gc.Get_size()) if r not in self.hosts]
        if not self.worker_ranks:
            raise ValueError(f"HPCDISTILL_PARAM_HOSTS={settings.param_hosts}: no worker left in a group of "
                             f"{gc.Get_size()}")
        self.is_host = gc.Get_rank() in self.hosts
        comm = gc.Split(MPI.UNDEFINED if self.is_host else 0, key=gc.Get_rank())
        self.comm = None if comm == MPI.COMM_NULL else comm
        self.num_workers = len(self.worker_ranks)
        self.index = self.comm.Get_rank() if self.comm is not None else -1  # worker index
        self.writes = self.index == 0  # the lead worker evaluates, checkpoints and speaks
        self.rule = settings.async_rule
        self.lambda0 = 0.0 if self.rule == "asgd" else float(settings.lambda0)
        self.decay = float(settings.dc_meansq_decay)
        self.lr_rule = settings.async_lr
        self.bound = settings.staleness_bound
        self.round_robin = settings.async_schedule == "round-robin"
        self.bias_correction = bool(settings.dc_meansq_bias_correction)
        self.turn = self.turn0 = 0    # round-robin: this worker's next global update number, the first
        self.v_pulled = None          # round-robin: version of the weights pulled at the end of a turn
        self.weight_decay = float(getattr(settings, "weight_decay", 0.0) or 0.0)
        # Codistill with peer teachers: the loop's teacher refresh is collective in `comm` at every
        # multiple of exchange_every, at the end of burn-in and at any step where a teacher goes
        # stale (every worker holds the same teachers, so all pick the same steps), so workers must
        # leave the loop at the same step: the stop flag is then agreed on (allreduce) at multiples of
        # exchange_every only, a point every worker passes anyway.
        peers = settings.mode == "codistill" and getattr(settings, "codistill_target", "peers") == "peers"
        self.stop_every = int(settings.exchange_every) if peers else None

        self.flat_param, self.params = flatten_parameters(model)
        self.n = self.flat_param.numel()
        self.weights, self.version, self.clocks = in_turn(
            topo.world, topo.local_group, topo.local_groups,
            lambda: (ShardedVector(gc, self.hosts, self.n), CounterWindow(gc, self.hosts[0]),
                     ClockWindow(gc, self.hosts[0], self.num_workers)))

        self._buffers(self.flat_param.device)
        self.meansq: torch.Tensor | None = None
        self.meansq_updates = 0  # t of the bias correction 1 - m^t: checkpointed, so a resume goes on from it
        self.clock = self.start_clock = 0
        self.version0 = 0
        self.staleness: list[int] = []
        self.overshoot: list[float] = []  # _overshoot() at this worker's updates that are multiples of LOG_EVERY
        self.last_staleness = 0
        self.last_version = 0
        self.max_lead = 0          # most updates ahead of the slowest unfinished worker at a pull
        self.ssp_waits = 0
        self.ssp_wait_seconds = 0.0
        self.stop_seen = self.stop_raised = False
        self.trace: list | None = None  # tests set a list: one record per update
        self._loaded: dict = {}
        self._snap_model = None
        self._snap_flat = None
        self._model = model
        self._last_lead = 0
        self._final_model = None
        self._final_state: dict = {}
        self._snap_counters = None    # (version, clocks) counted in the last snapshot
        self.final_version = None
        self.finished = self.closed = False
        self.t_begin = self.t_end = None
        if self.comm is not None and self.index == 0 and isinstance(optimizer, torch.optim.Optimizer):
            if not isinstance(optimizer, torch.optim.SGD):
                log.warning("async applies plain SGD with delay compensation; the %s optimizer is not used "
                            "(set HPCDISTILL_LR to an SGD learning rate)", type(optimizer).__name__)

    def _buffers(self, device: torch.device) -> None:
        """Host staging for the windows (pinned on a GPU: the copies run at full speed, asynchronously)
        and the gradient, compensation and delta on the model's device. On the host the staging
        tensors are the arithmetic's own operands: no copy."""
        n, gpu = self.n, device.type == "cuda"
        host = [torch.empty(n, dtype=torch.float32, pin_memory=gpu) for _ in range(3)]
        self.pulled, self.now_host, self.delta_host = host
        self.w_now = torch.empty(n, dtype=torch.float32, device=device) if gpu else self.now_host
        self.delta = torch.empty(n, dtype=torch.float32, device=device) if gpu else self.delta_host
        self.grad = torch.empty(n, dtype=torch.float32, device=device)
        self.scratch = torch.empty(n, dtype=torch.float32, device=device)
        self.gpu = gpu

    # --- hosts ------------------------------------------------------------------------------------
    def serve(self) -> None:
        """Host: keep MPI progressing (passive-target RMA on networks without RDMA needs the target to
        enter MPI now and then) until every worker of the group has finished."""
        polite_wait(self.group_comm.Ibarrier(), first=0.0005, longest=0.002)

    # --- workers: start and end -------------------------------------------------------------------
    def load_extra_state(self, arrays: dict) -> None:
        self._loaded = dict(arrays)

    def begin(self, model, step: int) -> int:
        """The lead worker writes the (restored) weights, version and clocks into the windows; the
        workers then meet once. Returns this worker's start step (its own clock on resume)."""
        W = self.num_workers
        clocks = np.asarray(self._loaded.get("async_clocks", []), np.int64).reshape(-1)
        if clocks.shape != (W,):
            if clocks.size:
                log.warning("checkpoint has clocks for %d workers, this run has %d: every worker resumes at "
                            "step %d", clocks.size, W, step)
            clocks = np.full(W, int(step), np.int64)
        elif (self.stop_every is not None or self.round_robin) and np.any(clocks != step):
            # Codistill: the teacher refreshes are collective at given steps, so every worker must pass
            # the same steps from here on; round-robin: every worker must have as many turns left. All
            # resume at the checkpoint's step (a few updates of the workers that were ahead or behind
            # are skipped or done again; the version goes on).
            clocks = np.full(W, int(step), np.int64)
        saved_version = np.asarray(self._loaded.get("async_version", []), np.int64).reshape(-1)
        version0 = int(saved_version[0]) if saved_version.size else int(clocks.sum())
        ms = self._loaded.get("async_meansq")
        self.flat_param, self.params = flatten_parameters(model)  # again: restore may have replaced .data
        if ms is not None and np.asarray(ms).size == self.n and self.rule == "dcasgd-a":
            ms = np.asarray(ms, np.float32).reshape(-1)  # the lead's, for every worker
            self.meansq = torch.from_numpy(ms.copy()).to(self.flat_param.device)
            t = np.asarray(self._loaded.get("async_meansq_updates", []), np.int64).reshape(-1)
            self.meansq_updates = int(t[0]) if t.size else 10**6  # a checkpoint without it: warm, no correction
        if self.index == 0:
            self.weights.put(self.flat_param.detach().to("cpu", copy=True).numpy())
            self.version.write_all([version0])
            self.clocks.write_all(self.clocks.initial(clocks, turn=version0))
        polite_barrier(self.comm)
        if self.round_robin:  # everyone holds the initial weights before the first turn is taken
            self.turn0, self.turn = version0, version0 + self.index
            self.v_pulled = self._pull()
            polite_barrier(self.comm)
        self._model = model
        self.clock = self.start_clock = int(clocks[self.index])
        self.version0 = self.last_version = version0
        self.t_begin = time.perf_counter()
        return self.clock

    def finish(self) -> None:
        """Mark this worker finished (SSP stops waiting on it), wait for the other workers, take the
        final snapshot (lead), then release the hosts."""
        if self.finished:
            return
        self.clocks.set(self.clocks.done_slot(self.index), 1)
        polite_barrier(self.comm)
        self.t_end = time.perf_counter()
        if self.index == 0:
            model = copy.deepcopy(self.current_model(self._model))
            version, clocks = self._snap_counters
            self.final_version = version
            self._final_model = model
            self._final_state = self._state(version, clocks)
        polite_barrier(self.group_comm)  # the barrier the hosts wait on in serve()
        self.finished = True

    def close(self) -> None:
        """Free the windows (collective on the group; hosts after serve, workers after the loop)."""
        if self.closed:
            return
        polite_barrier(self.group_comm)  # nobody blocks (spinning) in Win.Free while others still work
        for win in (self.weights, self.version, self.clocks):
            win.free()
        self.closed = True
        log.info("freed the RMA windows (%s, %d float32 parameters on host(s) %s)",
                 "host" if self.is_host else "worker", self.n, self.hosts)

    # --- workers: one update ----------------------------------------------------------------------
    def _ssp_gate(self) -> None:
        """Read stop flag and clocks (one atomic read); with a bound s, wait while this worker has done
        more than s updates beyond the slowest unfinished worker."""
        stop, clocks, done = self.clocks.split(self.clocks.read_all())
        self.stop_seen = self.stop_seen or stop
        if self.bound is None:
            return
        t0, pause, waited = time.perf_counter(), 0.0005, False
        while True:
            live = clocks[~done]
            slowest = int(live.min()) if live.size else self.clock
            lead = self.clock - slowest
            if lead <= self.bound:  # also when stopping: the slowest never waits, so this ends
                break
            waited = True
            time.sleep(pause)
            pause = min(0.01, pause * 2)
            stop, clocks, done = self.clocks.split(self.clocks.read_all())
            self.stop_seen = self.stop_seen or stop
        self.max_lead = max(self.max_lead, lead)
        self._last_lead = lead
        if waited:
            self.ssp_waits += 1
            self.ssp_wait_seconds += time.perf_counter() - t0

    def _pull(self) -> int:
        """The version, then the weights into the host staging buffer; returns the version."""
        version = self.version.value()
        self.weights.get(self.pulled.numpy())
        return version

    def _await_turn(self) -> None:
        """Round-robin: wait until the turn counter reaches this worker's update number. A stop flag,
        or the worker whose turn it is having finished, ends the schedule (free from then on)."""
        pause = 0.0001
        while self.round_robin:
            stop, _, done, turn = self.clocks.split(self.clocks.read_all(), turn=True)
            if turn == self.turn:
                return
            if stop or done[(turn - self.turn0) % self.num_workers]:
                self.stop_seen = self.stop_seen or stop
                self.round_robin = False
                log.warning("round-robin schedule ended at update %d (%s): the workers push freely from here",
                            turn, "stop flag" if stop else "the worker in turn has finished")
                return
            time.sleep(pause)
            pause = min(0.002, pause * 2)

    def step(self, model, compute_loss, lr: float) -> dict:
        self._ssp_gate()
        held = self.round_robin and self.v_pulled is not None
        v_pull = self.v_pulled if held else self._pull()
        w_bak = self.flat_param  # the weights the gradient is computed at (nothing steps them)
        with torch.no_grad():
            w_bak.copy_(self.pulled, non_blocking=self.gpu)
        model.zero_grad(set_to_none=True)
        loss, parts = compute_loss()
        loss.backward()
        with torch.no_grad():
            g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                           for p in self.params], out=self.grad)
            if self.weight_decay:
                g.add_(w_bak, alpha=self.weight_decay)
            self._await_turn()  # round-robin: push in turn (w_now is then exactly M - 1 updates on)
            w_now = None
            if self.rule != "asgd" and self.lambda0 != 0:
                self.weights.get(self.now_host.numpy())
                w_now = self.w_now.copy_(self.now_host, non_blocking=True) if self.gpu else self.now_host
            eta = lr
            if self.lr_rule == "staleness-aware":
                eta = lr / max(1, self.version.value() - v_pull)
            if self.rule == "dcasgd-a":
                self.meansq_updates += 1
            correction = 1 - self.decay ** self.meansq_updates if self.bias_correction else 1.0
            delta, self.meansq = dc_delta(g, w_bak, w_now, rule=self.rule, lr=eta, lambda0=self.lambda0,
                                          meansq=self.meansq, decay=self.decay, out=self.delta,
                                          scratch=self.scratch, correction=correction)
            if self.gpu:
                self.delta_host.copy_(delta)  # waits for the device: the push needs the numbers
        v_push = self.weights.accumulate(self.delta_host.numpy(), then=self._count_update)
        if self.round_robin:  # still in turn: pull what the next gradient is computed on, pass the turn
            self.v_pulled = self._pull()
            self.turn += self.num_workers
            self.clocks.set(self.clocks.TURN, v_push + 1)
        self.clock += 1
        self.last_staleness = v_push - v_pull
        self.last_version = v_push + 1
        self.staleness.append(self.last_staleness)
        if self.rule != "asgd" and self.lambda0 and self.clock % self.s.log_every == 0:
            self.overshoot.append(self._overshoot(g, eta, self.last_staleness))
        if self.trace is not None:
            host = lambda t: None if t is None else t.detach().cpu().numpy().copy()  # noqa: E731
            self.trace.append({"g": host(g), "w_bak": host(w_bak), "w_now": host(w_now), "delta": host(delta),
                               "eta": eta, "v_pull": v_pull, "v_push": v_push, "clock": self.clock,
                               "lead": self._last_lead})
        return parts

    def _overshoot(self, g: torch.Tensor, eta: float, tau: int) -> float:
        """Share of coordinates where eta * tau * lambda_t * g^2 > 1. With a steady gradient w_now - w_bak
        is about -eta * tau * g, so the compensation lambda_t * g^2 * (w_now - w_bak) is that factor times
        -g: above 1 it outweighs g and turns the update around (where DC-ASGD overshoots)."""
        if tau == 0:
            return 0.0
        strength = g * g * (eta * tau * self.lambda0)
        # dcasgd-a: dc_delta left sqrt(MS / correction + eps) in scratch, and lambda_t = lambda0 / that
        bound = self.scratch if self.rule == "dcasgd-a" else 1.0
        return float((strength > bound).float().mean())

    def _count_update(self) -> int:
        """Version fetch-and-add and this worker's clock, done while the push still holds its shared
        locks on the weights: a snapshot (exclusive locks) sees the update and its counts together."""
        v_push = self.version.increment()
        self.clocks.set(self.clocks.clock_slot(self.index), self.clock + 1)
        return v_push

    def step_metrics(self) -> dict:
        return {"staleness": self.last_staleness, "version": self.last_version}

    def agree(self, flag: bool) -> bool:
        """A worker with a stop signal raises the flag in the window; every worker sees it at its next
        update (read together with the clocks) and stops after that update: no collective.
        Codistill with peer teachers (collective refreshes at multiples of exchange_every): the
        workers agree at the next multiple of exchange_every instead (one allreduce there), so they
        all leave the loop at the same step; a flag seen after the last such step lets the run end."""
        if flag and not self.stop_raised and not self.finished:
            self.clocks.set(self.clocks.STOP, 1)
            self.stop_raised = True
        want = bool(flag or self.stop_seen or self.stop_raised)
        if self.stop_every is not None:  # codistill: decide together at a step every worker passes
            if self.clock % self.stop_every:
                return False
            mine, agreed = np.array([int(want)], np.int64), np.zeros(1, np.int64)
            polite_wait(self.comm.Iallreduce(mine, agreed, op=MPI.MAX))
            return bool(agreed[0])
        return want

    # --- snapshots and state ----------------------------------------------------------------------
    def _snapshot(self) -> None:
        """Copy the global weights into the snapshot module, with the version and every worker's clock
        read under the same exclusive locks (pushes count themselves before releasing theirs)."""
        if self._snap_model is None:
            self._snap_model = copy.deepcopy(self._model)
            self._snap_flat, _ = flatten_parameters(self._snap_model)
            self._snap_buf = np.empty(self.n, np.float32)
        _, (version, values) = self.weights.snapshot(
            self._snap_buf, also=lambda: (self.version.value(), self.clocks.read_all()))
        self._snap_counters = (int(version), self.clocks.split(values)[1].copy())
        with torch.no_grad():
            self._snap_flat.copy_(torch.from_numpy(self._snap_buf))
            for mine, snap in zip(self._model.buffers(), self._snap_model.buffers()):
                snap.copy_(mine)  # buffers (BatchNorm statistics) are this worker's own: see settle()

    def settle(self, model) -> None:
        """Buffers (BatchNorm running statistics) are not in the parameter windows: each worker keeps
        its own, from its own batches, and the lead worker's are the ones evaluated, checkpointed and
        published. Nothing to agree on."""

    def current_model(self, model):
        """A module holding a consistent snapshot of the group's global weights (exclusive locks on
        every host window, in rank order). After finish(): the final snapshot on the lead worker,
        without touching the windows."""
        if self.finished:  # other workers hold no final copy: their last pulled weights (unused)
            return self._final_model if self._final_model is not None else model
        self._snapshot()
        return self._snap_model

    def _state(self, version: int, clocks: np.ndarray) -> dict:
        out = {"async_version": np.array([version], np.int64), "async_clocks": np.asarray(clocks, np.int64).copy()}
        if self.meansq is not None:
            out["async_meansq"] = self.meansq.cpu().numpy().copy()
            out["async_meansq_updates"] = np.array([self.meansq_updates], np.int64)
        return out

    def checkpoint_view(self, model) -> tuple:
        """(weights, extra arrays) of one snapshot, lead worker, no collective: the global weights with
        the version, every worker's clock and the lead's mean square read under the same locks, so on
        resume no update is applied twice or lost. After finish(): the final state."""
        if self.finished:
            return (self._final_model if self._final_model is not None else model), dict(self._final_state)
        if self.closed or self.comm is None:
            return model, {}
        self._snapshot()
        return self._snap_model, self._state(*self._snap_counters)

    def gather_rngs(self, rng: np.ndarray) -> np.ndarray:
        return rng[None]  # the writer's own stream: workers are not in step with each other

    def diverged(self, model) -> bool:
        return False  # workers go on; the lead's checkpoints skip NaN weights (docs/async.md)

    def saves(self, step: int, final: bool) -> bool:
        return self.writes and not final  # the final one after finish(), when every worker is done

    def saves_after_finish(self, final: bool) -> bool:
        return self.writes and final

    @staticmethod
    def pool(parts: list[dict]) -> dict:
        """The summary's `async` section: one group's, or pooled over several (codistill GROUP_MODE=async)."""
        parts = [p["async"] for p in parts if p and p.get("async")]
        if not parts:
            return {}
        return {"async": parts[0] if len(parts) == 1 else pooled_summary(parts)}

    def summary(self) -> dict:
        """Collective in the workers' comm: staleness over every worker's updates."""
        mine = {"staleness": np.asarray(self.staleness, np.int64), "max_lead": self.max_lead,
                "ssp_waits": self.ssp_waits, "ssp_wait_seconds": self.ssp_wait_seconds,
                "updates": len(self.staleness), "overshoot": self.overshoot}
        everyone = self.comm.gather(mine, root=0)
        if self.index != 0:
            return {}
        st = np.concatenate([e["staleness"] for e in everyone]) if everyone else np.zeros(0, np.int64)
        counts = np.bincount(st) if st.size else np.zeros(1, np.int64)
        wall = max(1e-9, (self.t_end or time.perf_counter()) - (self.t_begin or 0.0))
        final = self.final_version if self.final_version is not None else self.last_version
        return {"async": {
            "rule": self.rule, "workers": self.num_workers, "hosts": list(self.hosts),
            "updates": int(final), "updates_this_run": int(final - self.version0),
            "staleness": staleness_stats(counts), "staleness_counts": counts.tolist(),
            "updates_per_second": float((final - self.version0) / wall),
            "lambda0": self.lambda0, "meansq_decay": self.decay if self.rule == "dcasgd-a" else None,
            "staleness_bound": self.bound, "lr_rule": self.lr_rule, "schedule": self.s.async_schedule,
            "meansq_bias_correction": self.bias_correction if self.rule == "dcasgd-a" else None,
            "ssp": {"max_lead": int(max(e["max_lead"] for e in everyone)),
                    "waits": int(sum(e["ssp_waits"] for e in everyone)),
                    "wait_seconds": float(sum(e["ssp_wait_seconds"] for e in everyone))},
            "worker_updates": [int(e["updates"]) for e in everyone],
            "momentum_applied": False,
            "overshoot_share": mean_or_none([x for e in everyone for x in e["overshoot"]]),
        }}
