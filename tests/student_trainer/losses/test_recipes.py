"""The released recipes on a tiny multi-level example (canvas 64, strides 8/16/32)."""

import dataclasses

import numpy as np
import pytest
import torch

from detcore.assign import atss_assign, imitation_region, vlr_region
from detcore.outputs import level_anchors
from student_trainer.losses import (
    OPTIMISED_KEYS,
    BCDConfig,
    FGDConfig,
    HGDConfig,
    LDConfig,
    LossInputError,
    PointAssignment,
    assign_points,
    bcd_recipe,
    build_fgd_modules,
    build_hgd_module,
    build_imitation,
    fgd_recipe,
    hgd_recipe,
    imitation_points,
    iou_ld_loss,
    kd_kl_div,
    ld_im_recipe,
    ld_loss,
    ld_recipe,
)

STRIDES = (8, 16, 32)
SHAPES = [(8, 8), (4, 4), (2, 2)]
CANVAS = (64, 64)
K, R, B = 3, 4, 2
# Image 0: two boxes with ATSS positives on p3 only (p4 has VLR points, p5 nothing); image 1: no GT.
GT = [torch.tensor([[4.0, 4.0, 28.0, 30.0], [30.0, 20.0, 62.0, 60.0]]), torch.zeros(0, 4)]


