"""The one training loop. A mode is this loop with an updater, a teacher source and an objective,
chosen in training/compose.py; the loop asks them what to do and decides nothing by mode:

    per step   batch -> objective(model, batch) -> updater.step -> teachers.on_step (publish, refresh)
    every k    log, evaluate, checkpoint (updater.saves / checkpoint_view), divergence (updater.diverged)
    the end    teachers.on_end, group results (teachers.group_result, updater.summary), summary.json

SIGTERM and SIGUSR2 (what Slurm sends before the time limit) make every rank of the group checkpoint at
the same step boundary and exit 75 (EX_TEMPFAIL: resume me); `HPCDISTILL_RESUME=auto` picks the run up again from there.
"""

from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path

import torch

from hpcdistill.atomic import atomic_path
from hpcdistill.background import BackgroundWriter
from hpcdistill.checkpoints import CheckpointError, CheckpointManager, capture, restore
from hpcdistill.claims import claim_dirs
from hpcdistill.comm.broadcast import bcast_tree
from hpcdistill.comm.topology import build_topology
from hpcdistill.comm.wait import polite_barrier
from hpcdistill.config import ConfigError, default_lr, optimizer_name, settings_env
from hpcdistill.data import DataError, TrainStream, open_source
from hpcdistill.log import Progress, get_logger, setup_logging
from hpcdistill.metrics import MetricsWriter, checkpoint_dir, metrics_path, numbers, write_json_atomic
from hpcdistill.models import all_finite
from hpcdistill.summary import RunSummary
from hpcdistill.training import compose
from hpcdistill.training import evaluate as ev
from hpcdistill.training.banner import banner

log = get_logger("train")

EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped on a signal, checkpoint written, resume me (0: finished)



def _same_run(run_id: str):
    """A read_h5 check for resuming: a checkpoint written by another run (a copy, a rerun) is skipped."""
    def check(meta: dict, layout: dict) -> None:
        other = meta.get("run_id")
        if other is not None and other != run_id:
            raise CheckpointError(None, f"another run: {other!r} (this run is {run_id!r})", "another-run")
    return check


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
    name = optimizer_name(settings, kind)
    lr = settings.lr or default_lr(settings, kind)  # DC-ASGD's plain SGD steps want ~4x momentum SGD's rate
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=settings.weight_decay), lr
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=settings.momentum,
                           weight_decay=settings.weight_decay), lr


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
              "num_groups": topo.num_groups, "groups": list(range(topo.group_offset, topo.group_offset +
                                                                   topo.local_groups)),
              "arch": arch, "run_id": run_id}
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


