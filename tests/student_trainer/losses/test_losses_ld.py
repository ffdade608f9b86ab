"""LD losses (kd_kl_div, ld_loss, kd_cls_loss) and the release's feature imitation against hand-computed values."""

import math

import numpy as np
import pytest
import torch

from student_trainer.losses import FeatureImitation, LossInputError, imitation_loss, kd_cls_loss, kd_kl_div, ld_loss


def np_kl_rows(student, teacher, temperature):
    """Independent reference: T^2 * mean_k p_k (log p_k - log q_k), row by row."""
    out = []
    for s_row, t_row in zip(np.asarray(student, dtype=np.float64), np.asarray(teacher, dtype=np.float64)):
        p = np.exp(t_row / temperature) / np.exp(t_row / temperature).sum()
        q = np.exp(s_row / temperature) / np.exp(s_row / temperature).sum()
        out.append(temperature**2 * np.mean(p * (np.log(p) - np.log(q))))
    return np.array(out)


def test_kd_kl_div_hand_case():
    student = torch.tensor([[0.0, 0.0], [1.0, 3.0]])
    teacher = torch.tensor([[0.0, math.log(3.0)], [1.0, 3.0]])
    rows = kd_kl_div(student, teacher, temperature=1.0)
    # Row 0: p = (1/4, 3/4), q = (1/2, 1/2); mean over the 2 classes.
    expected0 = 0.5 * (0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5))
    assert rows.shape == (2,)
    assert rows[0].item() == pytest.approx(expected0, rel=1e-6)
    assert rows[1].item() == pytest.approx(0.0, abs=1e-7)


def test_kd_kl_div_temperature_matches_reference():
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(6, 5, generator=gen) * 3
    teacher = torch.randn(6, 5, generator=gen) * 3
    for temperature in (1.0, 2.0, 10.0):
        rows = kd_kl_div(student, teacher, temperature)
        np.testing.assert_allclose(rows.numpy(), np_kl_rows(student, teacher, temperature), rtol=1e-5, atol=1e-8)


def test_ld_loss_hand_case_with_weight_and_avg_factor():
    gen = torch.Generator().manual_seed(1)
    reg_max = 2
    student = torch.randn(3, 4 * (reg_max + 1), generator=gen)
    teacher = torch.randn(3, 4 * (reg_max + 1), generator=gen)
    weight = torch.tensor([0.5, 0.0, 2.0])
    loss = ld_loss(student, teacher, weight=weight, avg_factor=4.0, temperature=10.0)
    rows = np_kl_rows(student.reshape(12, 3), teacher.reshape(12, 3), 10.0).reshape(3, 4)
    expected = (rows.sum(axis=1) * weight.numpy()).sum() / 4.0
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # No avg_factor: mean over the 4N weighted edge rows.
    loss_mean = ld_loss(student, teacher, weight=weight, temperature=10.0)
    assert loss_mean.item() == pytest.approx((rows * weight.numpy()[:, None]).mean(), rel=1e-5)
    # No weight: every edge row counts 1.
    assert ld_loss(student, teacher, avg_factor=2.0, temperature=10.0).item() == pytest.approx(rows.sum() / 2.0, rel=1e-5)


def test_kd_cls_loss_hand_case():
    student = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, -1.0]])
    teacher = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    weight = torch.tensor([1.0, 3.0])
    rows = np_kl_rows(student, teacher, 2.0)
    loss = kd_cls_loss(student, teacher, weight=weight, avg_factor=2, temperature=2.0)
    assert loss.item() == pytest.approx((rows[0] + 3 * rows[1]) / 2, rel=1e-5)
    assert kd_cls_loss(student, teacher, temperature=2.0).item() == pytest.approx(rows.mean(), rel=1e-5)


def test_zero_when_student_equals_teacher():
    gen = torch.Generator().manual_seed(2)
    box = torch.randn(7, 4 * 17, generator=gen) * 4
    cls = torch.randn(7, 80, generator=gen) * 4
    assert kd_kl_div(cls, cls.clone(), 2.0).abs().max().item() < 1e-6
    assert abs(ld_loss(box, box.clone(), weight=torch.rand(7, generator=gen), avg_factor=4.0).item()) < 1e-6
    assert abs(kd_cls_loss(cls, cls.clone(), avg_factor=7).item()) < 1e-6


