"""Checks of `hpcdistill train`'s settings against the filesystem and the user's code, before MPI starts.

`config` validates each variable on its own; these need files and imports: the dataset must exist (or
its factory import and return a proper Dataset), the model factory must import, build and map one
sample batch to `[B, num_classes]` (or `[B, T, num_classes]` for token data), the run and exchange
directories must be writable, the teacher files must exist. Every rank runs them on its own, so a
bad value fails in seconds with exit status 2 instead of after MPI and Horovod have started.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from hpcdistill.config import ConfigError
from hpcdistill.data import DataError, eval_batches, open_source
from hpcdistill.models import ModelError, resolve_model, sized_manifest
from hpcdistill.teachers import teacher_spec


def check_code(settings, *, need_data: bool = True) -> str | None:
    """The dataset and the model (and teacher model) the settings name: imported, built, one batch
    through the model. With need_data=False (`hpcdistill config`) a prepared dataset that does not
    exist yet is not an error: only the user's code is checked then. Returns the dataset's kind
    ("image", "sequence"; None when the dataset was not there)."""
    try:
        source = open_source(settings.dataset, settings.data_dir, settings.dataset_args)
    except DataError:
        if need_data or ":" in settings.dataset:
            raise
        source = None
    kind = source.kind if source else None
    # The model of every group (HPCDISTILL_GROUP_MODELS, else HPCDISTILL_MODEL): resolved (imported);
    # with the dataset, sized on the meta device (peers and teachers are) and, for this job's own
    # groups, built and run on one batch.
    own = range(settings.first_group, settings.first_group + settings.local_group_count)
    if settings.group_models:
        from hpcdistill.training.compose import group_spec

        specs = [(group_spec(settings, g, kind), g in own) for g in range(settings.num_groups)]
    elif source or settings.model:
        specs = [(resolve_model(settings.model, settings.model_args, kind=kind), True)]
    else:
        specs = []
    for spec, mine in specs if source is not None else ():
        if settings.mode in ("codistill", "distill"):
            sized_manifest(spec, source.input_shape, source.num_classes)
        if mine:
            check_output(spec.name, spec.build(source.input_shape, source.num_classes), source)
    teacher_spec(settings, source.kind if source else None)
    return source.kind if source else None


def check(settings) -> None:
    """Raise ConfigError, DataError or ModelError naming the variable and what to do."""
    check_device(settings)
    check_code(settings)
    for name, path in (("HPCDISTILL_RUN_DIR", settings.run_dir), ("HPCDISTILL_EXCHANGE_DIR", settings.exchange_dir)):
        if path is not None:
            _writable_dir(name, Path(path))
    if settings.mode == "distill":
        missing = [str(p) for p in settings.teacher_paths if not Path(p).exists()]
        if missing:
            raise ConfigError(f"HPCDISTILL_TEACHERS: no such file or directory: {', '.join(missing)}; give "
                              "checkpoint .h5 (.safetensors, .pt) files or finished run directories")


def check_device(settings) -> None:
    """HPCDISTILL_DEVICE=cuda needs a visible GPU."""
    from hpcdistill.comm.topology import cuda_visible

    if settings.device == "cuda" and not cuda_visible():
        built = torch.version.cuda
        raise ConfigError(
            "HPCDISTILL_DEVICE=cuda: no GPU is visible to this process (torch " + torch.__version__
            + (f", built for CUDA {built}" if built else ", a CPU-only build") + ", CUDA_VISIBLE_DEVICES="
            + repr(os.environ.get("CUDA_VISIBLE_DEVICES")) + "); request GPUs from Slurm (--gpus-per-node), "
            "install a CUDA build of torch (scripts/setup.sh on a GPU node), or use HPCDISTILL_DEVICE=cpu/auto")


def check_output(name: str, model: torch.nn.Module, source) -> None:
    """The model maps a batch of two training samples to logits of the dataset's classes."""
    try:
        x, y = next(eval_batches(source.dataset("train"), batch_size=2))
    except Exception as exc:  # noqa: BLE001 - the user's dataset may fail to collate
        raise DataError(f"HPCDISTILL_DATASET={source.name}: two samples do not make a batch "
                        f"({type(exc).__name__}: {exc}); samples must be tensors of one shape") from None
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:  # noqa: BLE001
        first = (str(exc).splitlines() or [""])[0]
        raise ModelError(f"HPCDISTILL_MODEL={name}: the model fails on a batch of {tuple(x.shape)} {x.dtype} "
                         f"inputs from HPCDISTILL_DATASET={source.name} ({type(exc).__name__}: {first})") from None
    want = (*y.shape, source.num_classes)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(f"HPCDISTILL_MODEL={name}: the model maps a batch of {tuple(x.shape)} to {got}, expected "
                         f"logits {want} (batch, {'tokens, ' if len(want) == 3 else ''}num_classes "
                         f"{source.num_classes} of HPCDISTILL_DATASET={source.name})")


def _writable_dir(name: str, path: Path) -> None:
    """`path` is a directory we can write, or can be created under one we can write."""
    probe = path.resolve()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{name}={path}: {probe} is a file, not a directory; choose another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{name}={path}: {probe} is not writable by this user; choose a directory you "
                          "can write (on a cluster, a path on the shared filesystem)")
