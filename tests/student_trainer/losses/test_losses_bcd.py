"""BCD losses (bcd_cls_loss, iou_ld_loss) against hand-computed values."""

import math

import numpy as np
import pytest
import torch

from student_trainer.losses import LossInputError, bcd_cls_loss, iou_ld_loss


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def bce(logit, target):
    p = sigmoid(logit)
    return -(target * math.log(p) + (1 - target) * math.log(1 - p))


def np_bcd_rows(student, teacher, beta):
    rows = []
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        rows.append(sum(bce(s, sigmoid(t)) * abs(sigmoid(t) - sigmoid(s)) ** beta for s, t in zip(s_row, t_row)))
    return np.array(rows)


def test_bcd_cls_hand_case():
    student = torch.tensor([[0.0, 2.0], [-1.0, 0.5]])
    teacher = torch.tensor([[1.0, -2.0], [-1.0, 3.0]])
    # Location 0, class 0: BCE(0, s(1)) = log 2 (the target does not matter at logit 0), factor |s(1) - 1/2|.
    term00 = math.log(2.0) * abs(sigmoid(1.0) - 0.5)
    rows = np_bcd_rows(student, teacher, 1.0)
    assert rows[0] == pytest.approx(term00 + bce(2.0, sigmoid(-2.0)) * abs(sigmoid(-2.0) - sigmoid(2.0)))
    weight = torch.tensor([2.0, 0.5])
    loss = bcd_cls_loss(student, teacher, weight=weight, avg_factor=3.0, beta=1.0)
    assert loss.item() == pytest.approx((2.0 * rows[0] + 0.5 * rows[1]) / 3.0, rel=1e-5)
    loss_beta2 = bcd_cls_loss(student, teacher, beta=2.0)
    assert loss_beta2.item() == pytest.approx(np_bcd_rows(student, teacher, 2.0).mean(), rel=1e-5)


def test_bcd_cls_zero_when_equal_for_positive_beta_only():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=gen) * 3
    for beta in (0.5, 1.0, 2.0):
        assert abs(bcd_cls_loss(logits, logits.clone(), avg_factor=2.0, beta=beta).item()) < 1e-6
    # d|x|^0.5/dx is infinite at 0: the gradient at an exact match is still finite (0).
    student = logits.clone().requires_grad_()
    bcd_cls_loss(student, logits, beta=0.5).backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().max().item() == 0.0
    # beta = 0 is plain BCE against the teacher's sigmoid: its entropy, not 0.
    probs = logits.sigmoid().double()
    entropy = -(probs * probs.log() + (1 - probs) * (1 - probs).log()).sum(dim=1).mean()
    assert bcd_cls_loss(logits, logits.clone(), beta=0.0).item() == pytest.approx(entropy.item(), rel=1e-5)


def test_bcd_cls_modulating_factor_keeps_its_gradient():
    s, t = 0.7, -0.4
    student = torch.tensor([[s]], requires_grad=True)
    bcd_cls_loss(student, torch.tensor([[t]]), beta=1.0).backward()
    p_t, p_s = sigmoid(t), sigmoid(s)
    # d/ds [BCE(s, p_t) * |p_t - p_s|] = (p_s - p_t)|p_t - p_s| + BCE * sign(p_s - p_t) p_s (1 - p_s).
    expected = (p_s - p_t) * abs(p_t - p_s) + bce(s, p_t) * math.copysign(1.0, p_s - p_t) * p_s * (1 - p_s)
    assert student.grad.item() == pytest.approx(expected, rel=1e-5)


def test_iou_ld_hand_case():
    student = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 4.0, 2.0]])
    teacher = torch.tensor([[1.0, 1.0, 3.0, 3.0], [2.0, 2.0, 3.0, 3.0], [0.0, 0.0, 4.0, 2.0]])
    # 1: overlap 1, union 7, enclosing 9. 2: disjoint, union 2, enclosing 9. 3: identical.
    giou = [1 / 7 - 2 / 9, 0.0 - 7 / 9, 1.0]
    weight = torch.tensor([1.0, 0.5, 3.0])
    loss = iou_ld_loss(student, teacher, weight=weight, avg_factor=2.0)
    expected = sum(w * (1 - g) for w, g in zip(weight.tolist(), giou)) / 2.0
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert iou_ld_loss(student, teacher).item() == pytest.approx(np.mean([1 - g for g in giou]), rel=1e-6)


