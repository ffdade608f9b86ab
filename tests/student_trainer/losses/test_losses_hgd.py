"""HGDLoss (this project's interpretation) against hand-computed values."""

import numpy as np
import pytest
import torch

from student_trainer.losses import HGDLoss, LossInputError, fgd_masks

CANVAS = (32, 32)


def np_stage_loss(adapted, teacher, gt_boxes, background_weight, eps=1e-6):
    """Reference of L_s: RMS-normalise across channels, squared error averaged over channels, micro-weighted mean."""
    a = np.asarray(adapted, dtype=np.float64)
    t = np.asarray(teacher, dtype=np.float64)
    na = a / np.sqrt((a**2).mean(axis=1, keepdims=True) + eps)
    nt = t / np.sqrt((t**2).mean(axis=1, keepdims=True) + eps)
    per_location = ((na - nt) ** 2).mean(axis=1)
    fg, bg = (m.numpy().astype(np.float64) for m in fgd_masks(gt_boxes, CANVAS, t.shape[2], t.shape[3]))
    micro = fg + background_weight * bg
    per_image = (micro * per_location).sum(axis=(1, 2)) / micro.sum(axis=(1, 2))
    return per_image.mean()


def make_inputs(seed, student_channels, teacher_channels, sizes, batch=2):
    gen = torch.Generator().manual_seed(seed)
    student = {s: torch.randn(batch, student_channels[s], *sizes[s], generator=gen) for s in sizes}
    teacher = {s: torch.randn(batch, teacher_channels[s], *sizes[s], generator=gen) for s in sizes}
    return student, teacher


GT = [torch.tensor([[0.0, 0.0, 12.0, 9.0], [20.0, 16.0, 31.0, 31.0]]), torch.zeros(0, 4)]


def test_hand_case_two_stages():
    channels_s, channels_t = {"c3": 3, "p3": 4}, {"c3": 4, "p3": 4}
    sizes = {"c3": (4, 4), "p3": (2, 2)}
    student, teacher = make_inputs(0, channels_s, channels_t, sizes)
    module = HGDLoss(channels_s, channels_t, background_weight=0.25, macro_power=1.0)
    out = module(student, teacher, GT, CANVAS)
    losses = {}
    for stage in ("c3", "p3"):
        adapter = module.adapters[stage]
        weight = adapter.weight.detach().numpy()[:, :, 0, 0]
        bias = adapter.bias.detach().numpy()
        adapted = np.einsum("oc,bchw->bohw", weight, student[stage].numpy()) + bias[None, :, None, None]
        losses[stage] = np_stage_loss(adapted, teacher[stage].numpy(), GT, 0.25)
        assert out[f"imitation_{stage}"].item() == pytest.approx(losses[stage], rel=1e-5)
    macro = {s: 2 * losses[s] / (losses["c3"] + losses["p3"]) for s in losses}
    for stage in losses:
        assert out[f"macro_{stage}"].item() == pytest.approx(macro[stage], rel=1e-5)
    expected_total = sum(macro[s] * losses[s] for s in losses)
    assert out["total"].item() == pytest.approx(expected_total, rel=1e-5)


def test_macro_weights_sum_to_stage_count_and_power_zero_is_uniform():
    channels = {"c3": 4, "c4": 4, "p5": 4}
    sizes = {"c3": (4, 4), "c4": (2, 2), "p5": (1, 1)}
    student, teacher = make_inputs(1, channels, channels, sizes)
    out = HGDLoss(channels, channels)(student, teacher, GT, CANVAS)
    assert sum(out[f"macro_{s}"].item() for s in channels) == pytest.approx(3.0, rel=1e-6)
    uniform = HGDLoss(channels, channels, macro_power=0.0)(student, teacher, GT, CANVAS)
    assert [uniform[f"macro_{s}"].item() for s in channels] == pytest.approx([1.0, 1.0, 1.0])
    assert uniform["total"].item() == pytest.approx(sum(out[f"imitation_{s}"].item() for s in channels), rel=1e-6)


def test_zero_when_student_equals_teacher_and_scale_invariant():
    channels = {"c3": 4, "p3": 4}
    sizes = {"c3": (4, 4), "p3": (4, 4)}
    _, teacher = make_inputs(2, channels, channels, sizes)
    module = HGDLoss(channels, channels)  # equal channels: identity adapters
    out = module({s: t.clone() for s, t in teacher.items()}, teacher, GT, CANVAS)
    assert abs(out["total"].item()) < 1e-6
    assert [out["macro_c3"].item(), out["macro_p3"].item()] == [1.0, 1.0]
    # The student imitates directions across channels: a positive rescaling costs nothing.
    out = module({s: 7.0 * t for s, t in teacher.items()}, teacher, GT, CANVAS)
    assert abs(out["total"].item()) < 1e-6


