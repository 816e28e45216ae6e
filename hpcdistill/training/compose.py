"""Which components make a mode: the one place that reads HPCDISTILL_MODE after the settings.

    mode        updater                       teachers                          objective
    sync        SyncUpdater                   none                              task loss
    async       AsyncUpdater                  none                              task loss
    codistill   SyncUpdater (GROUP_MODE=      PeerTeachers (the exchange dir),  task + distillation term
                sync) or AsyncUpdater         or the label-smoothing control    (or its control)
    distill     SyncUpdater                   FixedTeachers (files)             Hinton loss

A new mode is a row here (and a value of HPCDISTILL_MODE); the loop does not change.
"""

from __future__ import annotations

from pathlib import Path

from hpcdistill.models import ModelSpec, resolve_model
from hpcdistill.teachers import FixedTeachers, LabelSmoothingControl, NoTeachers, PeerTeachers, teacher_spec
from hpcdistill.training.objective import Objective


def make_updater(settings, topo, model, optimizer):
    if settings.uses_async:
        from hpcdistill.strategies.async_rma import AsyncUpdater  # imports the RMA layer: async only
        return AsyncUpdater(settings, topo, model, optimizer)
    from hpcdistill.strategies.sync import SyncUpdater
    return SyncUpdater(topo, model, optimizer)


def teachers_class(s) -> type:
    """The teacher source of a mode (its `pool` makes the summary section, on any rank)."""
    if s.mode == "codistill":
        return PeerTeachers if s.codistill_target == "peers" else LabelSmoothingControl
    return FixedTeachers if s.mode == "distill" else NoTeachers


def exchange_dir(s, run_dir: Path) -> Path | None:
    """The shared directory the mode exchanges teachers through, or None."""
    return Path(s.exchange_dir or run_dir / "exchange") if teachers_class(s) is PeerTeachers else None


def group_spec(s, group: int, kind: str | None) -> ModelSpec:
    """The model `group` trains: its HPCDISTILL_GROUP_MODELS entry, else HPCDISTILL_MODEL."""
    name, args = s.model_for_group(group)
    return resolve_model(name, args, kind=kind, variable="HPCDISTILL_GROUP_MODELS" if s.group_models else
                         "HPCDISTILL_MODEL")


def peer_records(s, kind: str, arch: dict) -> tuple[dict[int, dict | None], dict[str, str]]:
    """What each group's exchange files must hold, and the factories a peer's record may name: with
    GROUP_MODELS every group's model is known; otherwise those of this job's groups are (this job's
    model), and a group of another job (GROUP_OFFSET) may train its own: any record of an allowed factory."""
    shape, classes = arch["input_shape"], arch["num_classes"]
    own = range(s.first_group, s.first_group + s.local_group_count)
    records, factories = {}, {}
    for g in range(s.num_groups):
        if s.group_models or g in own:
            spec = group_spec(s, g, kind)
            records[g], factories[spec.factory] = spec.record(shape, classes), spec.variable
        else:
            records[g] = None
    return records, factories


def make_teachers(s, *, comm, topo, spec, arch, data_kind: str, run_dir: Path, exchange_id: str, stop,
                  writer=None):
    kind = teachers_class(s)
    if kind is PeerTeachers:
        records, factories = peer_records(s, data_kind, arch)
        return PeerTeachers(
            exchange_dir(s, run_dir), comm=comm, group=topo.group, num_groups=topo.num_groups,
            spec=spec, arch=arch, device=topo.device, max_staleness=s.max_staleness, policy=s.stale_policy,
            wait_timeout=s.stale_wait, exchange_id=exchange_id, stop=stop, exchange_every=s.exchange_every,
            burn_in=s.burn_in, data_split=s.data_split, records=records, factories=factories, k=s.num_peers,
            seed=s.seed, writer=writer, age=s.teacher_age)
    if kind is LabelSmoothingControl:
        return LabelSmoothingControl(target=s.codistill_target, data_split=s.data_split, stale_policy=s.stale_policy,
                                     exchange_id=None)
    if kind is FixedTeachers:
        return FixedTeachers(s.teacher_paths, comm=comm, device=topo.device, student_arch=arch, student=spec,
                             teacher=teacher_spec(s, data_kind),
                             settings={"temperature": s.temperature, "alpha": s.distill_weight,
                                       "loss": s.distill_loss, "omitted_classes": list(s.omitted_classes)})
    return NoTeachers()


def make_objective(s, num_classes: int, teachers) -> Objective:
    kind = {"sync": "task", "async": "task", "distill": "distill"}.get(s.mode, "codistill")
    if kind == "codistill" and s.codistill_target == "label-smoothing":
        kind = "label-smoothing"
    return Objective(s, num_classes, teachers, kind=kind)


def omitted_classes(s) -> tuple[int, ...]:
    """Classes left out of the transfer set: distillation only (Hinton et al.'s experiment)."""
    return s.omitted_classes if s.mode == "distill" else ()
