#!/usr/bin/env python
"""The plain PyTorch baseline: one process, no hpcdistill, the same model and dataset factories.

    OMP_NUM_THREADS=1 python examples/plain_torch.py --seed 0
    OMP_NUM_THREADS=1 python examples/plain_torch.py --model-args '{"width": 4, "blocks": [1]}' --json
    python examples/plain_torch.py --device cuda --steps 300 --json     # on a GPU

SGD with momentum 0.9, peak lr 0.05 reached by a linear warm-up over 20 steps, then cosine decay to
0.1x (the schedule hpcdistill uses), batch 32 from a shuffled DataLoader (reshuffled every epoch),
--steps optimizer steps (default 600); then the test split is evaluated. With --json the last
line printed is {"test_accuracy": ..., "test_loss": ..., "steps_per_second": ...}, the rate of the
steps after the first 20 (benchmarks/loop_overhead.py compares it with hpcdistill's loop).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tinyresnet, wherever this is run from


def load(spec: str):
    """'package.module:callable' -> the callable (the form HPCDISTILL_MODEL/_DATASET take)."""
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def lr_at(step: int, peak: float, warmup: int, total: int) -> float:
    """Linear warm-up to the peak, then cosine decay to a tenth of it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0))))


@torch.no_grad()
def evaluate(model, dataset, device, batch_size: int = 256) -> tuple[float, float]:
    model.eval()
    loss, correct = 0.0, 0
    for x, y in DataLoader(dataset, batch_size=batch_size):
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    return correct / len(dataset), loss / len(dataset)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tinyresnet.models:resnet", help="model factory, package.module:callable")
    p.add_argument("--model-args", default="{}", help="JSON object of keyword arguments for the model factory")
    p.add_argument("--dataset", default="tinyresnet.data:digits", help="dataset factory, package.module:callable")
    p.add_argument("--dataset-args", default="{}", help="JSON object of keyword arguments for the dataset factory")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0, help="training seed: initialisation, shuffling, augmentation")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--json", action="store_true", help="end with one JSON line of the test figures")
    a = p.parse_args(argv)

    random.seed(a.seed)
    np.random.seed(a.seed)
    torch.manual_seed(a.seed)
    dataset_factory = load(a.dataset)
    dataset_args = json.loads(a.dataset_args)
    train, test = dataset_factory("train", **dataset_args), dataset_factory("test", **dataset_args)
    x0, _ = train[0]
    device = torch.device(a.device)
    model = load(a.model)(input_shape=tuple(x0.shape), num_classes=int(train.num_classes),
                          **json.loads(a.model_args)).to(device)
    params = sum(t.numel() for t in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=a.momentum)
    loader = DataLoader(train, batch_size=a.batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(a.seed), pin_memory=device.type == "cuda")
    print(f"model {a.model} {a.model_args}: {params} parameters; train {len(train)}, test {len(test)}; "
          f"{a.steps} steps of batch {a.batch_size}", flush=True)

    start = time.perf_counter()
    steady = None  # when step 20 was done: the rate after warm-up (allocator, cuDNN autotuning)
    step, batches = 0, iter(loader)
    model.train()
    while step < a.steps:
        try:
            x, y = next(batches)
        except StopIteration:  # next epoch, reshuffled
            batches = iter(loader)
            continue
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, a.lr, a.warmup, a.steps)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 100 == 0 or step == a.steps:
            print(f"step {step}: loss {loss.item():.4f}", flush=True)
        if step == 20:
            loss.item()  # wait for the device
            steady = time.perf_counter()
    loss.item()
    train_seconds = time.perf_counter() - start
    rate = (a.steps - 20) / (time.perf_counter() - steady) if steady and a.steps > 20 else None
    acc, test_loss = evaluate(model, test, device)
    wall = time.perf_counter() - start
    print(f"test accuracy {acc:.4f}, test loss {test_loss:.4f} "
          f"(training {train_seconds:.1f} s, with evaluation {wall:.1f} s)", flush=True)
    if a.json:
        print(json.dumps({"test_accuracy": acc, "test_loss": test_loss, "steps": a.steps, "seed": a.seed,
                          "parameters": params, "wall_seconds": round(wall, 2), "steps_per_second": rate}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
