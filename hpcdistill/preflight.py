"""Checks of `hpcdistill train`'s settings against the filesystem, before MPI starts.

`config` validates each variable on its own; these need files: the dataset must exist, the model
must fit it, the run and exchange directories must be writable, the teacher files must exist. Every
rank runs them on its own (a few stats and one HDF5 attribute read), so a bad value fails in a
second with exit status 2 instead of after MPI and Horovod have started.
"""

from __future__ import annotations

import os
from pathlib import Path

from hpcdistill.config import ConfigError
from hpcdistill.data import dataset_info
from hpcdistill.models import arch_for, default_model


def check(settings) -> None:
    """Raise ConfigError, DataError or ModelError naming the variable and what to do."""
    info = dataset_info(settings.data_dir, settings.dataset, verify=False)
    arch_for(settings.model or default_model(info.kind), kind=info.kind, input_shape=info.input_shape,
             num_classes=info.num_classes)
    for name, path in (("HPCDISTILL_RUN_DIR", settings.run_dir), ("HPCDISTILL_EXCHANGE_DIR", settings.exchange_dir)):
        if path is not None:
            _writable_dir(name, Path(path))
    if settings.mode == "distill":
        missing = [str(p) for p in settings.teacher_paths if not Path(p).exists()]
        if missing:
            raise ConfigError(f"HPCDISTILL_TEACHERS: no such file or directory: {', '.join(missing)}; give "
                              "checkpoint .h5 files or finished run directories")


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
