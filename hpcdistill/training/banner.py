"""The block a job's log starts with: what is running, where, on what (one per group, its speaker)."""

from __future__ import annotations

import os

import torch

from hpcdistill import __version__
from hpcdistill.comm.horovod_env import effective, latency_patched
from hpcdistill.models import count_parameters

OTHER_HOROVOD_KNOBS = ("HOROVOD_GPU_OPERATIONS", "HOROVOD_CPU_OPERATIONS", "HOROVOD_HIERARCHICAL_ALLREDUCE")
MODE_SETTINGS = {  # the settings worth a line in each mode's banner
    "codistill": ("groups", "group_mode", "exchange_dir", "exchange_every", "max_staleness", "stale_policy",
                  "burn_in", "distill_weight", "temperature", "codistill_target", "data_split"),
    "async": ("async_rule", "dc_lambda", "param_hosts", "staleness_bound", "async_lr"),
    "distill": ("teachers", "teacher_model", "distill_weight", "temperature", "distill_loss", "omit_classes"),
    "sync": (),
}


def banner(s, topo, comm, spec, model, data, run_id: str, run_dir) -> str:
    device = topo.device
    where = (f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
             f"cpu, {torch.get_num_threads()} thread(s)")
    knobs = [f"{r['variable']}={r['value']} ({r['source']})" for r in effective()]
    knobs += [f"{k}={os.environ[k]} (environment)" for k in OTHER_HOROVOD_KNOBS if k in os.environ]
    mode = [f"{k}={getattr(s, k)}" for k in MODE_SETTINGS.get(s.mode, ()) if getattr(s, k) is not None]
    if s.group_mode == "async" and s.mode == "codistill":
        mode += [f"{k}={getattr(s, k)}" for k in MODE_SETTINGS["async"] if getattr(s, k) is not None]
    lines = [
        f"hpcdistill {__version__}, torch {torch.__version__}, mode {s.mode}, run {run_id} in {run_dir}",
        f"world {topo.size} rank(s), {topo.num_groups} group(s); this group {topo.group}: world ranks "
        f"{topo.group_ranks}, {comm.Get_size()} training; device {where}",
        f"model {spec.name} ({spec.factory}, args {spec.args}): {count_parameters(model):,} parameters",
        f"dataset {data.name}: {data.kind}, {data.num_classes} classes, input {tuple(data.input_shape)}, "
        f"train/val/test {data.sizes['train']}/{data.sizes['val']}/{data.sizes['test']}",
        f"steps {s.steps}, batch {s.batch_size} per rank, seed {s.seed}, loader workers {s.loader_workers}, "
        f"precision {s.precision} (HPCDISTILL_DEVICE={s.device})"
        + (f"; {', '.join(mode)}" if mode else ""),
        f"Horovod ({'with' if latency_patched() else 'without'} the latency patch): " + ", ".join(knobs)
        + ("" if not s.uses_async or s.mode == "codistill" else " (not used: async)"),
    ]
    return "\n    ".join(["start:"] + lines)
