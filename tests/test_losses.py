"""Noisy Student targets and loss on small hand-made tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.losses import dense_targets, noisy_student_loss, soft_cross_entropy

INDEX = torch.tensor([[2, 0, 4], [1, 3, 0]])  # (B=2, k=3)
PROB = torch.tensor([[0.6, 0.2, 0.1], [0.5, 0.3, 0.05]])  # top-k mass below 1, like a real teacher


def test_dense_targets_renormalise_teacher_probs_at_t1():
    t = dense_targets(INDEX, PROB, num_classes=5)
    assert t.shape == (2, 5) and t.dtype == torch.float32
    torch.testing.assert_close(t.sum(dim=1), torch.ones(2))
    torch.testing.assert_close(t[0], torch.tensor([0.2, 0.0, 0.6, 0.0, 0.1]) / 0.9)
    torch.testing.assert_close(t[1], torch.tensor([0.05, 0.5, 0.0, 0.3, 0.0]) / 0.85)


def test_dense_targets_accept_float16_probs():
    t = dense_targets(INDEX.int(), PROB.half(), num_classes=5)
    assert t.dtype == torch.float32
    torch.testing.assert_close(t.sum(dim=1), torch.ones(2))


@pytest.mark.parametrize("temperature", [0.5, 0.25, 2.0])
def test_temperature_matches_manual_power(temperature):
    t = dense_targets(INDEX, PROB, num_classes=5, temperature=temperature)
    powered = PROB ** (1.0 / temperature)
    manual = torch.zeros(2, 5).scatter_(1, INDEX, powered / powered.sum(dim=1, keepdim=True))
    torch.testing.assert_close(t, manual)


def test_low_temperature_sharpens():
    base = dense_targets(INDEX, PROB, 5, temperature=1.0)
    sharp = dense_targets(INDEX, PROB, 5, temperature=0.5)
    flat = dense_targets(INDEX, PROB, 5, temperature=2.0)
    top = base.argmax(dim=1)
    rows = torch.arange(2)
    assert torch.all(sharp[rows, top] > base[rows, top])
    assert torch.all(flat[rows, top] < base[rows, top])


def test_tiny_temperature_does_not_underflow_to_nan():
    t = dense_targets(INDEX, PROB, 5, temperature=1e-3)
    assert torch.isfinite(t).all()
    torch.testing.assert_close(t, F.one_hot(torch.tensor([2, 1]), 5).float())


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_hard_targets_are_one_hot_of_argmax(temperature):
    prob = torch.tensor([[0.2, 0.7, 0.1], [0.5, 0.3, 0.05]])  # argmax not in column 0 for row 0
    t = dense_targets(INDEX, prob, 5, temperature=temperature)
    torch.testing.assert_close(t, F.one_hot(torch.tensor([0, 1]), 5).float())


def test_zero_probability_entries_stay_zero():
    t = dense_targets(torch.tensor([[0, 1]]), torch.tensor([[1.0, 0.0]]), 3, temperature=0.5)
    torch.testing.assert_close(t, torch.tensor([[1.0, 0.0, 0.0]]))


def test_mismatched_topk_shapes_are_an_error():
    with pytest.raises(ValueError, match="topk_index"):
        dense_targets(INDEX, PROB[:, :2], 5)


def test_soft_ce_equals_cross_entropy_for_one_hot_targets():
    torch.manual_seed(0)
    logits = torch.randn(4, 6)
    labels = torch.tensor([0, 5, 2, 2])
    torch.testing.assert_close(
        soft_cross_entropy(logits, F.one_hot(labels, 6).float()), F.cross_entropy(logits, labels)
    )


def test_soft_ce_equals_cross_entropy_with_probability_targets():
    torch.manual_seed(1)
    logits = torch.randn(4, 6)
    targets = torch.softmax(torch.randn(4, 6), dim=1)
    torch.testing.assert_close(
        soft_cross_entropy(logits, targets), F.cross_entropy(logits, targets)
    )


def test_soft_ce_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # softmax = [0.25, 0.75]
    targets = torch.tensor([[0.5, 0.5]])
    expected = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    assert soft_cross_entropy(logits, targets).item() == pytest.approx(expected)


def test_soft_ce_runs_in_float32_for_half_logits():
    logits = torch.randn(3, 4).bfloat16()
    out = soft_cross_entropy(logits, torch.full((3, 4), 0.25))
    assert out.dtype == torch.float32


def test_noisy_student_loss_equals_hand_computed_sum():
    torch.manual_seed(2)
    labeled = torch.randn(3, 5)
    labels = torch.tensor([1, 4, 0])
    pseudo = torch.randn(6, 5)
    targets = dense_targets(torch.randint(0, 5, (6, 1)), torch.ones(6, 1), 5)
    loss, labeled_loss, pseudo_loss = noisy_student_loss(labeled, labels, pseudo, targets,
                                                         unlabel_ratio=3.0)

    smoothed = F.one_hot(labels, 5).float() * 0.9 + 0.1 / 5
    labeled_ce = -(smoothed * F.log_softmax(labeled, dim=1)).sum(dim=1).mean()
    pseudo_ce = -(targets * F.log_softmax(pseudo, dim=1)).sum(dim=1).mean()
    torch.testing.assert_close(loss, labeled_ce + 3.0 * pseudo_ce)
    assert labeled_loss.item() == pytest.approx(labeled_ce.item(), rel=1e-5)
    assert pseudo_loss.item() == pytest.approx(pseudo_ce.item(), rel=1e-5)
    assert labeled_loss.dim() == 0 and pseudo_loss.dim() == 0  # summable on the device


def test_label_smoothing_zero_is_plain_cross_entropy():
    labeled = torch.randn(3, 5)
    labels = torch.tensor([1, 4, 0])
    loss, _, _ = noisy_student_loss(
        labeled, labels, torch.empty(0, 5), torch.empty(0, 5), label_smoothing=0.0
    )
    torch.testing.assert_close(loss, F.cross_entropy(labeled, labels))


def test_gradients_flow_to_both_batches():
    labeled = torch.randn(2, 4, requires_grad=True)
    pseudo = torch.randn(5, 4, requires_grad=True)
    targets = torch.softmax(torch.randn(5, 4), dim=1)
    loss, _, _ = noisy_student_loss(labeled, torch.tensor([0, 3]), pseudo, targets)
    loss.backward()
    assert labeled.grad is not None and labeled.grad.abs().sum() > 0
    assert pseudo.grad is not None and pseudo.grad.abs().sum() > 0


def test_empty_pseudo_batch_gives_labeled_loss_only():
    labeled = torch.randn(2, 4, requires_grad=True)
    labels = torch.tensor([0, 3])
    pseudo = torch.empty(0, 4, requires_grad=True)
    loss, _, pseudo_loss = noisy_student_loss(labeled, labels, pseudo, torch.empty(0, 4),
                                              unlabel_ratio=3.0)
    torch.testing.assert_close(loss, F.cross_entropy(labeled, labels, label_smoothing=0.1))
    assert pseudo_loss.item() == 0.0
    assert math.isfinite(loss.item())
    loss.backward()
    assert torch.isfinite(labeled.grad).all()