class Trainer:
    """State of one rank's run; `run()` is the loop."""

    def __init__(self, settings):
        self.s = s = settings
        self.t0 = time.time()
        self.stop = StopSignal()
        self.writer = BackgroundWriter()  # checkpoint and exchange files are written off the loop
        self.topo = topo = build_topology(s.local_group_count, offset=s.first_group, num_groups=s.num_groups,
                                          horovod=not s.uses_async, device=s.device)
        s.check_world(topo.size)
        setup_logging(topo.tag(), speaker=topo.is_leader)
        self.run_dir = resolve_run_dir(s, topo.world)
        self.run_id, self.claims = claim_dirs(s, self.run_dir, compose.exchange_dir(s, self.run_dir), topo.world)
        self.exchange_id = s.exchange_id or self.run_id
        self.data = _dataset_checked_once(s, topo.world)
        self.spec = compose.group_spec(s, topo.group, self.data.kind)
        self.arch = self.spec.record(self.data.input_shape, self.data.num_classes)
        torch.manual_seed(s.seed * 1000 + topo.group)  # each group its own initialisation
        self.model = self.spec.build(self.data.input_shape, self.data.num_classes).to(topo.device)
        optimizer, self.peak_lr = make_optimizer(s, self.model, self.data.kind)
        self.updater = compose.make_updater(s, topo, self.model, optimizer)
        self.optimizer = self.updater.optimizer  # the one holding the state (Horovod wraps a copy)
        if topo.rank == 0:
            _write_config(self.run_dir, s, topo, self.arch, self.run_id)
            with atomic_path(self.run_dir / "settings.env") as tmp:  # `set -a; . settings.env` replays the run
                tmp.write_text(settings_env(s, self.data.kind, pin_computed=False))

    # --- set-up that only the ranks running the loop do -------------------------------------------
    def _prepare_loop(self):
        s, topo = self.s, self.topo
        self.comm = self.updater.comm
        self.speaker = self.updater.writes
        setup_logging(topo.tag(), speaker=self.speaker)
        torch.manual_seed(s.seed * 1000 + 7919 * (topo.rank + 1))  # per-rank stream (dropout)
        self.teachers = compose.make_teachers(s, comm=self.comm, topo=topo, spec=self.spec, arch=self.arch,
                                              data_kind=self.data.kind, run_dir=self.run_dir,
                                              exchange_id=self.exchange_id, stop=lambda: self.stop.requested,
                                              writer=self.writer)
        self.objective = compose.make_objective(s, self.data.num_classes, self.teachers)
        self.reader = TrainStream(
            self.data, batch_size=s.batch_size, rank=self.comm.Get_rank(), size=self.comm.Get_size(),
            group=topo.group, num_groups=topo.num_groups, split=s.data_split, seed=s.seed,
            exclude_labels=compose.omitted_classes(s), workers=s.loader_workers, device=topo.device)
        self.ckpts = CheckpointManager(checkpoint_dir(self.run_dir, topo.group, topo.num_groups),
                                       keep=s.keep_checkpoints) if self.speaker else None
        self.metrics = MetricsWriter(metrics_path(self.run_dir, topo.group, topo.num_groups), topo.group,
                                     self.t0, enabled=self.speaker, csv=s.csv, tensorboard=s.tensorboard)
        if self.speaker:
            log.info(banner(s, topo, self.comm, self.spec, self.model, self.data, self.run_id, self.run_dir))

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
        rngs, cuda_rngs = arrays.get("extra/rng"), arrays.get("extra/cuda_rng")
        if rngs is not None and len(rngs) == self.comm.Get_size():
            torch.set_rng_state(torch.from_numpy(rngs[self.comm.Get_rank()].copy()))
        if cuda_rngs is not None and len(cuda_rngs) == self.comm.Get_size() and self.topo.device.type == "cuda":
            torch.cuda.set_rng_state(torch.from_numpy(cuda_rngs[self.comm.Get_rank()].copy()), self.topo.device)
        if meta.get("data_state"):
            self.reader.load_state(meta["data_state"])
        self.updater.load_extra_state({k[len("extra/"):]: v for k, v in arrays.items() if k.startswith("extra/")})
        return int(meta["step"])

    def _save(self, step: int) -> None:
        """Collective where the updater's checkpoints are (sync: every rank's RNG goes into the file, for
        an exact resume); the writer writes the weights and state the updater gives it."""
        self.updater.settle(self.model)
        rngs = {"rng": self.updater.gather_rngs(torch.get_rng_state().numpy())}
        if self.topo.device.type == "cuda":  # dropout on the GPU draws from the device's generator
            rngs["cuda_rng"] = self.updater.gather_rngs(torch.cuda.get_rng_state(self.topo.device).numpy())
        if not self.speaker:
            return
        model, extra = self.updater.checkpoint_view(self.model)
        if not all_finite(model):  # a diverged model must not push a good checkpoint out of the rotation
            log.error("not writing the checkpoint of step %d: the weights hold NaN/inf (training diverged); "
                      "the older checkpoints are kept", step)
            return
        arrays, meta = capture(model, self.optimizer, step=step, data_state=self.reader.state(), arch=self.arch,
                               extra={**rngs, **extra}, rng=False,
                               meta={"mode": self.s.mode, "group": self.topo.group, "run_id": self.run_id})
        self.writer.submit("checkpoint", lambda: self.ckpts.save(step, arrays, meta))  # a copy: training goes on

    def _evaluate(self, split: str) -> dict | None:
        """Collective in the updater's eval_comm, or the writer alone (None elsewhere)."""
        self.updater.settle(self.model)
        comm = self.updater.eval_comm
        if comm is None and not self.speaker:
            return None
        return ev.evaluate(self.updater.current_model(self.model), self.data.dataset(split),
                           batch_size=max(self.s.batch_size, 256), device=self.topo.device, comm=comm,
                           workers=self.s.loader_workers)

    def _publishable(self) -> torch.nn.Module:
        """The group's model as peers should see it (collective where the updater settles buffers)."""
        self.updater.settle(self.model)
        return self.updater.current_model(self.model)

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
            self.writer.check()  # a background write that failed stops the run here, naming the file
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
            health = {"train_loss": loss_ema, "initial_loss": initial_loss}  # tensors: numbers when published
            self.teachers.on_step(step, self._publishable, health)
            if step % s.log_every == 0 or step == s.steps:  # the step's one host synchronisation
                parts = numbers(parts)
                self.metrics.write(step, lr=lr, **parts, **self.updater.step_metrics())
                log.info(progress.line(step, samples * self.comm.Get_size(), loss=parts["loss"], lr=lr))
            if step % s.eval_every == 0 and step < s.steps and (val := self._evaluate("val")):
                self.metrics.write(step, val_loss=val["loss"], val_accuracy=val["accuracy"])
                log.info("step %d validation loss %.4f accuracy %.4f", step, val["loss"], val["accuracy"])
            stopped = self.updater.agree(self.stop.requested)
            saving = stopped or step % s.checkpoint_every == 0 or step == s.steps
            # The updater says whether the group diverged: a synchronous group's ranks hold the same
            # weights and agree on `stopped`, so they see it at the same step and leave together.
            if (saving or step % s.log_every == 0) and self.updater.diverged(self.model):
                log.error("training diverged at step %d: the weights hold NaN/inf (last training loss %s). "
                          "Stopping without a checkpoint; the older checkpoints are kept. Lower HPCDISTILL_LR "
                          "(or raise HPCDISTILL_WARMUP_STEPS) and resume or start again.", step,
                          numbers(parts)["loss"])
                self.teachers.on_stop(step, "diverged")
                diverged = True
                break
            if saving and self.updater.saves(step, final=step == s.steps):
                self._save(step)
            if stopped:
                self.teachers.on_stop(step, f"stopped by {self.stop.name or 'a signal'} (resumes later)")
                what = "checkpoint written" if self.speaker or self.updater.eval_comm is not None else \
                    "stopping (the lead worker checkpoints)"
                log.warning("%s received: %s at step %d; exiting (HPCDISTILL_RESUME=auto resumes from it)",
                            self.stop.name or "stop signal", what, step)
                break
        self.updater.finish()
        if self.updater.saves_after_finish(final=step == s.steps):
            self._save(step)  # async: after every worker is done, so the last checkpoint is the final model
        self.metrics.close()
        self.samples = samples * self.comm.Get_size()
        self.steps_done = step - start
        if diverged:
            return self._finish(None, stopped=False, diverged=step)
        if not stopped:
            self.teachers.on_end(step, self._publishable(),
                                 numbers({"train_loss": 0.0 if loss_ema is None else loss_ema,
                                          "initial_loss": 0.0 if initial_loss is None else initial_loss}))
        return self._finish(self._group_result(step) if not stopped else None, stopped)

    def _group_result(self, step: int) -> dict | None:
        """This group's final numbers (collective in comm); only the speaker's copy is used."""
        val, test = self._evaluate("val"), self._evaluate("test")
        updater_part = self.updater.summary()
        if not self.speaker:
            return None
        log.info("final: test loss %.4f accuracy %.4f, validation loss %.4f accuracy %.4f",
                 test["loss"], test["accuracy"], val["loss"], val["accuracy"])
        test_set = self.data.dataset("test")

        def predict(model, limit):
            return ev.predict_probs(model, test_set, batch_size=256, device=self.topo.device, limit=limit)

        return {"group": {"group": self.topo.group, "ranks": self.topo.group_ranks, "steps": step,
                          "model": self.spec.name,
                          "test_loss": test["loss"], "test_accuracy": test["accuracy"],
                          "val_loss": val["loss"], "val_accuracy": val["accuracy"]},
                "samples": self.samples, "updater": updater_part,
                "teachers": {"group": self.topo.group,
                             **self.teachers.group_result(self.updater.current_model(self.model), predict)}}

    def _finish(self, result: dict | None, stopped: bool, diverged: int | None = None) -> int:
        """Gather every group's result on world rank 0 and write summary.json (collective in world).
        Returns the exit status, the same on every rank: 3 when a group diverged, 75 (EX_TEMPFAIL:
        resume me) when the run stopped on a signal with its checkpoints written, else 0."""
        topo = self.topo
        self.writer.close()  # every checkpoint and exchange file on disk before anyone is told the run ended
        self.updater.close()
        polite_barrier(topo.world)
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
                log.warning("run stopped before the end; no summary.json (resume to finish); exit status %d",
                            EXIT_STOPPED)
                code = EXIT_STOPPED
            else:
                self._summary([r for r, _, _, _ in results if r is not None]).write(self.run_dir / "summary.json")
                log.info("summary written to %s", self.run_dir / "summary.json")
        return topo.world.bcast(code, root=0)

    def _summary(self, results: list[dict]) -> RunSummary:
        """Every group's numbers; each mode-specific section pooled by the component that made it."""
        s = self.s
        results = sorted(results, key=lambda r: r["group"]["group"])
        wall = time.time() - self.t0
        sections = {**self.updater.pool([r["updater"] for r in results]),  # rank 0 may be an async host:
                    **compose.teachers_class(s).pool([r["teachers"] for r in results])}  # classes, no instances
        return RunSummary.model_validate({
            "mode": s.mode, "world_size": self.topo.size, "num_groups": self.topo.num_groups,
            "steps": s.steps, "wall_seconds": wall,
            "samples_per_second": sum(r["samples"] for r in results) / wall,
            "dataset": s.dataset, "model": self.arch["name"], "run_dir": str(self.run_dir),
            "groups": [r["group"] for r in results], **sections})


def train(settings) -> int:
    return Trainer(settings).run()
