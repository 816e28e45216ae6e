"""The one training loop. Every mode is this loop with a different updater and objective:

    sync       SyncUpdater  + task loss
    codistill  SyncUpdater  + task loss + peers' predictions (PeerTeachers via the exchange directory)
               (or AsyncUpdater per group with HPCDISTILL_GROUP_MODE=async)
    async      AsyncUpdater + task loss
    distill    SyncUpdater  + Hinton loss toward fixed teachers

Per step: batch -> loss -> update; every k steps: log, evaluate, checkpoint, publish. SIGTERM and
SIGUSR2 (what Slurm sends before the time limit) make every rank of the group checkpoint at the same
step boundary and exit 0; `HPCDISTILL_RESUME=auto` picks the run up again from there.
"""

from __future__ import annotations

import json
import math
import signal
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from hpcdistill.checkpoints import CheckpointError, CheckpointManager, capture, restore
from hpcdistill.claims import Claim, ClaimError, holder_info
from hpcdistill.config import ConfigError
from hpcdistill.comm.broadcast import bcast_tree
from hpcdistill.comm.topology import build_topology
from hpcdistill.data import DataError, TrainStream, open_source
from hpcdistill.log import Progress, get_logger, setup_logging
from hpcdistill.metrics import MetricsWriter, checkpoint_dir, metrics_path, write_json_atomic
from hpcdistill.models import count_parameters, resolve_model
from hpcdistill.teachers import FixedTeachers, PeerTeachers, teacher_spec
from hpcdistill.training import evaluate as ev
from hpcdistill.training.objective import Objective

log = get_logger("train")

ENSEMBLE_EVAL_LIMIT = 2048
RUN_CLAIM = ".hpcdistill-claim.json"        # in RUN_DIR: the job that uses it
EXCHANGE_CLAIM = ".exchange-claim.json"     # in the exchange directory: the codistillation that uses it


def _same_run(run_id: str):
    """A read_h5 check for resuming: a checkpoint written by another run (a copy, a rerun) is skipped."""
    def check(meta: dict, layout: dict) -> None:
        other = meta.get("run_id")
        if other is not None and other != run_id:
            raise CheckpointError(None, f"another run: {other!r} (this run is {run_id!r})", "another-run")
    return check  # test samples used for ensemble accuracy and churn (all of digits' 360)


class StopSignal:
    """Remembers that SIGTERM or SIGUSR2 arrived; the loop acts on it at the next step boundary."""

    def __init__(self):
        self.requested = False
        self.name = ""
        for sig in (signal.SIGTERM, signal.SIGUSR2):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        self.requested, self.name = True, signal.Signals(signum).name


