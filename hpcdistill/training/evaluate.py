"""Evaluation over a split, sharded across the ranks that train, plus ensemble accuracy and churn."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from hpcdistill.data import eval_batches


def _flat(logits: torch.Tensor, y: torch.Tensor):
    return logits.reshape(-1, logits.shape[-1]), y.reshape(-1)


@torch.no_grad()
def evaluate(model, path, *, batch_size: int, device, comm=None) -> dict:
    """Mean loss and accuracy over the split; each rank of `comm` takes its own slice, sums are reduced."""
    was_training = model.training
    model.eval()
    rank, size = (comm.Get_rank(), comm.Get_size()) if comm is not None else (0, 1)
    sums = np.zeros(3)  # loss sum, correct, count
    for x, y in eval_batches(path, batch_size=batch_size, rank=rank, size=size):
        logits, target = _flat(model(x.to(device)), y.to(device))
        sums += [F.cross_entropy(logits, target, reduction="sum").item(),
                 (logits.argmax(-1) == target).sum().item(), target.numel()]
    if comm is not None:
        from mpi4py import MPI
        comm.Allreduce(MPI.IN_PLACE, sums, op=MPI.SUM)
    model.train(was_training)
    return {"loss": sums[0] / max(sums[2], 1), "accuracy": sums[1] / max(sums[2], 1)}


@torch.no_grad()
def predict_probs(model, path, *, batch_size: int, device, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Softmax outputs and labels over the first `limit` samples of a split (flattened per token)."""
    was_training = model.training
    model.eval()
    probs, labels, seen = [], [], 0
    for x, y in eval_batches(path, batch_size=batch_size):
        logits, target = _flat(model(x.to(device)), y.to(device))
        probs.append(F.softmax(logits.float(), -1).cpu().numpy())
        labels.append(target.cpu().numpy())
        seen += x.shape[0]
        if limit is not None and seen >= limit:
            break
    model.train(was_training)
    return np.concatenate(probs), np.concatenate(labels)


def ensemble_accuracy(probs: list[np.ndarray], labels: np.ndarray) -> float:
    """Accuracy of the averaged predicted distributions of several models."""
    return float((np.mean(probs, axis=0).argmax(-1) == labels).mean())


def churn(probs_a: np.ndarray, probs_b: np.ndarray) -> float:
    """Fraction of inputs on which two models' top predictions differ (Anil et al. 2018, 3.5)."""
    return float((probs_a.argmax(-1) != probs_b.argmax(-1)).mean())


def mean_pairwise_churn(probs: list[np.ndarray]) -> float:
    pairs = [(i, j) for i in range(len(probs)) for j in range(i + 1, len(probs))]
    return float(np.mean([churn(probs[i], probs[j]) for i, j in pairs])) if pairs else 0.0