def dense(seed, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    cls = [(torch.randn(B, K, h, w, generator=gen) * 2).requires_grad_(requires_grad) for h, w in SHAPES]
    box = [(torch.randn(B, 4 * (R + 1), h, w, generator=gen) * 2).requires_grad_(requires_grad) for h, w in SHAPES]
    return cls, box


def flat(x):
    return x.detach().permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def level_masks(assignment):
    out, start = [], 0
    for count in assignment.num_level_points:
        level = slice(start, start + count)
        out.append((assignment.assigned_gt[:, level].reshape(-1), assignment.vlr[:, level].reshape(-1)))
        start += count
    return out


def test_assign_points_is_atss_and_vlr_per_image():
    assignment = assign_points(GT, STRIDES, SHAPES)
    anchors = torch.cat(level_anchors(STRIDES, SHAPES))
    counts = [h * w for h, w in SHAPES]
    assert assignment.num_level_points == tuple(counts)
    assert torch.equal(assignment.assigned_gt[0], atss_assign(anchors, counts, GT[0]))
    assert torch.equal(assignment.vlr[0], vlr_region(anchors, counts, GT[0]))
    assert assignment.assigned_gt[1].abs().sum().item() == 0 and assignment.vlr[1].abs().sum().item() == 0
    positives = [int((a > 0).sum()) for a, _ in level_masks(assignment)]
    assert positives[0] > 0 and positives[1] == 0 and positives[2] == 0  # the example's premise


def test_ld_recipe_matches_the_per_level_formula():
    student_cls, student_box = dense(0)
    teacher_cls, teacher_box = dense(1)
    assignment = assign_points(GT, STRIDES, SHAPES)
    out = ld_recipe(student_cls, student_box, teacher_cls, teacher_box, GT, STRIDES, R)
    main = vlr = kd = 0.0
    for level, (assigned, region) in enumerate(level_masks(assignment)):
        s_cls, t_cls, s_box, t_box = (flat(x[level]) for x in (student_cls, teacher_cls, student_box, teacher_box))
        pos = assigned > 0
        if pos.any():
            quality = s_cls.sigmoid().max(dim=1).values[pos]
            rows = kd_kl_div(s_box[pos].reshape(-1, R + 1), t_box[pos].reshape(-1, R + 1), 10.0).reshape(-1, 4)
            main += 0.25 * float((rows.sum(dim=1) * quality).sum()) / 4.0
            kd += 10.0 * float(kd_kl_div(s_cls[pos], t_cls[pos], 2.0).sum()) / int(pos.sum())
        in_region = region > 0
        if in_region.any():
            rows = kd_kl_div(s_box[in_region].reshape(-1, R + 1), t_box[in_region].reshape(-1, R + 1), 10.0).reshape(-1, 4)
            vlr += 0.25 * float((rows.sum(dim=1) * region[in_region]).sum()) / 16.0
    assert vlr > 0 and main > 0 and kd > 0
    assert out["ld_main"].item() == pytest.approx(main, rel=1e-5)
    assert out["ld_vlr"].item() == pytest.approx(vlr, rel=1e-5)
    assert out["ld_kd"].item() == pytest.approx(kd, rel=1e-5)
    assert set(out) == set(OPTIMISED_KEYS["ld"])


def test_level_without_positives_adds_zero():
    student_cls, student_box = dense(2)
    teacher_cls, teacher_box = dense(3)
    before = ld_recipe(student_cls, student_box, teacher_cls, teacher_box, GT, STRIDES, R)
    bcd_before = bcd_recipe(student_cls, student_box, teacher_cls, teacher_box, GT, STRIDES, R)
    # p4 and p5 have no positives: changing their outputs changes neither main LD, KD nor BCD.
    gen = torch.Generator().manual_seed(9)
    for level in (1, 2):
        for tensors in (student_cls, student_box, teacher_cls):
            tensors[level] = torch.randn(tensors[level].shape, generator=gen) * 3
    after = ld_recipe(student_cls, student_box, teacher_cls, teacher_box, GT, STRIDES, R)
    bcd_after = bcd_recipe(student_cls, student_box, teacher_cls, teacher_box, GT, STRIDES, R)
    assert after["ld_main"].item() == pytest.approx(before["ld_main"].item(), rel=1e-6)
    assert after["ld_kd"].item() == pytest.approx(before["ld_kd"].item(), rel=1e-6)
    assert after["ld_vlr"].item() != pytest.approx(before["ld_vlr"].item(), rel=1e-3)  # p4 holds VLR points
    for key in ("bcd_cls", "bcd_iou"):
        assert bcd_after[key].item() == pytest.approx(bcd_before[key].item(), rel=1e-6)


def test_student_equal_to_teacher_gives_zero():
    cls, box = dense(4)
    out = ld_recipe(cls, box, [c.clone() for c in cls], [b.clone() for b in box], GT, STRIDES, R)
    bcd = bcd_recipe(cls, box, [c.clone() for c in cls], [b.clone() for b in box], GT, STRIDES, R)
    for value in list(out.values()) + list(bcd.values()):
        assert abs(value.item()) < 1e-5


def test_weights_scale_outputs_linearly():
    student_cls, student_box = dense(5)
    teacher_cls, teacher_box = dense(6)
    args = (student_cls, student_box, teacher_cls, teacher_box, GT, STRIDES, R)
    base = ld_recipe(*args)
    scaled = ld_recipe(*args, config=LDConfig(main_weight=0.75, vlr_weight=0.5, kd_weight=5.0))
    assert scaled["ld_main"].item() == pytest.approx(3 * base["ld_main"].item(), rel=1e-6)
    assert scaled["ld_vlr"].item() == pytest.approx(2 * base["ld_vlr"].item(), rel=1e-6)
    assert scaled["ld_kd"].item() == pytest.approx(0.5 * base["ld_kd"].item(), rel=1e-6)
    halved = ld_recipe(*args, config=LDConfig(main_avg_factor=8.0))
    assert halved["ld_main"].item() == pytest.approx(0.5 * base["ld_main"].item(), rel=1e-6)
    bcd = bcd_recipe(*args)
    bcd_scaled = bcd_recipe(*args, config=BCDConfig(cls_weight=3.0, iou_weight=2.0))
    assert bcd_scaled["bcd_cls"].item() == pytest.approx(3 * bcd["bcd_cls"].item(), rel=1e-6)
    assert bcd_scaled["bcd_iou"].item() == pytest.approx(0.5 * bcd["bcd_iou"].item(), rel=1e-6)


def test_ld_strength_per_image_does_not_depend_on_the_batch():
    """The released constant avg factors are per 2 images: a batch of the same images twice gives the same LD."""
    student_cls, student_box = dense(5)
    teacher_cls, teacher_box = dense(6)
    args = (student_cls, student_box, teacher_cls, teacher_box, GT, STRIDES, R)
    twice = tuple([torch.cat([t, t]) for t in tensors] for tensors in args[:4]) + (GT + GT, STRIDES, R)
    base, doubled = ld_recipe(*args), ld_recipe(*twice)
    for key in ("ld_main", "ld_vlr", "ld_kd"):
        assert doubled[key].item() == pytest.approx(base[key].item(), rel=1e-5)
    # 0: the constants divide the whole batch, so the doubled batch gives twice the LD
    pooled = ld_recipe(*twice, config=LDConfig(avg_factor_images=0))
    assert pooled["ld_main"].item() == pytest.approx(2 * base["ld_main"].item(), rel=1e-5)
    assert pooled["ld_vlr"].item() == pytest.approx(2 * base["ld_vlr"].item(), rel=1e-5)
    # constants meant for one image: a batch of 2 divides by twice as much
    assert ld_recipe(*args, config=LDConfig(avg_factor_images=1))["ld_main"].item() == pytest.approx(
        0.5 * base["ld_main"].item(), rel=1e-5)


def np_expected_boxes(box_logits, stride, h, w):
    """Independent decoding: point -/+ stride * E[edge] for Tensor[B, 4(R+1), h, w] -> [B*h*w, 4]."""
    logits = box_logits.detach().permute(0, 2, 3, 1).reshape(-1, 4, R + 1).numpy().astype(np.float64)
    probs = np.exp(logits) / np.exp(logits).sum(axis=2, keepdims=True)
    dist = (probs * np.arange(R + 1)).sum(axis=2) * stride
    ys, xs = np.meshgrid((np.arange(h) + 0.5) * stride, (np.arange(w) + 0.5) * stride, indexing="ij")
    px, py = np.tile(xs.reshape(-1), B), np.tile(ys.reshape(-1), B)
    return np.stack([px - dist[:, 0], py - dist[:, 1], px + dist[:, 2], py + dist[:, 3]], axis=1)


def test_bcd_recipe_matches_the_formula():
    student_cls, student_box = dense(7)
    teacher_cls, teacher_box = dense(8)
    out = bcd_recipe(student_cls, student_box, teacher_cls, teacher_box, GT, STRIDES, R)
    assignment = assign_points(GT, STRIDES, SHAPES)
    num_pos = int((assignment.assigned_gt > 0).sum())
    # Only p3 has positives; all of its locations count, over the batch's positives.
    s_cls, t_cls = flat(student_cls[0]).double(), flat(teacher_cls[0]).double()
    p_s, p_t = s_cls.sigmoid(), t_cls.sigmoid()
    bce = -(p_t * torch.log(p_s) + (1 - p_t) * torch.log(1 - p_s))
    expected_cls = float((bce * (p_t - p_s).abs()).sum()) / num_pos
    assert out["bcd_cls"].item() == pytest.approx(expected_cls, rel=1e-5)
    s_boxes = torch.tensor(np_expected_boxes(student_box[0], 8, 8, 8), dtype=torch.float32)
    t_boxes = torch.tensor(np_expected_boxes(teacher_box[0], 8, 8, 8), dtype=torch.float32)
    gap = (p_t - p_s).abs().max(dim=1).values.float()
    expected_iou = 4.0 * iou_ld_loss(s_boxes, t_boxes, gap, num_pos).item()
    assert out["bcd_iou"].item() == pytest.approx(expected_iou, rel=1e-4)


def test_precomputed_assignment_is_used():
    student_cls, student_box = dense(10)
    teacher_cls, teacher_box = dense(11)
    args = (student_cls, student_box, teacher_cls, teacher_box, GT, STRIDES, R)
    assignment = assign_points(GT, STRIDES, SHAPES)
    assert ld_recipe(*args, assignment=assignment)["ld_main"].item() == pytest.approx(ld_recipe(*args)["ld_main"].item())
    # A hand-made assignment: one positive on p5 only, no VLR. KD averages over that level's 1 positive.
    assigned = torch.zeros_like(assignment.assigned_gt)
    assigned[1, 64 + 16 + 3] = 1
    custom = PointAssignment(assigned, torch.zeros(B, 84), assignment.num_level_points)
    out = ld_recipe(*args, assignment=custom)
    s_cls, t_cls = flat(student_cls[2])[4 + 3 : 4 + 4], flat(teacher_cls[2])[4 + 3 : 4 + 4]
    s_box, t_box = flat(student_box[2])[7:8], flat(teacher_box[2])[7:8]
    quality = s_cls.sigmoid().max().item()
    assert out["ld_kd"].item() == pytest.approx(10.0 * kd_kl_div(s_cls, t_cls, 2.0).item(), rel=1e-5)
    assert out["ld_main"].item() == pytest.approx(0.25 * ld_loss(s_box, t_box, torch.tensor([quality]), 4.0).item(), rel=1e-5)
    assert out["ld_vlr"].item() == 0.0
    with pytest.raises(LossInputError, match="assignment"):
        ld_recipe(*args, assignment=PointAssignment(assigned, None, assignment.num_level_points))


def test_no_gt_gives_zero_finite_losses_with_a_graph():
    student_cls, student_box = dense(12, requires_grad=True)
    teacher_cls, teacher_box = dense(13, requires_grad=True)
    empty = [torch.zeros(0, 4), torch.zeros(0, 4)]
    out = ld_recipe(student_cls, student_box, teacher_cls, teacher_box, empty, STRIDES, R)
    out.update(bcd_recipe(student_cls, student_box, teacher_cls, teacher_box, empty, STRIDES, R))
    assert all(v.item() == 0.0 for v in out.values())
    sum(out.values()).backward()
    assert all(t.grad is not None and t.grad.abs().sum().item() == 0 for t in student_cls + student_box)
    assert all(t.grad is None for t in teacher_cls + teacher_box)


def test_gradient_reaches_only_the_student():
    student_cls, student_box = dense(14, requires_grad=True)
    teacher_cls, teacher_box = dense(15, requires_grad=True)
    args = (student_cls, student_box, teacher_cls, teacher_box, GT, STRIDES, R)
    out = ld_recipe(*args)
    out.update(bcd_recipe(*args))
    sum(out.values()).backward()
    assert all(t.grad is None for t in teacher_cls + teacher_box)
    assert student_box[0].grad.abs().sum().item() > 0 and student_cls[0].grad.abs().sum().item() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_recipes_accept_half_precision(dtype):
    student_cls, student_box = dense(16)
    teacher_cls, teacher_box = dense(17)
    args = (student_cls, student_box, teacher_cls, teacher_box, GT, STRIDES, R)
    reference = {**ld_recipe(*args), **bcd_recipe(*args)}
    half = tuple([t.to(dtype) for t in group] for group in args[:4]) + args[4:]
    out = {**ld_recipe(*half), **bcd_recipe(*half)}
    for key, value in out.items():
        assert value.dtype == torch.float32 and torch.isfinite(value), key
        assert value.item() == pytest.approx(reference[key].item(), rel=5e-2), key


def test_fgd_recipe_sums_levels():
    gen = torch.Generator().manual_seed(18)
    config = FGDConfig.for_family("gfl")
    modules = build_fgd_modules(config, student_channels=4, teacher_channels=8, num_levels=3)
    student = [torch.randn(B, 4, h, w, generator=gen, requires_grad=True) for h, w in SHAPES]
    teacher = [torch.randn(B, 8, h, w, generator=gen, requires_grad=True) for h, w in SHAPES]
    out = fgd_recipe(modules, student, teacher, GT, CANVAS)
    per_level = [m(s, t, GT, CANVAS) for m, s, t in zip(modules, student, teacher)]
    assert out["fgd"].item() == pytest.approx(sum(d["total"].item() for d in per_level), rel=1e-6)
    for key in ("fg", "bg", "mask", "relation"):
        assert out[f"fgd_{key}"].item() == pytest.approx(sum(d[key].item() for d in per_level), rel=1e-6)
        assert not out[f"fgd_{key}"].requires_grad  # logging only
    out["fgd"].backward()
    assert all(t.grad is None for t in teacher) and all(s.grad is not None for s in student)
    assert FGDConfig.for_family("fcos") == FGDConfig(temperature=0.8, alpha=1.6e-3, beta=8e-4, gamma=8e-4, lambda_=8e-6)
    with pytest.raises(LossInputError, match="one entry per level"):
        fgd_recipe(modules[:2], student, teacher, GT, CANVAS)


def test_hgd_recipe_weight_and_stages():
    gen = torch.Generator().manual_seed(19)
    config = HGDConfig(stages=("c3", "p3", "p4"))
    channels_s = {"c3": 4, "c4": 4, "p3": 4, "p4": 4}
    channels_t = {"c3": 8, "c4": 8, "p3": 8, "p4": 8}
    module = build_hgd_module(config, channels_s, channels_t)
    sizes = {"c3": (8, 8), "c4": (4, 4), "p3": (8, 8), "p4": (4, 4)}
    student = {s: torch.randn(B, 4, *hw, generator=gen) for s, hw in sizes.items()}
    teacher = {s: torch.randn(B, 8, *hw, generator=gen) for s, hw in sizes.items()}
    out = hgd_recipe(module, student, teacher, GT, CANVAS)
    doubled = hgd_recipe(module, student, teacher, GT, CANVAS, config=dataclasses.replace(config, weight=2.0))
    assert doubled["hgd"].item() == pytest.approx(2 * out["hgd"].item(), rel=1e-6)
    assert set(out) == {"hgd"} | {f"hgd_{kind}_{s}" for kind in ("imitation", "macro") for s in ("c3", "p3", "p4")}
    with pytest.raises(LossInputError, match="Missing"):
        hgd_recipe(module, {"c3": student["c3"]}, teacher, GT, CANVAS)


def test_input_errors_name_the_level():
    cls, box = dense(20)
    bad_box = list(box)
    bad_box[1] = torch.zeros(B, 4 * R, 4, 4)
    with pytest.raises(LossInputError, match=r"student_box=.*\[2, 20, 4, 4\] at stride 16.*Got Tensor\[2, 16, 4, 4\]"):
        ld_recipe(cls, bad_box, cls, box, GT, STRIDES, R)
    with pytest.raises(LossInputError, match=r"teacher_cls=.*stride 8"):
        bcd_recipe(cls, box, [c[:1] for c in cls], box, GT, STRIDES, R)
    with pytest.raises(LossInputError, match=r"gt_boxes=.*2 images"):
        ld_recipe(cls, box, cls, box, GT[:1], STRIDES, R)


def test_ld_im_recipe_weights_the_levels_sum_over_the_gt_region():
    gen = torch.Generator().manual_seed(21)
    config = LDConfig()
    module = build_imitation(config, student_channels=4, teacher_channels=8, num_levels=3)
    student = [torch.randn(B, 4, h, w, generator=gen, requires_grad=True) for h, w in SHAPES]
    teacher = [torch.randn(B, 8, h, w, generator=gen, requires_grad=True) for h, w in SHAPES]
    region = imitation_points(GT, STRIDES, SHAPES)
    anchors = torch.cat(level_anchors(STRIDES, SHAPES))
    assert torch.equal(region[0], imitation_region(anchors, GT[0])) and not region[1].any()  # image 1 has no GT
    out = ld_im_recipe(module, student, teacher, GT, STRIDES)
    per_level = module(student, teacher, region)
    assert out["ld_im"].item() == pytest.approx(2.0 * per_level.sum().item(), rel=1e-6)  # the release's weight 2
    assert [out[f"ld_im_{i}"].item() for i in range(3)] == pytest.approx(per_level.tolist(), rel=1e-6)
    assert set(OPTIMISED_KEYS["ld_im"]) == {"ld_im"} and not out["ld_im_0"].requires_grad
    halved = ld_im_recipe(module, student, teacher, GT, STRIDES, config=dataclasses.replace(config, im_weight=1.0))
    assert halved["ld_im"].item() == pytest.approx(out["ld_im"].item() / 2, rel=1e-6)
    # a precomputed region is used as given
    empty = ld_im_recipe(module, student, teacher, GT, STRIDES, region=torch.zeros_like(region))
    assert empty["ld_im"].item() == 0.0
    out["ld_im"].backward()
    assert all(t.grad is None for t in teacher) and all(s.grad is not None for s in student)
    with pytest.raises(LossInputError, match="one Tensor per level"):
        ld_im_recipe(module, student[:2], teacher, GT, STRIDES)