def test_iou_ld_zero_for_identical_boxes_and_finite_for_degenerate():
    boxes = torch.tensor([[10.0, 20.0, 30.0, 60.0], [0.5, 0.5, 1.0, 4.0]])
    assert abs(iou_ld_loss(boxes, boxes.clone()).item()) < 1e-6
    point = torch.tensor([[5.0, 5.0, 5.0, 5.0]], requires_grad=True)
    loss = iou_ld_loss(point, torch.tensor([[5.0, 5.0, 5.0, 5.0]]))
    loss.backward()
    # Union and enclosure are clamped at 1e-6: GIoU = 0 - 0, loss 1, gradient finite.
    assert loss.item() == pytest.approx(1.0) and torch.isfinite(point.grad).all()


def test_gradient_reaches_only_the_student():
    gen = torch.Generator().manual_seed(1)
    student_cls = torch.randn(4, 3, generator=gen, requires_grad=True)
    teacher_cls = torch.randn(4, 3, generator=gen, requires_grad=True)
    student_boxes = (torch.rand(4, 4, generator=gen) * 10 + torch.tensor([0.0, 0.0, 12.0, 12.0])).requires_grad_()
    teacher_boxes = (torch.rand(4, 4, generator=gen) * 10 + torch.tensor([0.0, 0.0, 12.0, 12.0])).requires_grad_()
    loss = bcd_cls_loss(student_cls, teacher_cls, avg_factor=2.0) + iou_ld_loss(student_boxes, teacher_boxes, avg_factor=2.0)
    loss.backward()
    assert teacher_cls.grad is None and teacher_boxes.grad is None
    assert student_cls.grad.abs().sum().item() > 0 and student_boxes.grad.abs().sum().item() > 0


def test_empty_inputs_give_zero():
    student = torch.zeros(0, 5, requires_grad=True)
    for avg_factor in (None, 1.0):
        assert bcd_cls_loss(student, torch.zeros(0, 5), avg_factor=avg_factor).item() == 0.0
        assert iou_ld_loss(torch.zeros(0, 4), torch.zeros(0, 4), weight=torch.zeros(0), avg_factor=avg_factor).item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    gen = torch.Generator().manual_seed(2)
    student = torch.randn(32, 8, generator=gen) * 2
    teacher = torch.randn(32, 8, generator=gen) * 2
    reference = bcd_cls_loss(student, teacher, avg_factor=4.0)
    student_half = student.to(dtype).requires_grad_()
    loss = bcd_cls_loss(student_half, teacher.to(dtype), avg_factor=4.0)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert loss.item() == pytest.approx(reference.item(), rel=3e-2)
    loss.backward()
    assert student_half.grad.dtype == dtype and torch.isfinite(student_half.grad.float()).all()
    boxes_s = torch.tensor([[10.0, 12.0, 40.0, 50.0], [100.0, 80.0, 180.0, 200.0]])
    boxes_t = torch.tensor([[11.0, 10.0, 42.0, 47.0], [90.0, 85.0, 170.0, 230.0]])
    iou_half = iou_ld_loss(boxes_s.to(dtype), boxes_t.to(dtype))
    assert iou_half.dtype == torch.float32
    assert iou_half.item() == pytest.approx(iou_ld_loss(boxes_s, boxes_t).item(), rel=2e-2)


def test_input_errors():
    with pytest.raises(LossInputError, match=r"teacher_cls_logits=.*\[2, 3\].*Got \[2, 4\]"):
        bcd_cls_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(LossInputError, match=r"student_boxes=.*Got \[2, 5\]"):
        iou_ld_loss(torch.zeros(2, 5), torch.zeros(2, 5))
    with pytest.raises(LossInputError, match="beta"):
        bcd_cls_loss(torch.zeros(2, 3), torch.zeros(2, 3), beta=-1.0)