def test_micro_weights_emphasise_objects_over_background():
    channels = {"p3": 4}
    gen = torch.Generator().manual_seed(3)
    teacher = {"p3": torch.randn(1, 4, 4, 4, generator=gen)}
    gt = [torch.tensor([[0.0, 0.0, 7.0, 7.0]])]  # cells 0..ceil(7 * 4 / 32) = 1 in x and y: 4 cells of 1/4
    module = HGDLoss(channels, channels, background_weight=0.5)
    errors = {}
    for name, (row, col) in {"object": (0, 0), "background": (3, 3)}.items():
        student = teacher["p3"].clone()
        student[0, :, row, col] = -student[0, :, row, col]  # opposite direction: l = 4 at that cell
        errors[name] = module({"p3": student}, teacher, gt, CANVAS)["imitation_p3"].item()
    # Mass: object 4 cells x 1/4 = 1, background 0.5 over 12 cells.
    assert errors["object"] == pytest.approx(4 * 0.25 / 1.5, rel=1e-5)
    assert errors["background"] == pytest.approx(4 * (0.5 / 12) / 1.5, rel=1e-5)


def test_spatial_correspondence_resizes_the_student():
    channels_s, channels_t = {"c5": 2}, {"c5": 4}
    gen = torch.Generator().manual_seed(4)
    student = {"c5": torch.randn(2, 2, 2, 2, generator=gen, requires_grad=True)}
    teacher = {"c5": torch.randn(2, 4, 4, 4, generator=gen)}
    module = HGDLoss(channels_s, channels_t)
    out = module(student, teacher, GT, CANVAS)
    adapted = torch.nn.functional.interpolate(module.adapters["c5"](student["c5"]), size=(4, 4), mode="bilinear")
    expected = np_stage_loss(adapted.detach().numpy(), teacher["c5"].numpy(), GT, 0.5)
    assert out["total"].item() == pytest.approx(expected, rel=1e-5)


def test_gradient_reaches_the_student_and_the_adapters_only():
    channels_s, channels_t = {"c3": 3, "p3": 4}, {"c3": 4, "p3": 4}
    sizes = {"c3": (4, 4), "p3": (2, 2)}
    student, teacher = make_inputs(5, channels_s, channels_t, sizes)
    for t in list(student.values()) + list(teacher.values()):
        t.requires_grad_()
    module = HGDLoss(channels_s, channels_t)
    module(student, teacher, GT, CANVAS)["total"].backward()
    assert all(t.grad is None for t in teacher.values())
    assert all(t.grad.abs().sum().item() > 0 for t in student.values())
    assert all(a.weight.grad.abs().sum().item() > 0 for a in module.adapters.values())


def test_empty_gt_is_the_plain_mean():
    channels = {"p4": 4}
    student, teacher = make_inputs(6, channels, channels, {"p4": (3, 3)})
    empty = [torch.zeros(0, 4), torch.zeros(0, 4)]
    out = HGDLoss(channels, channels)(student, teacher, empty, CANVAS)
    s, t = student["p4"].numpy().astype(np.float64), teacher["p4"].numpy().astype(np.float64)
    ns = s / np.sqrt((s**2).mean(axis=1, keepdims=True) + 1e-6)
    nt = t / np.sqrt((t**2).mean(axis=1, keepdims=True) + 1e-6)
    assert out["imitation_p4"].item() == pytest.approx(((ns - nt) ** 2).mean(), rel=1e-5)
    # Without background weight and without GT there is no mass: finite 0, not NaN.
    out = HGDLoss(channels, channels, background_weight=0.0)(student, teacher, empty, CANVAS)
    assert out["total"].item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    channels_s, channels_t = {"c3": 8, "p3": 16}, {"c3": 16, "p3": 16}
    sizes = {"c3": (6, 6), "p3": (6, 6)}
    student, teacher = make_inputs(7, channels_s, channels_t, sizes)
    module = HGDLoss(channels_s, channels_t)
    reference = module(student, teacher, GT, CANVAS)
    student_half = {s: t.to(dtype).requires_grad_() for s, t in student.items()}
    out = module(student_half, {s: t.to(dtype) for s, t in teacher.items()}, GT, CANVAS)
    for key, value in out.items():
        assert value.dtype == torch.float32 and torch.isfinite(value), key
        assert value.item() == pytest.approx(reference[key].item(), rel=3e-2), key
    out["total"].backward()
    assert all(t.grad.dtype == dtype and torch.isfinite(t.grad.float()).all() for t in student_half.values())


def test_input_errors():
    with pytest.raises(LossInputError, match="stage names"):
        HGDLoss({"c3": 4}, {"c4": 4})
    module = HGDLoss({"c3": 4}, {"c3": 8})
    with pytest.raises(LossInputError, match=r"stages \['c3'\]. Got \['c4'\]"):
        module({"c4": torch.zeros(1, 4, 2, 2)}, {"c3": torch.zeros(1, 8, 2, 2)}, [torch.zeros(0, 4)], CANVAS)
    with pytest.raises(LossInputError, match=r"teacher_feats=.*\[1, 8, H, W\] for stage c3. Got Tensor\[1, 4, 2, 2\]"):
        module({"c3": torch.zeros(1, 4, 2, 2)}, {"c3": torch.zeros(1, 4, 2, 2)}, [torch.zeros(0, 4)], CANVAS)
