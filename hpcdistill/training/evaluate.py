"""Evaluation over a split, sharded across the ranks that train, plus ensemble accuracy and churn."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from hpcdistill.data import eval_batches


def _flat(logits: torch.Tensor, y: torch.Tensor):
    return logits.reshape(-1, logits.shape[-1]), y.reshape(-1)


@torch.no_grad()
def evaluate(model, dataset, *, batch_size: int, device, comm=None, workers: int = 0) -> dict:
    """Mean loss and accuracy over the split; each rank of `comm` takes its own slice, sums are reduced."""
    was_training = model.training
    model.eval()
    rank, size = (comm.Get_rank(), comm.Get_size()) if comm is not None else (0, 1)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count: one host sync
    for x, y in eval_batches(dataset, batch_size=batch_size, rank=rank, size=size, workers=workers):
        logits, target = _flat(model(x.to(device)), y.to(device))
        sums += torch.stack([F.cross_entropy(logits.float(), target, reduction="sum").double(),
                             (logits.argmax(-1) == target).sum().double(),
                             torch.tensor(float(target.numel()), dtype=torch.float64, device=device)])
    sums = sums.cpu().numpy()
    if comm is not None:
        from mpi4py import MPI
        comm.Allreduce(MPI.IN_PLACE, sums, op=MPI.SUM)
    model.train(was_training)
    return {"loss": sums[0] / max(sums[2], 1), "accuracy": sums[1] / max(sums[2], 1)}


@torch.no_grad()
def predict_probs(model, dataset, *, batch_size: int, device,
                  limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Softmax outputs and labels over the first `limit` samples of a split (flattened per token)."""
    was_training = model.training
    model.eval()
    probs, labels = [], []
    for x, y in eval_batches(dataset, batch_size=batch_size, limit=limit):
        logits, target = _flat(model(x.to(device)), y.to(device))
        probs.append(F.softmax(logits.float(), -1).cpu().numpy())
        labels.append(target.cpu().numpy())
    model.train(was_training)
    return np.concatenate(probs), np.concatenate(labels)
