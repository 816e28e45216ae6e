"""Losses against direct NumPy computations (Hinton et al. 2015; Anil et al. 2018)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hpcdistill.losses import (
    codistill_loss,
    distillation_loss,
    hinton_loss,
    logit_matching_loss,
    smoothed_labels,
    soft_targets,
    task_loss,
)

B, N = 16, 10


def np_log_softmax(x, t=1.0):
    x = x / t
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def np_distill(z, p, t):
    return t**2 * np.mean(-(p * np_log_softmax(z, t)).sum(axis=-1))


def np_task(z, y):
    return np.mean(-np_log_softmax(z)[np.arange(len(y)), y])


def logits(seed, *shape, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def labels(seed, *shape):
    return torch.randint(0, N, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("t", [1.0, 2.0, 5.0, 20.0])
def test_distillation_and_hinton_match_numpy(t):
    z, v1, v2, y = logits(0, B, N), logits(1, B, N), logits(2, B, N), labels(3, B)
    p = np.mean([np.exp(np_log_softmax(v.numpy(), t)) for v in (v1, v2)], axis=0)

    got = distillation_loss(z, soft_targets([v1, v2], t), t)
    np.testing.assert_allclose(got.item(), np_distill(z.numpy(), p, t), rtol=1e-10)

    for alpha in (0.0, 0.3, 0.9):
        want = (1 - alpha) * np_task(z.numpy(), y.numpy()) + alpha * np_distill(z.numpy(), p, t)
        got = hinton_loss(z, y, [v1, v2], temperature=t, alpha=alpha)
        np.testing.assert_allclose(got.item(), want, rtol=1e-10)


def test_t_squared_factor():
    """Without T^2 the soft term would shrink like 1/T^2; with it, it is T^2 times the plain CE."""
    z, v = logits(0, B, N), logits(1, B, N)
    for t in (2.0, 5.0):
        plain = -(soft_targets([v], t) * F.log_softmax(z / t, -1)).sum(-1).mean()
        assert distillation_loss(z, soft_targets([v], t), t).item() == pytest.approx(t**2 * plain.item())


def test_hinton_alpha_one_ignores_labels_and_alpha_zero_ignores_teachers():
    z, v, y = logits(0, B, N), logits(1, B, N), labels(2, B)
    only_soft = hinton_loss(z, None, [v], temperature=4.0, alpha=1.0)
    assert only_soft.item() == pytest.approx(distillation_loss(z, soft_targets([v], 4.0), 4.0).item())
    assert hinton_loss(z, y, [], temperature=4.0, alpha=0.0).item() == pytest.approx(task_loss(z, y).item())
    with pytest.raises(ValueError):
        hinton_loss(z, y, [v], temperature=4.0, alpha=1.5)
    with pytest.raises(ValueError):
        distillation_loss(z, soft_targets([v], 1.0), 0.0)


def test_soft_targets_average_members_softmax():
    v1, v2 = logits(1, B, N), logits(2, B, N)
    t = 3.0
    want = (F.softmax(v1 / t, -1) + F.softmax(v2 / t, -1)) / 2
    got = soft_targets([v1, v2], t)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got.sum(-1), torch.ones(B, dtype=got.dtype))


def test_high_temperature_gradient_approaches_logit_matching():
    """d/dz_i of T^2 * mean_b CE(softmax(v/T), softmax(z/T)) is exactly T * (q_i - p_i) / B.

    For zero-mean logits, softmax(x/T)_i = 1/N + x_i / (N T) + O(1/T^2), so the gradient is
    (z_i - v_i) / (N * B) + O(1/T): the relative error to that limit shrinks like 1/T.
    """
    z, v = logits(0, B, N, scale=0.5), logits(1, B, N, scale=0.5)
    z, v = z - z.mean(-1, keepdim=True), v - v.mean(-1, keepdim=True)
    limit = (z - v) / (N * B)
    errors = []
    for t in (50.0, 100.0, 200.0):
        zz = z.clone().requires_grad_(True)
        distillation_loss(zz, soft_targets([v], t), t).backward()
        torch.testing.assert_close(zz.grad, t * (F.softmax(z / t, -1) - F.softmax(v / t, -1)) / B)
        errors.append(((zz.grad - limit).norm() / limit.norm()).item())
    assert errors[0] < 0.02
    assert errors[1] < 0.6 * errors[0] and errors[2] < 0.6 * errors[1]

    # Caruana's logit matching has gradient (z - v) / B: N times that limit.
    zz = z.clone().requires_grad_(True)
    logit_matching_loss(zz, [v]).backward()
    torch.testing.assert_close(zz.grad, limit * N)


def test_logit_matching_matches_numpy():
    z, v1, v2 = logits(0, B, N), logits(1, B, N), logits(2, B, N)
    mean_v = (v1.numpy() + v2.numpy()) / 2
    want = np.mean(0.5 * ((z.numpy() - mean_v) ** 2).sum(-1))
    assert logit_matching_loss(z, [v1, v2]).item() == pytest.approx(want, rel=1e-12)


def test_codistill_distill_term():
    z, v, y = logits(0, B, N), logits(1, B, N), labels(2, B)
    t = 2.0

    total, task, distill = codistill_loss(z, y, [v], temperature=t, alpha=0.0)
    assert distill.item() == 0.0 and total.item() == task.item() == pytest.approx(task_loss(z, y).item())
    assert codistill_loss(z, y, [], temperature=t, alpha=0.5)[2].item() == 0.0

    total, task, distill = codistill_loss(z, y, [v], temperature=t, alpha=0.5)
    assert distill.item() > 0
    assert total.item() == pytest.approx(task.item() + 0.5 * distill.item())

    # student == teacher: CE reduces to T^2 * H(p), i.e. the KL part is zero.
    _, _, distill = codistill_loss(v, y, [v], temperature=t, alpha=0.5)
    p = F.softmax(v / t, -1)
    entropy = -(p * p.log()).sum(-1).mean()
    assert distill.item() - t**2 * entropy.item() == pytest.approx(0.0, abs=1e-10)


def test_no_gradient_reaches_teachers():
    z = logits(0, B, N).requires_grad_(True)
    v = logits(1, B, N).requires_grad_(True)
    codistill_loss(z, labels(2, B), [v], temperature=2.0, alpha=1.0)[0].backward()
    assert z.grad is not None and v.grad is None


def test_sequence_shapes_are_flattened():
    L, V = 7, N
    z, v, y = logits(0, 3, L, V), logits(1, 3, L, V), labels(2, 3, L)
    zf, vf, yf = z.reshape(-1, V), v.reshape(-1, V), y.reshape(-1)
    t = 2.0
    assert task_loss(z, y).item() == pytest.approx(F.cross_entropy(zf, yf).item())
    assert distillation_loss(z, soft_targets([v], t), t).item() == pytest.approx(
        distillation_loss(zf, soft_targets([vf], t), t).item())
    assert hinton_loss(z, y, [v], temperature=t, alpha=0.5).item() == pytest.approx(
        hinton_loss(zf, yf, [vf], temperature=t, alpha=0.5).item())
    seq = codistill_loss(z, y, [v], temperature=t, alpha=0.5)
    flat = codistill_loss(zf, yf, [vf], temperature=t, alpha=0.5)
    for a, b in zip(seq, flat):
        assert a.item() == pytest.approx(b.item())
    assert logit_matching_loss(z, [v]).item() == pytest.approx(logit_matching_loss(zf, [vf]).item())
    assert smoothed_labels(y, V, 0.1).shape == (3, L, V)


def test_smoothed_labels():
    y = labels(0, B)
    s = smoothed_labels(y, N, 0.1)
    torch.testing.assert_close(s.sum(-1), torch.ones(B))
    assert s[torch.arange(B), y].allclose(torch.full((B,), 0.9 + 0.1 / N))
    assert s.min().item() == pytest.approx(0.1 / N)
    # With eps = 0 and T = 1 the distillation loss is the plain task loss.
    z = logits(1, B, N).float()
    assert distillation_loss(z, smoothed_labels(y, N, 0.0), 1.0).item() == pytest.approx(task_loss(z, y).item())


def test_task_loss_with_label_smoothing_is_cross_entropy_against_smoothed_labels():
    """HPCDISTILL_TASK_LABEL_SMOOTHING (the distillation experiments' label-smoothing student control)."""
    z, y = logits(2, B, N), labels(3, B)
    want = np.mean(-(smoothed_labels(y, N, 0.2).double().numpy() * np_log_softmax(z.numpy())).sum(-1))
    assert task_loss(z, y, 0.2).item() == pytest.approx(want, rel=1e-6)  # smoothed_labels is float32
    assert task_loss(z, y, 0.0).item() == pytest.approx(np_task(z.numpy(), y.numpy()), rel=1e-10)
