"""Teacher sources: where the distillation term's predictions come from.

- `PeerTeachers` (codistillation): the freshest healthy checkpoint of every other group, found in
  the exchange directory by this group's leader, read once and broadcast inside the group.
- `FixedTeachers` (distillation): a teacher or an ensemble from checkpoint files or run directories,
  verified before training starts.
Teachers run forward only, in eval mode, without gradients.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch

from hpcdistill.checkpoints import CheckpointError, CheckpointManager, model_arrays, model_part, read_h5
from hpcdistill.comm.broadcast import bcast_tree
from hpcdistill.ensemble import ensemble_accuracy, mean_pairwise_churn
from hpcdistill.exchange import Exchange
from hpcdistill.log import get_logger
from hpcdistill.metrics import numbers
from hpcdistill.models import (
    ModelError,
    ModelSpec,
    build_from_record,
    count_parameters,
    diff_manifests,
    resolve_model,
    sized_manifest,
    spec_from_record,
    state_manifest,
)
from hpcdistill.status import group_states

log = get_logger("teachers")

ENSEMBLE_EVAL_LIMIT = 2048  # test samples for codistillation's ensemble accuracy and churn (all of digits' 360)


class TeacherError(Exception):
    """A teacher given by the user cannot be used (exit code 2: fix the setting)."""

    exit_code = 2


def _frozen(model: torch.nn.Module, state: dict, device) -> torch.nn.Module:
    model.load_state_dict(state, strict=True)
    return model.to(device).eval().requires_grad_(False)


def _read_teacher(path: Path, factories: dict[str, str]) -> tuple[dict, dict]:
    """Read an hpcdistill checkpoint as a teacher: its model record must name a factory the job allows,
    and the model that factory builds with the recorded args (sized on the meta device) must match the
    file's tensors exactly, before any tensor data is read."""
    def check(meta: dict, layout: dict) -> None:
        if "arch" not in meta:
            raise CheckpointError(path, "not a model checkpoint of hpcdistill (no model record)")
        try:
            spec, shape, classes = spec_from_record(meta["arch"], factories=factories, where=str(path))
            want = sized_manifest(spec, shape, classes)
        except ModelError as exc:
            raise CheckpointError(path, str(exc).removeprefix(f"{path}: ")) from None
        problem = diff_manifests(model_part(layout), want, "the file", f"the model {spec.name} builds")
        if problem:
            raise CheckpointError(path, f"its tensors do not match its model record: {problem}")

    return read_h5(path, check=check, keep=lambda key: key.startswith("model/"))  # optimizer state: hashed only


class TeacherSource(Protocol):
    """What the loop and the objective ask of a mode's teachers. The loop calls the hooks at every step
    and at the ends of the run; the source decides what to do (publish, refresh, tell its peers)."""

    def on_step(self, step: int, publishable: Callable[[], torch.nn.Module], health: dict) -> None: ...
    def on_stop(self, step: int, why: str) -> None: ...
    def on_end(self, step: int, model: torch.nn.Module, health: dict) -> None: ...
    def teachers_for(self, step: int) -> list[torch.nn.Module]: ...
    def group_result(self, model: torch.nn.Module, predict: Callable) -> dict: ...

    @staticmethod
    def pool(parts: list[dict]) -> dict: ...


class NoTeachers:
    """sync and async: no teachers, nothing to publish, nothing in the summary."""

    models: list = []

    def on_step(self, step, publishable, health) -> None:
        pass

    def on_stop(self, step, why) -> None:
        pass

    def on_end(self, step, model, health) -> None:
        pass

    def teachers_for(self, step) -> list:
        return []

    def group_result(self, model, predict) -> dict:
        return {}

    @staticmethod
    def pool(parts: list[dict]) -> dict:
        return {}


class _Teachers(NoTeachers):
    models: list[torch.nn.Module]

    def logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        return forward(self.models, x)


def _copy_into(tensors: dict, arrays: dict) -> None:
    """New weights into a teacher's own tensors (same record, so the same names, shapes and dtypes,
    which the leader checked against the file before reading it)."""
    if tensors.keys() != arrays.keys():
        raise ValueError(f"the file's tensors {sorted(arrays)[:3]}... are not the model's {sorted(tensors)[:3]}...")
    with torch.no_grad():
        for key, dst in tensors.items():
            src = arrays[key]
            src = src if isinstance(src, torch.Tensor) else torch.from_numpy(src)
            if src.shape != dst.shape or src.dtype != dst.dtype:  # copy_ would broadcast or convert
                raise ValueError(f"{key}: {tuple(src.shape)} {src.dtype} in the file, {tuple(dst.shape)} {dst.dtype} "
                                 "in the model")
            dst.copy_(src)