def lr_at(step: int, peak: float, warmup: int, total: int) -> float:
    """Linear warm-up to the peak, then cosine decay to a tenth of it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0))))


def make_optimizer(settings, model, kind: str):
    name = settings.optimizer if settings.optimizer != "auto" else ("adamw" if kind == "sequence" else "sgd")
    if name == "adamw":
        lr = settings.lr or 3e-3
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=settings.weight_decay), lr
    # DC-ASGD applies plain SGD steps (no momentum), which want a ~4x larger rate than momentum SGD.
    lr = settings.lr or (0.2 if settings.uses_async else 0.05)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=settings.momentum,
                           weight_decay=settings.weight_decay), lr


def make_updater(settings, topo, model, optimizer):
    if settings.uses_async:
        from hpcdistill.strategies.async_rma import AsyncUpdater
        return AsyncUpdater(settings, topo, model, optimizer)
    from hpcdistill.strategies.sync import SyncUpdater
    return SyncUpdater(topo, model, optimizer)


def resolve_run_dir(settings, world) -> Path:
    """RUN_DIR, or ./runs/<SLURM_JOB_ID> (stable across a requeue), or a timestamp chosen by rank 0."""
    import os

    if settings.run_dir is not None:
        path = settings.run_dir
    else:
        job = os.environ.get("SLURM_ARRAY_JOB_ID")
        job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job else os.environ.get("SLURM_JOB_ID")
        path = Path("runs") / (job or world.bcast(time.strftime("%Y%m%d-%H%M%S") if world.Get_rank() == 0 else None))
    path = path.resolve()
    if world.Get_rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
    world.Barrier()
    return path


def _write_config(run_dir: Path, settings, topo, arch: dict, run_id: str) -> None:
    config = {"settings": settings.model_dump(mode="json"), "world_size": topo.size,
              "num_groups": topo.num_groups, "arch": arch, "run_id": run_id}
    old = run_dir / "config.json"
    if old.exists():
        previous = json.loads(old.read_text()).get("settings", {})
        changed = sorted(k for k, v in config["settings"].items() if previous.get(k) != v)
        if changed:
            log.warning("resuming with changed settings: %s", ", ".join(changed))
    write_json_atomic(old, config)


def _dataset_checked_once(settings, world):
    """World rank 0 re-hashes a prepared dataset's files (a damaged file is caught before training);
    the other ranks read the attributes only, so the shared filesystem serves the files once, not N times."""
    error = source = None
    if world.Get_rank() == 0:
        try:
            source = open_source(settings.dataset, settings.data_dir, settings.dataset_args, verify=True)
        except DataError as exc:
            error = str(exc)
    error = world.bcast(error, root=0)
    if error:
        raise DataError(error)
    return source or open_source(settings.dataset, settings.data_dir, settings.dataset_args)


def _finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _polite_barrier(comm) -> None:
    """A barrier that sleeps instead of spinning, so ranks that are done leave the cores to the rest."""
    req = comm.Ibarrier()
    while not req.Test():
        time.sleep(0.02)


def _run_id(settings, run_dir: Path) -> str:
    """This run's identity: kept in config.json across resume and requeue; new when starting over."""
    config = run_dir / "config.json"
    if settings.resume == "auto" and config.exists():
        try:
            rid = json.loads(config.read_text()).get("run_id")
        except (OSError, ValueError, AttributeError):
            rid = None
        if isinstance(rid, str) and rid:
            return rid
    return uuid.uuid4().hex[:12]


def _claim_dirs(settings, run_dir: Path, world) -> tuple[str, list[Claim]]:
    """World rank 0 claims RUN_DIR (one job per run directory) and the exchange directory (one
    codistillation per exchange id) and picks the run id; every rank gets the id or the refusal."""
    claims, error, rid = [], None, None
    if world.Get_rank() == 0:
        try:
            rid = _run_id(settings, run_dir)
            claim = Claim(run_dir / RUN_CLAIM, holder_info(rid), what="run directory")
            claim.acquire()
            claims.append(claim)
            if settings.mode == "codistill" and settings.codistill_target == "peers":
                exchange_id = settings.exchange_id or rid
                ex = Claim(Path(settings.exchange_dir or run_dir / "exchange") / EXCHANGE_CLAIM,
                           holder_info(rid, exchange_id=exchange_id), what="exchange directory",
                           share_key="exchange_id")
                ex.acquire()
                claims.append(ex)
            for c in claims:
                if c.note:
                    log.warning("%s %s: %s", c.what, c.path.parent, c.note)
        except ClaimError as exc:
            error = str(exc)
            for c in claims:
                c.release()
    error, rid = world.bcast((error, rid), root=0)
    if error:
        raise ClaimError(error)
    return rid, claims


