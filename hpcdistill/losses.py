"""Task, distillation, logit-matching and label-smoothing losses.

Every function takes raw logits. Sequence logits (B, L, V) with targets (B, L) are flattened to
(B*L, V) rows, so "mean over samples" means mean over tokens for a language model.

Notation: z student logits, v teacher logits, T temperature, N number of classes (vocabulary).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "codistill_loss",
    "distillation_loss",
    "hinton_loss",
    "logit_matching_loss",
    "smoothed_labels",
    "soft_targets",
    "task_loss",
]


def _rows(t: Tensor) -> Tensor:
    """(..., V) -> (rows, V)."""
    return t.reshape(-1, t.shape[-1])


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")


def task_loss(logits: Tensor, y: Tensor, smoothing: float = 0.0) -> Tensor:
    """Mean cross entropy against integer labels (smoothed: (1 - smoothing) one-hot + smoothing / K)."""
    return F.cross_entropy(_rows(logits), y.reshape(-1), label_smoothing=smoothing)


def soft_targets(teacher_logits: Sequence[Tensor], temperature: float) -> Tensor:
    """Mean over teachers of softmax(v / T): an ensemble's averaged soft targets.

    Averaging probabilities, not logits, is how Hinton et al. 2015 distil an ensemble and how
    Anil et al. 2018 combine several peers. Teachers are detached: no gradient ever reaches them.
    """
    _check_temperature(temperature)
    if len(teacher_logits) == 0:
        raise ValueError("soft_targets needs at least one teacher")
    probs = [F.softmax(v.detach() / temperature, dim=-1) for v in teacher_logits]
    return torch.stack(probs).mean(dim=0)


def distillation_loss(student_logits: Tensor, teacher_probs: Tensor, temperature: float) -> Tensor:
    """T^2 * mean over samples of CE(teacher_probs, softmax(z / T)).

    The T^2 keeps the soft term's gradient magnitude independent of T (Hinton et al. 2015, sec. 2):
    d/dz = T * (softmax(z/T) - p) / rows, which tends to (z - v) / (N * rows) for large T with
    zero-mean logits. This is cross entropy, not KL: it exceeds KL by T^2 * H(p), a constant in z.
    """
    _check_temperature(temperature)
    log_q = F.log_softmax(_rows(student_logits) / temperature, dim=-1)
    return -(_rows(teacher_probs) * log_q).sum(dim=-1).mean() * temperature**2


def hinton_loss(student_logits: Tensor, y: Tensor | None, teacher_logits: Sequence[Tensor], *,
                temperature: float, alpha: float) -> Tensor:
    """(1 - alpha) * task + alpha * distillation (Hinton et al. 2015).

    alpha = 1 distils from the teachers alone (labels unused, ``y`` may be None, e.g. an unlabeled
    transfer set); alpha = 0 is plain training (teachers unused).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if alpha == 0.0:
        return task_loss(student_logits, y)
    soft = distillation_loss(student_logits, soft_targets(teacher_logits, temperature), temperature)
    if alpha == 1.0:
        return soft
    return (1.0 - alpha) * task_loss(student_logits, y) + alpha * soft


def logit_matching_loss(student_logits: Tensor, teacher_logits: Sequence[Tensor]) -> Tensor:
    """Caruana's logit regression: mean over samples of sum over classes of (z - mean_j v_j)^2 / 2.

    Its gradient is (z - v) / rows, i.e. N times the high-temperature limit of
    ``distillation_loss``'s gradient for zero-mean logits (Hinton et al. 2015, sec. 2.1).
    """
    if len(teacher_logits) == 0:
        raise ValueError("logit_matching_loss needs at least one teacher")
    target = torch.stack([v.detach() for v in teacher_logits]).mean(dim=0)
    return 0.5 * (_rows(student_logits) - _rows(target)).pow(2).sum(dim=-1).mean()


def codistill_loss(logits: Tensor, y: Tensor, peer_logits: Sequence[Tensor], *,
                   temperature: float, alpha: float) -> tuple[Tensor, Tensor, Tensor]:
    """Codistillation objective of one group (Anil et al. 2018): task + alpha * distillation.

    Peers' soft targets are averaged (``soft_targets``). With no peers yet or alpha == 0 (burn-in)
    the distill term is an exact zero and the peers are not evaluated. Returns (total, task, distill)
    with distill unweighted, for logging.
    """
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha!r}")
    task = task_loss(logits, y)
    if len(peer_logits) == 0 or alpha == 0.0:
        return task, task, logits.new_zeros(())
    distill = distillation_loss(logits, soft_targets(peer_logits, temperature), temperature)
    return task + alpha * distill, task, distill


def smoothed_labels(y: Tensor, num_classes: int, smoothing: float) -> Tensor:
    """(1 - eps) * one_hot(y) + eps / C, shape (*y.shape, C).

    The label-smoothing control of Anil et al. 2018: a soft target of the same strength as a peer's
    but carrying no information; pass it as ``teacher_probs`` to ``distillation_loss``.
    """
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"smoothing must be in [0, 1], got {smoothing!r}")
    one_hot = F.one_hot(y.long(), num_classes).float()
    return one_hot * (1.0 - smoothing) + smoothing / num_classes
