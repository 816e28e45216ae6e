"""`hpcdistill export`: a checkpoint's model weights in a format other tools read.

`safetensors` (the well-kept, pickle-free format of the Hugging Face ecosystem) carries the model
record as metadata (`hpcdistill_model`: factory, args, input shape, classes); `torch` writes a plain
`state_dict` with `torch.save`, which `torch.load(weights_only=True)` reads. Both come back into
distillation as teachers (`HPCDISTILL_TEACHERS=x.safetensors` with `HPCDISTILL_TEACHER_MODEL`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from hpcdistill.atomic import atomic_path
from hpcdistill.checkpoints import CheckpointError, CheckpointManager, model_arrays, read_h5

SUFFIX = {"safetensors": ".safetensors", "torch": ".pt"}


class ExportError(Exception):
    exit_code = 2


def _checkpoints(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ExportError(f"{path}: no such file or directory; give a checkpoint .h5 file or a run directory")
    ckdir = path / "checkpoints"
    dirs = sorted(ckdir.glob("group-*")) or [ckdir]
    found = [CheckpointManager(d).latest_valid() for d in dirs if d.is_dir()]
    found = [f[0] for f in found if f is not None]
    if not found:
        raise ExportError(f"{path}: no valid checkpoint under {ckdir}")
    return found


def export(path: Path, *, fmt: str, out: Path | None = None) -> list[Path]:
    """Write each checkpoint's model tensors; returns the files written."""
    files = _checkpoints(path)
    if out is not None and len(files) > 1 and out.suffix:
        raise ExportError(f"--out {out}: {len(files)} checkpoints to export; give a directory")
    written = []
    for f in files:
        try:
            arrays, meta = read_h5(f)
        except CheckpointError as exc:
            raise ExportError(f"cannot export: {exc}") from None
        state = {k: v.contiguous() for k, v in model_arrays(arrays).items()}
        if not state:
            raise ExportError(f"{f}: holds no model tensors")
        name = f"{f.parent.name}-{f.stem}" if f.parent.name.startswith("group-") else f.stem
        target = out if out is not None and (out.suffix and len(files) == 1) else \
            (out or f.parent) / (name + SUFFIX[fmt])
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            if fmt == "safetensors":
                from safetensors.torch import save_file

                save_file(state, str(tmp), metadata={"hpcdistill_model": json.dumps(meta.get("arch")),
                                                      "hpcdistill_step": str(meta.get("step"))})
            else:
                torch.save(state, tmp)
        written.append(target)
    return written