def forward(models: list[torch.nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    """The teachers' logits for `x`, computed in inference mode (no autograd graph, no version counters
    or view tracking) and cloned out of it, so the loss may save them for its backward pass."""
    if not models:
        return []
    with torch.inference_mode():
        out = [m(x) for m in models]
    return [v.clone() for v in out]


class _CodistillSection:
    """The summary's `codistill` section, pooled over the groups (peers or the label-smoothing control)."""

    def __init__(self, *, target: str, data_split: str, stale_policy: str, exchange_id: str | None):
        self.header = {"target": target, "data_split": data_split, "exchange_id": exchange_id,
                       "stale_policy": stale_policy}

    def group_result(self, model, predict) -> dict:
        probs, labels = predict(model, ENSEMBLE_EVAL_LIMIT)
        return {"codistill": {**self.header, "teachers": self.summary()}, "_probs": probs, "_labels": labels}

    def summary(self) -> dict:
        return {}

    @staticmethod
    def pool(parts: list[dict]) -> dict:
        peer = [p["codistill"]["teachers"] for p in parts if p["codistill"]["teachers"]]
        probs, labels = [p["_probs"] for p in parts], parts[0]["_labels"]
        samples = sum(t["teacher_staleness"]["samples"] for t in peer)
        by_reason: Counter = Counter()
        for t in peer:
            by_reason.update(t["teachers_rejected_by_reason"])

        def total(key):
            return sum(t[key] for t in peer)

        header = {k: v for k, v in parts[0]["codistill"].items() if k != "teachers"}
        return {"codistill": {
            **header,
            "exchanges_published": total("exchanges_published"), "teachers_loaded": total("teachers_loaded"),
            "teachers_rejected": total("teachers_rejected"),
            "teachers_rejected_by_reason": dict(sorted(by_reason.items())),
            "teacher_staleness": {  # over every step that had a teacher, pooled over the groups
                "mean": sum(t["teacher_staleness"]["mean"] * t["teacher_staleness"]["samples"] for t in peer)
                / samples if samples else 0.0,
                "max": max((t["teacher_staleness"]["max"] for t in peer), default=0)},
            "steps_without_teacher": total("steps_without_teacher"),
            "exchange_seconds": sum(t["publish_seconds"] + t["load_seconds"] for t in peer),
            "publish_seconds": total("publish_seconds"), "load_seconds": total("load_seconds"),
            "teachers_dropped": total("teachers_dropped"), "stale_waits": total("stale_waits"),
            "stale_wait_seconds": total("stale_wait_seconds"),
            "exchanges": total("exchanges"), "exchange_bytes_read": total("exchange_bytes_read"),
            "peers_per_exchange": peer[0]["peers_per_exchange"] if peer else 0,
            "ensemble_test_accuracy": ensemble_accuracy(probs, labels),
            "churn": mean_pairwise_churn(probs), "churn_samples": int(len(labels)),
            "teachers_prefetched": total("teachers_prefetched"),
            "teacher_age": peer[0]["teacher_age"] if peer else None,
            "groups": [{"group": p["group"], **{k: t[k] for k in ("steps_without_teacher", "teachers_loaded",
                                                                 "teachers_rejected_by_reason", "last_loaded",
                                                                 "exchange_bytes_read", "teacher_digests")}}
                       for p, t in zip(parts, (q["codistill"]["teachers"] for q in parts)) if t],
        }}


class LabelSmoothingControl(_CodistillSection, NoTeachers):
    """Codistillation's control: the same loss with a smoothed one-hot target instead of the peers'
    predictions (the objective makes it); no exchange, but the same summary section."""


def peer_rotation(peers: list[int], k: int, exchange: int, *, seed: int, group: int) -> list[int]:
    """The peers of `group` in the order it tries them at its `exchange`-th exchange: a fixed seeded
    order, started k places further on at each exchange. Its first k are the turn's teachers, so every
    peer takes its turn every ceil(len(peers)/k) exchanges; the rest stand in for unavailable ones."""
    if not peers:
        return []
    order = [peers[i] for i in np.random.default_rng([seed, group, 0xC0D15]).permutation(len(peers))]
    start = (exchange * k) % len(order)
    return order[start:] + order[:start]


class Prefetcher:
    """The leader's background reader of peer files: after each exchange it looks for files newer than
    the teachers in hand (a directory listing per peer every `poll` seconds, a fifth of the last
    exchange interval within 0.05-2 s, until each wanted peer has one),
    reads and verifies the newest (`find`), and keeps it until the next exchange step, where the group
    switches to it (every rank at that step: the broadcast stays matched). The read, the checksum and
    the checks leave the loop; the broadcast and the rebuild stay in it."""

    def __init__(self, find, newest_step, poll: float = 0.5):
        self._find, self._newest, self.poll = find, newest_step, poll
        self._cv = threading.Condition()
        self._wanted: dict[int, int | None] = {}   # peer -> step of the teacher in hand (None: none)
        self._ready: dict[int, object] = {}        # peer -> PeerCheckpoint found since the last take
        self._step = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="hpcdistill prefetch", daemon=True)
        self._thread.start()

    def want(self, have: dict[int, int | None], step: int, interval: float | None = None) -> None:
        """Look for files newer than `have` (peer -> step in hand) from now on; `step` is the loop's,
        `interval` the seconds between its last two exchanges."""
        with self._cv:
            if interval:
                self.poll = min(2.0, max(0.05, interval / 5))
            self._wanted = dict(have)
            self._ready = {p: f for p, f in self._ready.items() if p in have and
                           (have[p] is None or f.step > have[p])}
            self._step = step
            self._cv.notify_all()

    def take(self, peer: int):
        """The newest file read for `peer` since the last `want`, or None (never blocks)."""
        with self._cv:
            return self._ready.pop(peer, None)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._closed or self._missing())
                if self._closed:
                    return
                todo = {p: h for p, h in self._wanted.items() if p not in self._ready}
                step = self._step
            for peer, have in todo.items():
                newest = self._newest(peer)
                if newest is None or (have is not None and newest <= have):
                    continue
                found = self._find(peer, max(step, newest), have)
                if found is not None:
                    with self._cv:
                        if self._wanted.get(peer, -1) == have:  # not superseded meanwhile
                            self._ready[peer] = found
            with self._cv:
                if self._missing():
                    self._cv.wait(self.poll)

    def _missing(self) -> bool:
        return any(p not in self._ready for p in self._wanted)