def test_gradient_reaches_only_the_student():
    gen = torch.Generator().manual_seed(3)
    student_box = torch.randn(5, 4 * 17, generator=gen, requires_grad=True)
    teacher_box = torch.randn(5, 4 * 17, generator=gen, requires_grad=True)
    student_cls = torch.randn(5, 8, generator=gen, requires_grad=True)
    teacher_cls = torch.randn(5, 8, generator=gen, requires_grad=True)
    loss = ld_loss(student_box, teacher_box, avg_factor=4.0) + kd_cls_loss(student_cls, teacher_cls, avg_factor=5)
    loss.backward()
    assert teacher_box.grad is None and teacher_cls.grad is None
    assert student_box.grad.abs().sum().item() > 0 and student_cls.grad.abs().sum().item() > 0


def test_gradient_matches_closed_form():
    # d/ds KL(p || softmax(s / T)) * T^2 / K = T * (q - p) / K.
    student = torch.tensor([[0.3, -1.0, 2.0]], requires_grad=True)
    teacher = torch.tensor([[1.0, 0.5, -0.5]])
    temperature = 2.0
    kd_kl_div(student, teacher, temperature).sum().backward()
    p = torch.softmax(teacher / temperature, dim=1)
    q = torch.softmax(student.detach() / temperature, dim=1)
    torch.testing.assert_close(student.grad, temperature * (q - p) / 3)


def test_no_positives_is_zero_and_finite():
    empty_box = torch.zeros(0, 4 * 17, requires_grad=True)
    empty_cls = torch.zeros(0, 8, requires_grad=True)
    for avg_factor in (None, 4.0):
        loss = ld_loss(empty_box, torch.zeros(0, 4 * 17), weight=torch.zeros(0), avg_factor=avg_factor)
        assert loss.item() == 0.0
        assert kd_cls_loss(empty_cls, torch.zeros(0, 8), avg_factor=avg_factor).item() == 0.0
    assert kd_kl_div(empty_cls, torch.zeros(0, 8), 2.0).shape == (0,)
    loss.backward()
    assert empty_box.grad is not None and empty_box.grad.shape == (0, 68)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    gen = torch.Generator().manual_seed(4)
    student = torch.randn(16, 4 * 17, generator=gen) * 3
    teacher = torch.randn(16, 4 * 17, generator=gen) * 3
    weight = torch.rand(16, generator=gen)
    reference = ld_loss(student, teacher, weight=weight, avg_factor=4.0)
    student_half = student.to(dtype).requires_grad_()
    loss = ld_loss(student_half, teacher.to(dtype), weight=weight.to(dtype), avg_factor=4.0)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    # Computed in float32 on the rounded inputs; close to the float32 inputs' value.
    exact = ld_loss(student_half.detach().float(), teacher.to(dtype).float(), weight=weight.to(dtype).float(), avg_factor=4.0)
    assert loss.item() == pytest.approx(exact.item(), rel=1e-6)
    assert loss.item() == pytest.approx(reference.item(), rel=3e-2)
    loss.backward()
    assert student_half.grad.dtype == dtype and torch.isfinite(student_half.grad.float()).all()
    cls_loss = kd_cls_loss(student[:, :8].to(dtype), teacher[:, :8].to(dtype), avg_factor=16)
    assert cls_loss.dtype == torch.float32
    assert cls_loss.item() == pytest.approx(kd_cls_loss(student[:, :8], teacher[:, :8], avg_factor=16).item(), rel=3e-2)


def test_shape_errors_name_the_shapes():
    with pytest.raises(LossInputError, match=r"teacher_box_logits=.*\[3, 68\].*Got \[3, 72\]"):
        ld_loss(torch.zeros(3, 68), torch.zeros(3, 72))
    with pytest.raises(LossInputError, match=r"weight=.*Tensor\[3\].*\[12\]"):
        ld_loss(torch.zeros(3, 68), torch.zeros(3, 68), weight=torch.ones(12))
    with pytest.raises(LossInputError, match=r"4\*\(R\+1\).*\[3, 10\]"):
        ld_loss(torch.zeros(3, 10), torch.zeros(3, 10))
    with pytest.raises(LossInputError, match=r"student_logits=.*Got Tensor\[5\]"):
        kd_kl_div(torch.zeros(5), torch.zeros(5), 1.0)
    with pytest.raises(LossInputError, match="avg_factor"):
        kd_cls_loss(torch.zeros(2, 3), torch.zeros(2, 3), avg_factor=0)
    with pytest.raises(LossInputError, match="temperature"):
        kd_kl_div(torch.zeros(2, 3), torch.zeros(2, 3), 0.0)


