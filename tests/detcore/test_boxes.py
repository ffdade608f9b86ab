"""Box operations against hand-computed values."""

import math

import pytest
import torch
import torchvision

from detcore.boxes import (
    box_area,
    box_centers,
    box_diou,
    box_giou_pairwise,
    box_iou,
    box_iou_aligned,
    box_overlap_diou,
)


def test_area_and_centers():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 4.0], [2.0, 2.0, 2.0, 5.0], [5.0, 5.0, 3.0, 9.0]])
    assert box_area(boxes).tolist() == [40.0, 0.0, 0.0]
    assert box_centers(boxes).tolist() == [[5.0, 2.0], [2.0, 3.5], [4.0, 7.0]]


def test_box_iou_hand_case_and_torchvision_agreement():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 15.0, 15.0]])
    b = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    iou = box_iou(a, b)
    assert iou.shape == (2, 3)
    assert iou[0, 0].item() == pytest.approx(1.0)
    assert iou[0, 1].item() == pytest.approx(50.0 / 150.0)
    assert iou[1, 0].item() == pytest.approx(25.0 / 175.0)
    assert iou[1, 1].item() == pytest.approx(50.0 / 150.0)
    assert iou[:, 2].abs().max().item() == 0.0
    torch.testing.assert_close(iou, torchvision.ops.box_iou(a, b))


def test_box_iou_degenerate_boxes_give_zero_not_nan():
    point = torch.tensor([[3.0, 3.0, 3.0, 3.0]])
    iou = box_iou(point, point)
    assert torch.isfinite(iou).all() and iou.item() == 0.0


def test_box_diou_hand_case():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    b = torch.tensor([[2.0, 0.0, 12.0, 10.0]])
    # IoU 80/120; centres 2 apart; enclosing box 12 x 10.
    expected = 80.0 / 120.0 - 4.0 / (144.0 + 100.0)
    assert box_diou(a, b).item() == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(box_diou(a, b)[0], torchvision.ops.distance_box_iou(a, b)[0], rtol=1e-5, atol=1e-6)


def test_box_overlap_diou_uses_anchor_area():
    anchor = torch.tensor([[15.0, 0.0, 25.0, 10.0]])
    gt = torch.tensor([[0.0, 0.0, 40.0, 10.0]])
    # Anchor fully inside: overlap 1; centres 20 vs 20 -> no penalty. IoU would be 0.25.
    assert box_overlap_diou(anchor, gt).item() == pytest.approx(1.0)
    assert box_diou(anchor, gt).item() == pytest.approx(0.25)
    shifted = torch.tensor([[35.0, 0.0, 45.0, 10.0]])
    expected = 50.0 / 100.0 - 20.0**2 / (45.0**2 + 10.0**2)
    assert box_overlap_diou(shifted, gt).item() == pytest.approx(expected, rel=1e-6)


def test_box_giou_pairwise_hand_case():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0], [4.0, 4.0, 6.0, 6.0]])
    giou = box_giou_pairwise(a, b, eps=0.0)
    assert giou[0].item() == pytest.approx(1.0)
    assert giou[1].item() == pytest.approx(50.0 / 150.0)  # enclosing box equals the union
    assert giou[2].item() == pytest.approx(0.0 - (36.0 - 8.0) / 36.0)
    torch.testing.assert_close(giou, torchvision.ops.generalized_box_iou(a, b).diagonal())
    assert box_iou_aligned(a, b, eps=0.0)[1].item() == pytest.approx(1.0 / 3.0)


def test_shape_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"box_iou\(b=\) expects a Tensor\[N, 4\]"):
        box_iou(torch.zeros(2, 4), torch.zeros(3))
    with pytest.raises(ValueError, match="same shape"):
        box_giou_pairwise(torch.zeros(2, 4), torch.zeros(3, 4))
    assert math.isfinite(box_giou_pairwise(torch.zeros(1, 4), torch.zeros(1, 4)).item())
