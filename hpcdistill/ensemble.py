"""How a set of models agree: the accuracy of their averaged predictions, and churn."""

from __future__ import annotations

import numpy as np


def ensemble_accuracy(probs: list[np.ndarray], labels: np.ndarray) -> float:
    """Accuracy of the averaged predicted distributions of several models."""
    return float((np.mean(probs, axis=0).argmax(-1) == labels).mean())


def churn(probs_a: np.ndarray, probs_b: np.ndarray) -> float:
    """Fraction of inputs on which two models' top predictions differ (Anil et al. 2018, 3.5)."""
    return float((probs_a.argmax(-1) != probs_b.argmax(-1)).mean())


def mean_pairwise_churn(probs: list[np.ndarray]) -> float:
    pairs = [(i, j) for i in range(len(probs)) for j in range(i + 1, len(probs))]
    return float(np.mean([churn(probs[i], probs[j]) for i, j in pairs])) if pairs else 0.0