def test_imitation_loss_is_the_mean_squared_error():
    student = torch.tensor([[1.0, 2.0], [0.0, -1.0], [3.0, 3.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, 2.0], [2.0, 1.0], [3.0, 0.0]], requires_grad=True)
    loss = imitation_loss(student, teacher)
    assert loss.item() == pytest.approx((1 + 0 + 4 + 4 + 0 + 9) / 6, rel=1e-6)
    loss.backward()
    assert teacher.grad is None and student.grad is not None
    empty = imitation_loss(torch.zeros(0, 2, requires_grad=True), torch.zeros(0, 2))
    assert empty.item() == 0.0 and empty.requires_grad
    with pytest.raises(LossInputError, match=r"imitation_loss\(teacher_feat=\) expects the shape of student_feat, \[3, 2\]"):
        imitation_loss(student, torch.zeros(3, 4))


def _per_level_reference(student, teacher, region, adapters=None, normalize="teacher_rms"):
    out, start = [], 0
    for level, (s, t) in enumerate(zip(student, teacher)):
        if adapters is not None:
            s = adapters[level](s)
        if normalize == "teacher_rms":
            scale = t.pow(2).mean().sqrt()
            s, t = s / scale, t / scale
        count = s.shape[2] * s.shape[3]
        mask = region[:, start : start + count].reshape(-1)
        start += count
        rows_s = s.permute(0, 2, 3, 1).reshape(-1, s.shape[1])[mask]
        rows_t = t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])[mask]
        out.append(((rows_s - rows_t) ** 2).mean().item() if mask.any() else 0.0)
    return out


@pytest.mark.parametrize("normalize", ["teacher_rms", "none"])
def test_feature_imitation_per_level_at_the_region(normalize):
    gen = torch.Generator().manual_seed(3)
    shapes = [(4, 4), (2, 2)]
    student = [torch.randn(2, 3, h, w, generator=gen, requires_grad=True) for h, w in shapes]
    teacher = [torch.randn(2, 5, h, w, generator=gen) * 7 for h, w in shapes]
    region = torch.zeros(2, 20, dtype=torch.bool)
    region[0, [0, 5, 17]] = True  # two points of level 0 and one of level 1, image 0
    region[1, 3] = True
    module = FeatureImitation(3, 5, 2, normalize=normalize)
    losses = module(student, teacher, region)
    expected = _per_level_reference(student, teacher, region, module.adapters, normalize)
    assert losses.tolist() == pytest.approx(expected, rel=1e-5)
    region[:, 16:] = False  # level 1 without region points: exactly 0, still in the graph
    losses = module(student, teacher, region)
    assert losses[1].item() == 0.0
    losses.sum().backward()
    assert all(p.grad is not None for p in module.parameters()) and student[0].grad is not None


def test_feature_imitation_scale_and_adapters():
    gen = torch.Generator().manual_seed(4)
    student = [torch.randn(1, 4, 3, 3, generator=gen)]
    teacher = [torch.randn(1, 4, 3, 3, generator=gen)]
    region = torch.ones(1, 9, dtype=torch.bool)
    same = FeatureImitation(4, 4, 1)
    assert same.adapters is None and list(same.parameters()) == []  # equal widths: plain imitation, as released
    # teacher_rms makes the loss independent of the features' common scale; none does not
    assert same([s * 10 for s in student], [t * 10 for t in teacher], region).item() == pytest.approx(
        same(student, teacher, region).item(), rel=1e-5)
    raw = FeatureImitation(4, 4, 1, normalize="none")
    assert raw([s * 10 for s in student], [t * 10 for t in teacher], region).item() == pytest.approx(
        100 * raw(student, teacher, region).item(), rel=1e-5)
    with pytest.raises(LossInputError, match=r"region=\) expects a BoolTensor\[1, 9\]"):
        same(student, teacher, region[:, :4])
    with pytest.raises(LossInputError, match="normalize"):
        FeatureImitation(4, 4, 1, normalize="l2")
    with pytest.raises(LossInputError, match=r"teacher_fpn=\) expects Tensor\[1, 4, 3, 3\] at level 0"):
        same(student, [torch.zeros(1, 4, 2, 2)], region)