class PeerTeachers(_CodistillSection, _Teachers):
    """Codistillation teachers: the other groups' recent models, via the shared filesystem.

    A peer further than `max_staleness` steps behind is dropped from the loss (policy "drop", the
    default: a very stale teacher slows training down, Anil et al. 2018, and waiting would couple the
    groups that codistillation keeps independent), or waited for (policy "wait", bounded by
    `wait_timeout` seconds, cut short by a stop signal, and never for a peer that has finished, left,
    died (its job's claim has no heartbeat) or not started). A peer never seen after burn-in is waited
    for too under "wait"; under "drop" it is named once in the log. Every refusal is counted by its reason.

    With `k` < G-1 (HPCDISTILL_PEERS) a group distills from k peers at a time, chosen at each exchange
    by `peer_rotation` (available ones first): reads per exchange and teacher forwards per step are
    O(k), not O(G). A peer's model is whatever its record says, if `records` allows it: records[g] is
    the record group g must carry (None: any record built by an allowed factory for this data).

    With `age` = D (HPCDISTILL_TEACHER_AGE, an experiment's control of staleness) the teacher used from
    step t is each peer's file of step floor((t - D) / E) * E exactly (E = EXCHANGE_EVERY), waited for
    (bounded) when the peer has not written it yet: a teacher's age is D .. D+E-1 whatever the groups'
    speeds, so runs repeat. Files are then published before the refresh (at D < E a peer waits for
    this very file), and written and read in the loop (no background writer, no prefetcher).
    """

    def __init__(self, exchange_dir: Path, *, comm, group: int, num_groups: int, spec: ModelSpec, arch: dict,
                 device, max_staleness: int, policy: str = "drop", wait_timeout: float = 60.0,
                 exchange_id: str | None = None, stop=lambda: False, exchange_every: int = 50, burn_in: int = 0,
                 data_split: str = "disjoint", records: dict[int, dict | None] | None = None,
                 factories: dict[str, str] | None = None, k: int | None = None, seed: int = 0, writer=None,
                 prefetch: bool = True, age: int | None = None):
        _CodistillSection.__init__(self, target="peers", data_split=data_split, stale_policy=policy,
                                   exchange_id=exchange_id)
        self.comm, self.spec, self.arch, self.device = comm, spec, arch, device
        self.group, self.seed = group, seed
        # A BackgroundWriter writes files off the loop (None: in the loop). Not under a teacher age: the
        # writer replaces a pending snapshot by a newer one, and a peer waiting for exactly the skipped
        # file waited until STALE_WAIT (seen at 3 runs in parallel on 2 cores: step 600 never written).
        self.writer = writer if age is None else None
        self.exchange_every, self.burn_in, self.age = exchange_every, burn_in, age
        self.leader = comm.Get_rank() == 0
        self.max_staleness, self.policy, self.wait_timeout = max_staleness, policy, wait_timeout
        self.stop = stop
        # Under a teacher age a group waits for the peer's file D steps back, so a peer runs up to D + E
        # steps ahead and needs this group's files from 2D + E steps back: keep them (with 2D/E + 2,
        # a peer 3x slower found its file deleted and trained 100 of 150 steps without a teacher).
        keep = 3 if age is None else max(3, -(-2 * age // exchange_every) + 3)
        self.exchange = Exchange(exchange_dir, group=group, num_groups=num_groups, keep=keep,
                                 exchange_id=exchange_id) if self.leader else None
        self.peers = [g for g in range(num_groups) if g != group]
        self.k = len(self.peers) if k is None else min(k, len(self.peers))
        self.selected = list(self.peers) if self.k == len(self.peers) else []
        same = json.loads(json.dumps(arch))  # as stored: tuples become lists
        self.records = {g: same for g in self.peers} if records is None else \
            {g: json.loads(json.dumps(r)) if r is not None else None for g, r in records.items()}
        self.factories = {spec.factory: spec.variable, **(factories or {})}
        self._models: dict[tuple, tuple[ModelSpec, dict]] = {}  # (peer, record JSON) -> (spec, manifest)
        self.current: dict[int, tuple[int, torch.nn.Module, bool]] = {}  # peer -> (step, model, final)
        self.published = self.loaded = 0
        self.rejected_by_reason: Counter = Counter()
        self.staleness: list[int] = []
        self.steps_without_teacher = 0  # steps with the distillation term on and a peer's teacher missing
        self.publish_seconds = self.load_seconds = 0.0
        self.dropped = self.waits = 0
        self.wait_seconds = 0.0  # time held back by policy "wait" (not counted in load_seconds)
        self.exchanges = 0  # refreshes at exchange steps (bytes read per exchange = bytes_read / exchanges)
        self.last_loaded: dict[int, int] = {}  # peer -> step of the newest teacher loaded from it
        self._missing_said: set[int] = set()
        self._named: set[tuple[int, str]] = set()
        self._io = threading.RLock()  # the exchange's reader state and the record cache: loop and prefetcher
        self.prefetched = 0  # teachers that came from the prefetcher (read off the loop)
        self._record_of: dict[int, str] = {}  # peer -> the record (JSON) of the teacher module in hand
        self._tensors: dict[int, dict] = {}     # peer -> that module's state_dict (its storage)
        self.prefetcher = Prefetcher(self._find_quiet, self.exchange.newest_step) \
            if prefetch and self.leader and age is None else None
        self._last_read_ahead: float | None = None  # monotonic time of the last read-ahead request
        self.digests: list[str] = []  # every rank's digest of its teachers at the end (on_end)
        if self.prefetcher:  # the first teachers too: read while burn-in trains
            self.prefetcher.want({p: None for p in self._turn(max(burn_in, 1) // exchange_every)}, 0)

    @property
    def models(self) -> list[torch.nn.Module]:
        return [m for _, m, _ in self.current.values()]

    def publish(self, step: int, model, health: dict, final: bool = False) -> None:
        """The leader snapshots the model (what the group waits for) and hands the file to the writer.
        The final publication is written while the group evaluates its final model; the loop waits
        for it before the run ends (the writer's close in Trainer._finish)."""
        if self.leader:
            t = time.perf_counter()
            arrays, meta = self.exchange.snapshot(step, model, arch=self.arch,
                                                  health={**numbers(health), "final": final})
            if self.writer is None:
                self.exchange.write(step, arrays, meta)
            else:
                self.writer.submit("exchange", lambda: self.exchange.write(step, arrays, meta))
            self.publish_seconds += time.perf_counter() - t
            self.published += 1

    def on_step(self, step: int, publishable, health: dict) -> None:
        """Publish every EXCHANGE_EVERY steps; look for fresher peers then, at the end of burn-in, and
        whenever a teacher in use goes stale (collective in comm: every rank decides alike)."""
        exchange_step = step % self.exchange_every == 0
        if exchange_step or step == self.burn_in or (step > self.burn_in and self.due(step)):
            # Refresh first, publish after: the writer thread's HDF5 calls hold the GIL, and started
            # before the refresh they stalled it (load 0.29 s vs 0.05 s over 60 exchanges); after it,
            # they overlap the next steps' torch kernels, which release the GIL. Under a teacher age
            # the peers may wait for this step's file: publish first.
            if exchange_step and self.age is not None:
                self.publish(step, publishable(), health)
            self.refresh(step, burn_in=self.burn_in, rotate=exchange_step or not self.selected, read_ahead=False)
            if exchange_step and self.age is None:
                self.publish(step, publishable(), health)
            self._read_ahead(step)  # after the snapshot too, for the same reason

    def on_stop(self, step: int, why: str) -> None:
        self.close()
        self.leave(f"{why} at step {step}")

    def on_end(self, step: int, model, health: dict) -> None:
        self.close()
        self.publish(step, model, health, final=True)
        self.digests = self._digests()

    def close(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.close()
            self.prefetcher = None

    def _digests(self) -> list[str]:
        """Every rank's digest of the teachers it holds, gathered in the group (collective in comm):
        teachers switched from the prefetcher must be the same on every rank."""
        import hashlib

        h = hashlib.sha256()
        for peer in sorted(self.current):
            step, model, _ = self.current[peer]
            h.update(f"{peer}:{step};".encode())
            for key, value in model.state_dict().items():
                h.update(key.encode())
                h.update(value.detach().cpu().contiguous().numpy().tobytes())
        return self.comm.allgather(h.hexdigest()[:16])

    def leave(self, reason: str) -> None:
        """This group publishes nothing more for now (it diverged, or stopped on a signal and will
        resume): its peers stop waiting for it. Publishing again clears the mark, so a publication
        still being written is finished first."""
        if self.leader:
            if self.writer is not None:
                self.writer.flush()
            self.exchange.mark_gone(reason)

    def due(self, step: int) -> bool:
        """A teacher in use is beyond MAX_STALENESS at `step`: refresh now rather than at the next
        exchange step (drop it, or wait for a fresher one). Every rank of the group holds the same
        teachers, so all of them decide alike and the collective refresh stays matched."""
        return any(step - peer_step > self.max_staleness for peer_step, _, _ in self.current.values())

    def refresh(self, step: int, burn_in: int = 0, rotate: bool = True, read_ahead: bool = True) -> None:
        """Leader looks for fresher peer checkpoints; the group receives them (collective in comm).
        With k < G-1 and `rotate`, the k peers of this exchange are chosen first (see _choose)."""
        t, waited = time.perf_counter(), self.wait_seconds
        if rotate:
            self.exchanges += 1
            if self.k < len(self.peers):
                self._choose(step)
        for peer in self.selected:
            have = self.current.get(peer)
            found = None
            if self.leader:
                found = self.prefetcher.take(peer) if self.prefetcher else None
                if found is not None and step - found.step <= self.max_staleness:
                    self.prefetched += 1
                elif self.prefetcher is not None and have is not None and step - have[0] <= self.max_staleness:
                    found = None  # keep the teacher in hand: the prefetcher brings the next one, off the loop
                else:  # nothing read ahead and nothing usable in hand (a new peer, burn-in): read it now
                    found = self._find(peer, step, newer_than=have[0] if have else None)
            self._receive(peer, found)
            if self.age is not None and step >= burn_in and self.current.get(peer, (-1,))[0] < self._aged(step):
                self._wait_for(peer, step)  # the file of exactly the controlled age (every rank decides alike)
            if peer not in self.current and step >= burn_in:
                self._missing(peer, step)
        self._enforce_staleness(step)
        if read_ahead:
            self._read_ahead(step)
        self.load_seconds += time.perf_counter() - t - (self.wait_seconds - waited)

    def _read_ahead(self, step: int) -> None:
        """Have the prefetcher read the next exchange's files while the group trains."""
        if self.prefetcher:
            now = time.monotonic()
            interval = None if self._last_read_ahead is None else now - self._last_read_ahead
            self._last_read_ahead = now
            nxt = self._turn(step // self.exchange_every + 1)
            self.prefetcher.want({p: self.current[p][0] if p in self.current else None for p in nxt}, step, interval)

    def _turn(self, exchange: int) -> list[int]:
        """The k peers the rotation gives the `exchange`-th exchange (every peer when k = G-1)."""
        if self.k == len(self.peers):
            return list(self.peers)
        return peer_rotation(self.peers, self.k, exchange, seed=self.seed, group=self.group)[:self.k]

    def _choose(self, step: int) -> None:
        """This exchange's k peers, in `peer_rotation` order: those with a file fresh enough and not
        gone first (metadata only: directory listings and claims), then the others. The leader
        decides, the group follows; teachers of peers left out are released (teacher compute O(k))."""
        chosen = None
        if self.leader:
            order = peer_rotation(self.peers, self.k, step // self.exchange_every, seed=self.seed, group=self.group)

            def available(peer):
                newest = self.exchange.newest_step(peer)
                return newest is not None and step - newest <= self.max_staleness and not self.exchange.gone(peer)

            ready = [p for p in order if available(p)]
            chosen = (ready + [p for p in order if p not in ready])[:self.k]
        self.selected = list(bcast_tree(self.comm, None, {"chosen": chosen})[1]["chosen"])
        for peer in [p for p in self.current if p not in self.selected]:
            del self.current[peer]

    def _peer_model(self, peer: int, record) -> tuple[ModelSpec, dict]:
        """(spec, manifest) of the model a peer's record describes, if this group accepts it: the record
        HPCDISTILL_GROUP_MODELS (or this job's model) fixes for that group, or, for a group of another
        job with its own HPCDISTILL_MODEL, any record of an allowed factory (this job's, GROUP_MODELS',
        built-ins) for the same inputs and classes. ModelError says why not. Accepted records are
        cached per peer; a hit takes no lock (the prefetcher holds it while it reads a file: 2 ms a
        refresh when the loop waited for it)."""
        key = (peer, json.dumps(record, sort_keys=True, default=str))
        hit = self._models.get(key)
        if hit is not None:
            return hit
        with self._io:
            return self._peer_model_locked(peer, record, key)

    def _peer_model_locked(self, peer: int, record, key) -> tuple[ModelSpec, dict]:
        if key in self._models:
            return self._models[key]
        want = self.records.get(peer)
        if want is not None and record != want:
            raise ModelError(f"architecture {record} but expected {want} (what group {peer} trains here; give every "
                             "job the same HPCDISTILL_MODEL or HPCDISTILL_GROUP_MODELS)")
        spec, shape, classes = spec_from_record(record, factories=self.factories, where=f"group {peer}'s record")
        if [list(shape), classes] != [list(self.arch["input_shape"]), self.arch["num_classes"]]:
            raise ModelError(f"group {peer}'s model takes inputs {list(shape)} and {classes} classes, this group's "
                             f"data has {list(self.arch['input_shape'])} and {self.arch['num_classes']}: the groups "
                             "of a codistillation must train on the same dataset")
        if len(self._models) >= 64:  # distinct records are few; a writer making up new ones gains nothing
            self._models.pop(next(iter(self._models)))
        self._models[key] = (spec, sized_manifest(spec, shape, classes))
        return self._models[key]

    def _missing(self, peer: int, step: int) -> None:
        """No teacher from `peer` at all after burn-in: wait for one ("wait"), or say so once ("drop")."""
        if self.policy == "wait":
            self._wait_for(peer, step)
            if peer in self.current:
                return
        if self.leader and peer not in self._missing_said:
            self._missing_said.add(peer)
            newest = self.exchange.newest_step(peer)
            log.warning("no teacher from group %d at step %d: %s; training on without its term (counted as "
                        "steps_without_teacher)", peer, step,
                        "it has published nothing yet" if newest is None else
                        f"its newest file is step {newest}, more than HPCDISTILL_MAX_STALENESS={self.max_staleness} "
                        "behind, or refused (see above)")

    def _receive(self, peer: int, found) -> None:
        """Broadcast what the leader found (or nothing) and load it as the peer's teacher. A file that
        passed every check but still does not load is refused, on every rank alike (same bytes)."""
        final = bool(found.meta["health"].get("final")) if found else False
        meta = {"step": found.step, "final": final, "arch": found.meta["arch"]} if found else None
        arrays, meta = bcast_tree(self.comm, found.arrays if found else None, meta)
        if arrays is None:
            return
        record = json.dumps(meta["arch"], sort_keys=True)
        try:
            spec = self._peer_model(peer, meta["arch"])[0]
            if peer in self.current and self._record_of.get(peer) == record:  # the same model: new weights
                model = self.current[peer][1]  # copied into its tensors (a rebuild and load_state_dict
                _copy_into(self._tensors[peer], model_arrays(arrays))  # cost 0.6 and 0.5 ms; this 0.02)
            else:
                model = _frozen(spec.build(self.arch["input_shape"], self.arch["num_classes"]),
                                model_arrays(arrays), self.device)
        except Exception as exc:  # noqa: BLE001 - nothing a peer's file holds may crash the group
            self.rejected_by_reason["architecture"] += 1
            self.current.pop(peer, None)  # possibly half loaded
            if self.leader:
                log.warning("refused teacher %s: does not load (%s: %s)", found.path, type(exc).__name__, exc)
            return
        self._record_of[peer] = record
        self._tensors[peer] = model.state_dict()  # the module's own storage, for the next copy
        if (spec.factory, spec.args) != (self.spec.factory, self.spec.args) and (peer, spec.name) not in self._named:
            self._named.add((peer, spec.name))  # another architecture: say so once
            if self.leader:
                log.info("teacher of group %d: %s (%d parameters)", peer, spec.name, count_parameters(model))
        self.current[peer] = (meta["step"], model, meta["final"])
        self.last_loaded[peer] = meta["step"]
        self.loaded += 1

    def _aged(self, step: int) -> int:
        """The step of the peer file a teacher of age D must come from at `step` (TEACHER_AGE)."""
        return (step - self.age) // self.exchange_every * self.exchange_every

    def _find(self, peer: int, step: int, newer_than: int | None):
        oldest = max(0, step - self.max_staleness, -1 if newer_than is None else newer_than + 1)
        newest = None
        if self.age is not None:  # that one file, nothing fresher
            newest = self._aged(step)
            oldest = max(oldest, newest)
        with self._io:
            found, rejections = self.exchange.freshest(
                peer, expect=lambda meta: self._peer_model(peer, meta.get("arch"))[1], min_step=oldest,
                max_step=newest)
            for path, code, reason in rejections:
                self.rejected_by_reason[code] += 1
                log.warning("refused teacher %s (%s): %s", path, code, reason)
        return found

    def _find_quiet(self, peer: int, step: int, newer_than: int | None):
        """_find for the prefetcher: a failure to read is the loop's next synchronous read's to report."""
        try:
            return self._find(peer, step, newer_than)
        except Exception:  # noqa: BLE001 - the loop reads it again itself
            return None

    def _enforce_staleness(self, step: int) -> None:
        for peer, (peer_step, _, final) in list(self.current.items()):
            if step - peer_step <= self.max_staleness:
                continue
            if self.policy == "wait" and not final:
                self._wait_for(peer, step)
                if peer in self.current and step - self.current[peer][0] <= self.max_staleness:
                    continue
            log.info("dropping teacher of group %d: %d steps stale > HPCDISTILL_MAX_STALENESS=%d",
                     peer, step - peer_step, self.max_staleness)
            del self.current[peer]
            self.dropped += 1

    def _wait_for(self, peer: int, step: int) -> None:
        """Leader polls until the peer publishes something fresh enough, the peer has left or stopped,
        a stop signal arrives, or the timeout passes (collective in comm: the group gets the result)."""
        t = time.monotonic()
        deadline = t + self.wait_timeout
        found = None
        if self.leader:
            have = self.current.get(peer)
            gone = self.exchange.gone(peer)
            if not gone and self.age is None:  # under TEACHER_AGE short waits are the rule: said if long
                log.info("waiting up to %.0f s for a teacher from group %d newer than %s (HPCDISTILL_STALE_POLICY="
                         "wait)", self.wait_timeout, peer, f"step {have[0]}" if have else "none")
            while not gone and found is None and time.monotonic() < deadline and not self.stop():
                found = self._find(peer, step, newer_than=have[0] if have else None)
                if found is None:
                    gone = self.exchange.gone(peer)  # it left, died or never started: nothing is coming soon
                    if not gone:
                        time.sleep(0.2)
            if gone and found is None:
                log.info("not waiting for group %d: %s", peer, gone)
            elif found is None and self.age is not None:
                log.warning("no file of step %d from group %d after %.0f s (HPCDISTILL_TEACHER_AGE=%d): training on "
                            "with the teacher in hand", self._aged(step), peer, time.monotonic() - t, self.age)
        self._receive(peer, found)
        self.waits += 1
        self.wait_seconds += time.monotonic() - t

    def teachers_for(self, step: int) -> list[torch.nn.Module]:
        """The teachers usable at `step`, recording their staleness and steps a peer's is missing."""
        out = []
        for peer_step, model, _ in self.current.values():
            if step - peer_step <= self.max_staleness:
                self.staleness.append(max(0, step - peer_step))
                out.append(model)
        if len(out) < len(self.selected):
            self.steps_without_teacher += 1
        return out

    def summary(self) -> dict:
        s = np.array(self.staleness, dtype=np.int64)
        return {
            "exchanges_published": self.published, "teachers_loaded": self.loaded,
            "teachers_rejected": sum(self.rejected_by_reason.values()),
            "teachers_rejected_by_reason": dict(sorted(self.rejected_by_reason.items())),
            # over the steps that had a teacher (a group without one adds no zeros)
            "teacher_staleness": {"mean": float(s.mean()) if s.size else 0.0, "max": int(s.max()) if s.size else 0,
                                  "samples": int(s.size)},
            "steps_without_teacher": self.steps_without_teacher,
            "publish_seconds": self.publish_seconds, "load_seconds": self.load_seconds,
            "teachers_dropped": self.dropped, "stale_waits": self.waits, "stale_wait_seconds": self.wait_seconds,
            "exchanges": self.exchanges, "exchange_bytes_read": self.exchange.bytes_read if self.leader else 0,
            "peers_per_exchange": self.k, "last_loaded": {str(p): s for p, s in sorted(self.last_loaded.items())},
            "teachers_prefetched": self.prefetched, "teacher_digests": self.digests, "teacher_age": self.age,
        }


def teacher_candidates(paths) -> list[list[Path]]:
    """One list of candidate files per teacher, newest first: a file as given is its own single
    candidate; a run directory stands for each of its groups' checkpoints, an exchange directory for
    each group's exchange files (the newest that passes the checks is used). Only metadata is read
    here (status of an exchange directory): a directory is as untrusted as any file."""
    out = []
    for p in map(Path, paths):
        if not p.is_dir():
            out.append([p])
            continue
        if (p / "checkpoints").is_dir():
            ckdir = p / "checkpoints"
            dirs = sorted(ckdir.glob("group-*")) or [ckdir]
        else:  # an exchange directory: every group's newest (final) exchange file
            ckdir = p
            dirs = sorted(d for d in p.glob("group-*") if d.is_dir() and not d.is_symlink())
        groups = [CheckpointManager(d).paths() for d in dirs]
        groups = [g for g in groups if g]
        if not groups:
            raise TeacherError(f"HPCDISTILL_TEACHERS: no checkpoint under {ckdir}; point at a finished run "
                               "directory, an exchange directory or .h5 files")
        if ckdir is p:
            unfinished = [s["group"] for s in group_states(p) if not s["final"]]
            if unfinished:
                log.warning("HPCDISTILL_TEACHERS: in %s, group(s) %s have not published a final checkpoint; "
                            "using their newest", p, unfinished)
        elif not (p / "summary.json").exists():
            log.warning("HPCDISTILL_TEACHERS: %s has no summary.json (unfinished or stopped); using its newest "
                        "checkpoints", p)
        out.extend(groups)
    return out


def _check_fits(path, arch: dict, student: dict) -> None:
    """A teacher must take the student's inputs and predict the same classes."""
    student = json.loads(json.dumps(student))  # compare as stored: tuples become lists
    for key in ("input_shape", "num_classes"):
        if arch.get(key) != student.get(key):
            raise TeacherError(f"{path}: the teacher was trained for {key} {arch.get(key)}, this dataset has "
                               f"{student.get(key)}; distill on the dataset the teacher was trained on")


EXTERNAL_SUFFIXES = (".safetensors", ".pt", ".pth")


def teacher_spec(settings, kind: str) -> ModelSpec | None:
    """The factory HPCDISTILL_TEACHER_MODEL names, with HPCDISTILL_TEACHER_MODEL_ARGS; unset, the student's
    factory with those args (None when neither is set: teachers then use the student's spec)."""
    if not (settings.teacher_model or settings.teacher_model_args):
        return None
    return resolve_model(settings.teacher_model or settings.model, settings.teacher_model_args, kind=kind,
                         variable="HPCDISTILL_TEACHER_MODEL")


def _read_external(path: Path, spec: ModelSpec, student: dict) -> dict:
    """A plain state_dict from outside the toolkit (.safetensors, or torch.save's .pt read with
    weights_only=True), for the model `spec` builds on the student's inputs; its tensors must match
    that model's exactly (names, shapes, dtypes), checked before the data is loaded."""
    want = sized_manifest(spec, student["input_shape"], student["num_classes"])
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                have = {k: [list(f.get_slice(k).get_shape()), _st_dtype(f.get_slice(k).get_dtype())] for k in f.keys()}
                problem = diff_manifests(have, want, "the file", f"the model {spec.name} builds")
                if problem:
                    raise TeacherError(f"{path}: does not fit the teacher model: {problem}; set "
                                       "HPCDISTILL_TEACHER_MODEL and HPCDISTILL_TEACHER_MODEL_ARGS to the model "
                                       "these weights were trained with")
                return {k: f.get_tensor(k) for k in f.keys()}
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except TeacherError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign file may fail anywhere in the reader
        raise TeacherError(f"{path}: not a readable {path.suffix} state_dict ({type(exc).__name__}: {exc})") from None
    if not (isinstance(state, dict)
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())):
        raise TeacherError(f"{path}: holds a {type(state).__name__}, not a state_dict of tensors; save "
                           "model.state_dict() (or use `hpcdistill export`)")
    problem = diff_manifests(state_manifest(state), want, "the file", f"the model {spec.name} builds")
    if problem:
        raise TeacherError(f"{path}: does not fit the teacher model: {problem}; set HPCDISTILL_TEACHER_MODEL "
                           "and HPCDISTILL_TEACHER_MODEL_ARGS to the model these weights were trained with")
    return state


def _st_dtype(name: str) -> str:
    """safetensors' dtype names (F32, BF16, I64 ...) as torch's ("float32" ...)."""
    return {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
            "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}.get(name, name)


def _load_teacher(f: Path, factories: dict, teacher: ModelSpec, student_arch: dict) -> tuple[dict, dict]:
    """(model arrays, {"arch": record}) of one teacher file, every check passed."""
    if f.suffix in EXTERNAL_SUFFIXES:
        state = _read_external(f, teacher, student_arch)
        arch = teacher.record(student_arch["input_shape"], student_arch["num_classes"])
        return {f"model/{k}": v.numpy() for k, v in state.items()}, {"arch": arch}
    arrays, meta = _read_teacher(f, factories)
    _check_fits(f, meta["arch"], student_arch)
    return arrays, {"arch": meta["arch"]}


def _first_usable(candidates: list[Path], factories: dict, teacher: ModelSpec, student_arch: dict):
    """The newest candidate that loads; the refusal of the last one if none does."""
    for i, f in enumerate(candidates):
        try:
            return f, _load_teacher(f, factories, teacher, student_arch)
        except (CheckpointError, TeacherError, ModelError) as exc:
            if i == len(candidates) - 1:
                raise
            log.warning("HPCDISTILL_TEACHERS: skipping %s (%s); trying an older checkpoint", f, exc)


class FixedTeachers(_Teachers):
    """Distillation teachers: read and verified by the leader, broadcast to every rank of `comm`.

    `student` is the student's ModelSpec and `teacher` the one HPCDISTILL_TEACHER_MODEL names (None:
    the student's). hpcdistill checkpoints are rebuilt from their model record with one of those
    factories (or a built-in one); .safetensors/.pt state_dicts with `teacher` itself."""

    def __init__(self, paths, *, comm, device, student_arch: dict, student: ModelSpec, teacher: ModelSpec | None = None,
                 settings: dict | None = None):
        self.settings = settings or {}  # temperature, alpha, loss, omitted classes: echoed in the summary
        teacher = teacher or student
        factories = {student.factory: student.variable, teacher.factory: teacher.variable}
        self.files, error, trees = [], None, []
        if comm.Get_rank() == 0:
            try:
                for candidates in teacher_candidates(paths):
                    f, tree = _first_usable(candidates, factories, teacher, student_arch)
                    self.files.append(f)
                    trees.append(tree)
            except (CheckpointError, TeacherError, ModelError) as exc:
                error = f"HPCDISTILL_TEACHERS: teacher refused: {exc}"
        _, head = bcast_tree(comm, None, {"error": error, "n": len(trees), "files": [str(f) for f in self.files]})
        if head["error"]:
            raise TeacherError(head["error"])
        self.files = [Path(f) for f in head["files"]]
        self.models, self.archs = [], []
        for i in range(head["n"]):
            arrays, meta = bcast_tree(comm, *(trees[i] if trees else (None, None)))
            model = build_from_record(meta["arch"], factories=factories, where=str(self.files[i]))
            self.models.append(_frozen(model, model_arrays(arrays), device))
            self.archs.append(meta["arch"])

    @property
    def parameters(self) -> int:
        return sum(count_parameters(m) for m in self.models)

    def group_result(self, model, predict) -> dict:
        probs, labels = predict(model, None)
        tprobs = [predict(m, None)[0] for m in self.models]
        return {"distill": {
            "teachers": [str(f) for f in self.files],
            "teacher_test_accuracy": ensemble_accuracy(tprobs, labels),
            "teacher_member_test_accuracy": [ensemble_accuracy([p], labels) for p in tprobs],
            "student_parameters": count_parameters(model), "teacher_parameters": self.parameters,
            **self.settings}}

    @staticmethod
    def pool(parts: list[dict]) -> dict:
        return {"distill": parts[0]["distill"]}