class Trainer:
    """State of one rank's run; `run()` is the loop."""

    def __init__(self, settings):
        self.s = s = settings
        self.t0 = time.time()
        self.stop = StopSignal()
        self.topo = topo = build_topology(s.num_groups, horovod=not s.uses_async)
        s.check_world(topo.size)
        setup_logging(topo.tag(), speaker=topo.is_leader)
        self.run_dir = resolve_run_dir(s, topo.world)
        self.run_id, self.claims = _claim_dirs(s, self.run_dir, topo.world)
        self.exchange_id = s.exchange_id or self.run_id
        self.data = _dataset_checked_once(s, topo.world)
        self.spec = resolve_model(s.model, s.model_args, kind=self.data.kind)
        self.arch = self.spec.record(self.data.input_shape, self.data.num_classes)
        torch.manual_seed(s.seed * 1000 + topo.group)  # each group its own initialisation
        self.model = self.spec.build(self.data.input_shape, self.data.num_classes).to(topo.device)
        optimizer, self.peak_lr = make_optimizer(s, self.model, self.data.kind)
        self.updater = make_updater(s, topo, self.model, optimizer)
        self.optimizer = self.updater.optimizer  # the one holding the state (Horovod wraps a copy)
        if topo.rank == 0:
            _write_config(self.run_dir, s, topo, self.arch, self.run_id)

    # --- set-up that only the ranks running the loop do -------------------------------------------
    def _prepare_loop(self):
        s, topo = self.s, self.topo
        self.comm = self.updater.comm
        self.speaker = self.comm.Get_rank() == 0
        setup_logging(topo.tag(), speaker=self.speaker)
        torch.manual_seed(s.seed * 1000 + 7919 * (topo.rank + 1))  # per-rank stream (dropout)
        self.teachers = None
        if s.mode == "codistill" and s.codistill_target == "peers":
            self.teachers = PeerTeachers(
                s.exchange_dir or self.run_dir / "exchange", comm=self.comm, group=topo.group,
                num_groups=topo.num_groups, spec=self.spec, arch=self.arch, device=topo.device,
                max_staleness=s.max_staleness, policy=s.stale_policy, wait_timeout=s.stale_wait,
                exchange_id=self.exchange_id, stop=lambda: self.stop.requested)
        elif s.mode == "distill":
            self.teachers = FixedTeachers(s.teacher_paths, comm=self.comm, device=topo.device, student_arch=self.arch,
                                          student=self.spec, teacher=teacher_spec(s, self.data.kind))
        self.objective = Objective(s, self.data.num_classes, self.teachers)
        self.reader = TrainStream(
            self.data, batch_size=s.batch_size, rank=self.comm.Get_rank(), size=self.comm.Get_size(),
            group=topo.group, num_groups=topo.num_groups, split=s.data_split, seed=s.seed,
            exclude_labels=s.omitted_classes if s.mode == "distill" else (), workers=s.loader_workers,
            device=topo.device)
        self.ckpts = CheckpointManager(checkpoint_dir(self.run_dir, topo.group, topo.num_groups),
                                       keep=s.keep_checkpoints) if self.speaker else None
        self.metrics = MetricsWriter(metrics_path(self.run_dir, topo.group, topo.num_groups), topo.group,
                                     self.t0, enabled=self.speaker)

    def _restore(self) -> int:
        """Leader loads the newest valid checkpoint (or takes its fresh weights); the group gets them."""
        arrays = meta = None
        path = None
        if self.speaker:
            found = self.ckpts.latest_valid(check=_same_run(self.run_id)) if self.s.resume == "auto" else None
            if found:
                path, arrays, meta = found
                log.info("resuming from %s (step %d)", path, meta["step"])
            else:
                arrays, meta = capture(self.model, self.optimizer, step=0, arch=self.arch, rng=False)
        arrays, meta = bcast_tree(self.comm, arrays, meta)
        try:
            restore(arrays, meta, self.model, self.optimizer, rng=False)
        except CheckpointError as exc:  # every rank alike: the same bytes
            raise ConfigError(f"cannot resume from {path or 'the newest checkpoint'}: {exc.reason}; the settings "
                              "changed the model or optimizer since it was written: restore them, or start over "
                              "with HPCDISTILL_RESUME=never (or another HPCDISTILL_RUN_DIR)") from None
        rngs = arrays.get("extra/rng")
        if rngs is not None and len(rngs) == self.comm.Get_size():
            torch.set_rng_state(torch.from_numpy(rngs[self.comm.Get_rank()].copy()))
        if meta.get("data_state"):
            self.reader.load_state(meta["data_state"])
        self.updater.load_extra_state({k[len("extra/"):]: v for k, v in arrays.items() if k.startswith("extra/")})
        return int(meta["step"])

    def _save(self, step: int) -> None:
        """The leader writes the file. Sync: collective, every rank's RNG goes into it (exact resume);
        async: the lead worker alone, with a consistent snapshot of the global weights."""
        self.updater.settle(self.model)
        rng = torch.get_rng_state().numpy()
        if self.updater.synchronous:
            rngs = np.empty((self.comm.Get_size(), rng.size), np.uint8) if self.speaker else None
            self.comm.Gather(rng, rngs, root=0)
        else:
            rngs = rng[None]
        extra = self.updater.extra_state()
        if self.speaker:
            model = self.updater.current_model(self.model)
            if not _finite(model):  # a diverged model must not push a good checkpoint out of the rotation
                log.error("not writing the checkpoint of step %d: the weights hold NaN/inf (training diverged); "
                          "the older checkpoints are kept", step)
                return
            arrays, meta = capture(model, self.optimizer, step=step,
                                   data_state=self.reader.state(), arch=self.arch,
                                   extra={"rng": rngs, **extra}, rng=False,
                                   meta={"mode": self.s.mode, "group": self.topo.group, "run_id": self.run_id})
            self.ckpts.save(step, arrays, meta)

    def _evaluate(self, split: str) -> dict | None:
        """Sync: the group's ranks share the work; async: the lead worker alone (no coupling)."""
        self.updater.settle(self.model)
        comm = self.comm if self.updater.synchronous else None
        if comm is None and not self.speaker:
            return None
        return ev.evaluate(self.updater.current_model(self.model), self.data.dataset(split),
                           batch_size=max(self.s.batch_size, 256), device=self.topo.device, comm=comm,
                           workers=self.s.loader_workers)

    # --- the loop ---------------------------------------------------------------------------------
    def run(self) -> int:
        s, topo = self.s, self.topo
        if self.updater.is_host:
            self.updater.serve()
            return self._finish(None, stopped=False)
        self._prepare_loop()
        restored = self._restore()
        step = start = self.updater.begin(self.model, restored)
        if start != restored:  # async resume: this worker's own clock, not the lead's checkpointed step
            self.reader.seek_step(start)
        progress = Progress(s.steps, start)
        samples, loss_ema, initial_loss = 0, None, None
        stopped = diverged = False
        while step < s.steps:
            t_step = time.perf_counter()
            x, y = self.reader.next_batch()
            lr = lr_at(step, self.peak_lr, s.warmup_steps, s.steps)
            parts = self.updater.step(self.model, lambda: self.objective(self.model, x, y, step), lr)
            step += 1
            samples += x.shape[0]
            task = parts.get("task_loss", parts["loss"])
            loss_ema = task if loss_ema is None else 0.9 * loss_ema + 0.1 * task
            initial_loss = initial_loss if initial_loss is not None else task
            if topo.rank == s.straggler_rank:
                time.sleep(s.straggler_delay * (time.perf_counter() - t_step))
            if isinstance(self.teachers, PeerTeachers) and (step % s.exchange_every == 0 or step == s.burn_in
                                                            or (step > s.burn_in and self.teachers.due(step))):
                if step % s.exchange_every == 0:
                    self.updater.settle(self.model)
                    self.teachers.publish(step, self.updater.current_model(self.model),
                                          {"train_loss": loss_ema, "initial_loss": initial_loss})
                self.teachers.refresh(step, burn_in=s.burn_in)
            if step % s.log_every == 0 or step == s.steps:
                self.metrics.write(step, lr=lr, **parts, **self.updater.step_metrics())
                log.info(progress.line(step, samples * self.comm.Get_size(), loss=parts["loss"], lr=lr))
            if step % s.eval_every == 0 and step < s.steps and (val := self._evaluate("val")):
                self.metrics.write(step, val_loss=val["loss"], val_accuracy=val["accuracy"])
                log.info("step %d validation loss %.4f accuracy %.4f", step, val["loss"], val["accuracy"])
            stopped = self.updater.agree(self.stop.requested)
            saving = stopped or step % s.checkpoint_every == 0 or step == s.steps
            # Sync: the group's ranks hold the same weights and agree on `stopped`, so they all see a
            # divergence at the same step and leave together; async workers go on (the lead's
            # checkpoints skip NaN weights).
            if self.updater.synchronous and (saving or step % s.log_every == 0) and not _finite(self.model):
                log.error("training diverged at step %d: the weights hold NaN/inf (last training loss %s). "
                          "Stopping without a checkpoint; the older checkpoints are kept. Lower HPCDISTILL_LR "
                          "(or raise HPCDISTILL_WARMUP_STEPS) and resume or start again.", step, parts["loss"])
                if isinstance(self.teachers, PeerTeachers):
                    self.teachers.leave(f"diverged at step {step}")
                diverged = True
                break
            if saving:
                if self.updater.synchronous or (self.speaker and step < s.steps):
                    self._save(step)
            if stopped:
                if isinstance(self.teachers, PeerTeachers):
                    self.teachers.leave(f"stopped by {self.stop.name or 'a signal'} at step {step}; resumes later")
                what = "checkpoint written" if self.updater.synchronous or self.speaker else "stopping (the lead worker checkpoints)"
                log.warning("%s received: %s at step %d; exiting (HPCDISTILL_RESUME=auto resumes from it)",
                            self.stop.name or "stop signal", what, step)
                break
        self.updater.finish()
        if not self.updater.synchronous and self.speaker and step == s.steps:
            self._save(step)  # async: after every worker is done, so the last checkpoint is the final model
        self.samples = samples * self.comm.Get_size()
        self.steps_done = step - start
        if diverged:
            return self._finish(None, stopped=False, diverged=step)
        if isinstance(self.teachers, PeerTeachers) and not stopped:
            self.updater.settle(self.model)
            self.teachers.publish(step, self.updater.current_model(self.model),
                                  {"train_loss": loss_ema or 0.0, "initial_loss": initial_loss or 0.0}, final=True)
        return self._finish(self._group_result(step) if not stopped else None, stopped)

    def _group_result(self, step: int) -> dict:
        """This group's final numbers (collective in comm); only the speaker's copy is used."""
        val, test = self._evaluate("val"), self._evaluate("test")
        extra = self.updater.summary()
        if not self.speaker:
            return None
        result = {"group": self.topo.group, "ranks": self.topo.group_ranks, "steps": step,
                  "test_loss": test["loss"], "test_accuracy": test["accuracy"],
                  "val_loss": val["loss"], "val_accuracy": val["accuracy"],
                  "samples": self.samples, **extra}
        log.info("final: test loss %.4f accuracy %.4f, validation loss %.4f accuracy %.4f",
                 test["loss"], test["accuracy"], val["loss"], val["accuracy"])
        if self.teachers is not None:
            result["teachers"] = self.teachers.summary() if isinstance(self.teachers, PeerTeachers) else None
        if self.s.mode in ("codistill", "distill"):
            model = self.updater.current_model(self.model)
            test = self.data.dataset("test")
            probs, labels = ev.predict_probs(model, test, batch_size=256, device=self.topo.device,
                                             limit=ENSEMBLE_EVAL_LIMIT)
            result["_probs"], result["_labels"] = probs, labels
            if self.s.mode == "distill":
                tprobs = [ev.predict_probs(m, test, batch_size=256, device=self.topo.device)[0]
                          for m in self.teachers.models]
                _, all_labels = ev.predict_probs(model, test, batch_size=256, device=self.topo.device)
                result["distill"] = {
                    "teachers": [str(f) for f in self.teachers.files],
                    "teacher_test_accuracy": ev.ensemble_accuracy(tprobs, all_labels),
                    "teacher_member_test_accuracy": [ev.ensemble_accuracy([p], all_labels) for p in tprobs],
                    "student_parameters": count_parameters(model),
                    "teacher_parameters": self.teachers.parameters,
                    "temperature": self.s.temperature, "alpha": self.s.distill_weight,
                    "loss": self.s.distill_loss, "omitted_classes": list(self.s.omitted_classes),
                }
        return result

    def _finish(self, result: dict | None, stopped: bool, diverged: int | None = None) -> int:
        """Gather every group's result on world rank 0 and write summary.json (collective in world).
        Returns the exit status, the same on every rank: 3 when a group diverged, else 0."""
        topo = self.topo
        self.updater.close()
        _polite_barrier(topo.world)
        for claim in self.claims:
            claim.release()
        results = topo.world.gather((result, stopped, diverged, topo.group), root=0)
        code = 0
        if topo.rank == 0:
            bad = sorted({(g, d) for _, _, d, g in results if d is not None})
            if bad:
                log.error("diverged: %s; no summary.json (the newest checkpoints before it are kept)",
                          ", ".join(f"group {g} at step {d}" for g, d in bad))
                code = 3
            elif any(st for _, st, _, _ in results):
                log.warning("run stopped before the end; no summary.json (resume to finish)")
            else:
                write_json_atomic(self.run_dir / "summary.json",
                                  self._summary([r for r, _, _, _ in results if r is not None]))
                log.info("summary written to %s", self.run_dir / "summary.json")
        return topo.world.bcast(code, root=0)

    def _summary(self, groups: list[dict]) -> dict:
        s = self.s
        groups = sorted(groups, key=lambda g: g["group"])
        wall = time.time() - self.t0
        summary = {
            "mode": s.mode, "world_size": self.topo.size, "num_groups": self.topo.num_groups,
            "steps": s.steps, "wall_seconds": wall,
            "samples_per_second": sum(g.pop("samples") for g in groups) / wall,
            "dataset": s.dataset, "model": self.arch["name"], "run_dir": str(self.run_dir),
        }
        probs = [g.pop("_probs", None) for g in groups]
        labels = [g.pop("_labels", None) for g in groups]
        teachers = [g.pop("teachers", None) for g in groups]
        async_parts = [g.pop("async", None) for g in groups]
        distill = [g.pop("distill", None) for g in groups]
        summary["groups"] = groups
        if s.mode == "codistill":
            peer = [t for t in teachers if t]
            samples = sum(t["teacher_staleness"]["samples"] for t in peer)
            by_reason: Counter = Counter()
            for t in peer:
                by_reason.update(t["teachers_rejected_by_reason"])
            summary["codistill"] = {
                "target": s.codistill_target, "data_split": s.data_split, "exchange_id": self.exchange_id,
                "exchanges_published": sum(t["exchanges_published"] for t in peer),
                "teachers_loaded": sum(t["teachers_loaded"] for t in peer),
                "teachers_rejected": sum(t["teachers_rejected"] for t in peer),
                "teachers_rejected_by_reason": dict(sorted(by_reason.items())),
                "teacher_staleness": {  # over every step that had a teacher, pooled over the groups
                    "mean": sum(t["teacher_staleness"]["mean"] * t["teacher_staleness"]["samples"] for t in peer)
                    / samples if samples else 0.0,
                    "max": max((t["teacher_staleness"]["max"] for t in peer), default=0)},
                "steps_without_teacher": sum(t["steps_without_teacher"] for t in peer),
                "exchange_seconds": sum(t["publish_seconds"] + t["load_seconds"] for t in peer),
                "stale_policy": s.stale_policy,
                "teachers_dropped": sum(t["teachers_dropped"] for t in peer),
                "stale_waits": sum(t["stale_waits"] for t in peer),
                "stale_wait_seconds": sum(t["stale_wait_seconds"] for t in peer),
                "ensemble_test_accuracy": ev.ensemble_accuracy(probs, labels[0]),
                "churn": ev.mean_pairwise_churn(probs),
                "churn_samples": int(len(labels[0])),
                "groups": [{"group": g["group"], **{k: t[k] for k in ("steps_without_teacher", "teachers_loaded",
                                                                         "teachers_rejected_by_reason")}}
                           for g, t in zip(groups, teachers) if t],
            }
        if any(async_parts):
            from hpcdistill.strategies.async_rma import pooled_summary  # imports the RMA layer: async only

            summary["async"] = async_parts[0] if len(async_parts) == 1 else pooled_summary(async_parts)
        if distill[0]:
            summary["distill"] = distill[0]
        return summary


def train(settings) -> int:
    return Trainer(settings).run()
