"""GFL losses against hand-computed values."""

import math

import pytest
import torch

from detcore.det_losses import distribution_focal_loss, giou_loss, quality_focal_loss


def test_qfl_hand_case():
    logits = torch.tensor([[0.0, 2.0], [0.0, -50.0]])
    targets = torch.tensor([[0.5, 0.0], [1.0, 0.0]])
    loss = quality_focal_loss(logits, targets)
    sig2 = 1.0 / (1.0 + math.exp(-2.0))
    # Row 0: class 0 predicts its quality exactly (modulator 0); class 1 is a negative.
    expected0 = math.log(1.0 + math.exp(2.0)) * sig2**2
    # Row 1: BCE(0, 1) = log 2, modulator (1 - 0.5)^2; class 1 is ~0.
    expected1 = math.log(2.0) * 0.25
    assert loss.tolist() == pytest.approx([expected0, expected1], rel=1e-5)


def test_qfl_gradient_and_zero_when_exact():
    logits = torch.tensor([[-30.0, 30.0]], requires_grad=True)
    targets = torch.tensor([[0.0, 1.0]])
    loss = quality_focal_loss(logits, targets)
    assert loss.item() < 1e-12
    loss.sum().backward()
    assert logits.grad.abs().max().item() < 1e-12
    with pytest.raises(ValueError, match="quality_focal_loss"):
        quality_focal_loss(torch.zeros(2, 3), torch.zeros(2, 4))


def test_dfl_hand_case():
    # R = 2, probabilities (1/5, 3/5, 1/5); target 0.5 splits evenly between bins 0 and 1.
    logits = torch.tensor([[0.0, math.log(3.0), 0.0], [0.0, math.log(3.0), 0.0], [0.0, 0.0, 0.0]])
    targets = torch.tensor([0.5, 1.0, 1.25])
    loss = distribution_focal_loss(logits, targets)
    expected = [0.5 * -math.log(0.2) + 0.5 * -math.log(0.6), -math.log(0.6), math.log(3.0)]
    assert loss.tolist() == pytest.approx(expected, rel=1e-5)


def test_dfl_rejects_out_of_range_targets():
    with pytest.raises(ValueError, match=r"values in \[0, 2\)"):
        distribution_focal_loss(torch.zeros(1, 3), torch.tensor([2.0]))
    with pytest.raises(ValueError, match="Tensor\\[N, R \\+ 1\\]"):
        distribution_focal_loss(torch.zeros(2, 3), torch.zeros(3))


def test_giou_loss_hand_case():
    pred = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 2.0, 2.0]])
    target = torch.tensor([[0.0, 0.0, 10.0, 10.0], [4.0, 4.0, 6.0, 6.0]])
    loss = giou_loss(pred, target, eps=0.0)
    assert loss.tolist() == pytest.approx([0.0, 1.0 + 28.0 / 36.0], abs=1e-6)
