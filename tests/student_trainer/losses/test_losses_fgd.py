"""FGD (fgd_attention, fgd_masks, GcBlock, FGDLoss) against hand-computed values."""

import math

import numpy as np
import pytest
import torch

from student_trainer.losses import FGD_DEFAULTS, FGDLoss, GcBlock, LossInputError, fgd_attention, fgd_masks


def loop_masks(gt_boxes, canvas_hw, H, W):
    """The released per-box loop (with explicit clipping), as the reference of the vectorised masks."""
    foreground = np.zeros((len(gt_boxes), H, W))
    background = np.zeros((len(gt_boxes), H, W))
    for i, boxes in enumerate(gt_boxes):
        for x1, y1, x2, y2 in boxes.tolist():
            c1, c2 = math.floor(x1 * W / canvas_hw[1]), math.ceil(x2 * W / canvas_hw[1])
            r1, r2 = math.floor(y1 * H / canvas_hw[0]), math.ceil(y2 * H / canvas_hw[0])
            value = 1.0 / ((r2 - r1 + 1) * (c2 - c1 + 1))
            for r in range(max(r1, 0), min(r2, H - 1) + 1):
                for c in range(max(c1, 0), min(c2, W - 1) + 1):
                    foreground[i, r, c] = max(foreground[i, r, c], value)
        empty = foreground[i] == 0
        if empty.sum():
            background[i] = empty / empty.sum()
    return foreground, background


def np_attention(feat, temperature):
    feat = np.abs(np.asarray(feat, dtype=np.float64))
    b, c, h, w = feat.shape
    spatial_logits = feat.mean(axis=1).reshape(b, -1) / temperature
    spatial = h * w * np.exp(spatial_logits) / np.exp(spatial_logits).sum(axis=1, keepdims=True)
    channel_logits = feat.mean(axis=(2, 3)) / temperature
    channel = c * np.exp(channel_logits) / np.exp(channel_logits).sum(axis=1, keepdims=True)
    return spatial.reshape(b, h, w), channel


def test_attention_hand_case():
    feat = torch.tensor([[[[1.0, -3.0]], [[1.0, 1.0]]]])  # [1, 2, 1, 2]
    spatial, channel = fgd_attention(feat, temperature=1.0)
    # mean_c |F| = (1, 2) -> 2 * softmax; mean_hw |F| = (2, 1) -> 2 * softmax.
    e = math.e
    assert spatial.shape == (1, 1, 2) and channel.shape == (1, 2)
    assert spatial.flatten().tolist() == pytest.approx([2 / (1 + e), 2 * e / (1 + e)], rel=1e-6)
    assert channel.flatten().tolist() == pytest.approx([2 * e / (1 + e), 2 / (1 + e)], rel=1e-6)
    gen = torch.Generator().manual_seed(0)
    feat = torch.randn(2, 5, 3, 4, generator=gen)
    spatial, channel = fgd_attention(feat, 0.5)
    np_spatial, np_channel = np_attention(feat, 0.5)
    np.testing.assert_allclose(spatial.numpy(), np_spatial, rtol=1e-5)
    np.testing.assert_allclose(channel.numpy(), np_channel, rtol=1e-5)


def test_masks_hand_case():
    # Canvas 64 x 64 onto 8 x 8: x 10..60 -> cells 1..ceil(7.5)=8 (clipped to 7); y 20..50 -> cells 2..7.
    fg, bg = fgd_masks([torch.tensor([[10.0, 20.0, 60.0, 50.0]])], (64, 64), 8, 8)
    expected = np.zeros((8, 8))
    expected[2:8, 1:8] = 1.0 / (6 * 8)  # the area counts the unclipped cell 8
    np.testing.assert_allclose(fg[0].numpy(), expected, rtol=1e-6)
    assert bg[0].sum().item() == pytest.approx(1.0)
    assert bg[0, 0, 0].item() == pytest.approx(1.0 / (64 - 42))
    assert bg[0, 3, 3].item() == 0.0


def test_masks_match_the_released_loop():
    gen = torch.Generator().manual_seed(1)
    canvas = (96, 128)
    gt_boxes = []
    for num in (5, 0, 1, 12):
        xy = torch.rand(num, 2, generator=gen) * torch.tensor([140.0, 110.0]) - 10.0
        wh = torch.rand(num, 2, generator=gen) * 60.0
        gt_boxes.append(torch.cat([xy, xy + wh], dim=1))
    for H, W in ((12, 16), (6, 8), (3, 4)):
        fg, bg = fgd_masks(gt_boxes, canvas, H, W)
        ref_fg, ref_bg = loop_masks(gt_boxes, canvas, H, W)
        np.testing.assert_allclose(fg.numpy(), ref_fg, rtol=1e-6)
        np.testing.assert_allclose(bg.numpy(), ref_bg, rtol=1e-6)


def test_masks_empty_and_full_cover():
    fg, bg = fgd_masks([torch.zeros(0, 4), torch.tensor([[0.0, 0.0, 64.0, 64.0]])], (64, 64), 4, 4)
    assert fg[0].abs().sum().item() == 0.0
    np.testing.assert_allclose(bg[0].numpy(), np.full((4, 4), 1 / 16))
    assert bg[1].abs().sum().item() == 0.0  # everything is foreground: no background cell
    assert fg[1].min().item() == pytest.approx(1 / 25)  # cells 0..4 in each direction, 4 of them on the map


def test_gcblock_starts_as_identity_and_matches_reference_when_trained():
    block = GcBlock(4)
    assert block.channel_add[-1].weight.abs().sum().item() == 0.0 and block.channel_add[-1].bias.abs().sum().item() == 0.0
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 3, 3, generator=gen)
    torch.testing.assert_close(block(x), x)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    out = block(x).detach().numpy()
    # Reference: softmax attention over HW -> context -> conv -> LayerNorm over C/2 -> ReLU -> conv, added.
    xn = x.numpy().astype(np.float64)
    w_mask = block.conv_mask.weight.detach().numpy().reshape(1, 4)
    b_mask = block.conv_mask.bias.detach().numpy()
    conv1, norm, _, conv2 = block.channel_add
    for b in range(2):
        flat = xn[b].reshape(4, 9)
        logits = (w_mask @ flat + b_mask[:, None])[0]
        attention = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        context = flat @ attention
        hidden = conv1.weight.detach().numpy().reshape(2, 4) @ context + conv1.bias.detach().numpy()
        hidden = (hidden - hidden.mean()) / np.sqrt(hidden.var() + norm.eps)
        hidden = hidden * norm.weight.detach().numpy().reshape(2) + norm.bias.detach().numpy().reshape(2)
        hidden = np.maximum(hidden, 0)
        add = conv2.weight.detach().numpy().reshape(4, 2) @ hidden + conv2.bias.detach().numpy()
        np.testing.assert_allclose(out[b], xn[b] + add[:, None, None], rtol=1e-4, atol=1e-5)


def test_fgd_loss_hand_case():
    gen = torch.Generator().manual_seed(3)
    student = torch.randn(2, 4, 4, 4, generator=gen)
    teacher = torch.randn(2, 4, 4, 4, generator=gen)
    gt_boxes = [torch.tensor([[0.0, 0.0, 10.0, 14.0]]), torch.zeros(0, 4)]
    module = FGDLoss(4, 4, temperature=0.5, alpha=2.0, beta=3.0, gamma=5.0, lambda_=7.0, normalize="none")
    out = module(student, teacher, gt_boxes, (32, 32))
    s, t = student.numpy().astype(np.float64), teacher.numpy().astype(np.float64)
    spatial_t, channel_t = np_attention(t, 0.5)
    spatial_s, channel_s = np_attention(s, 0.5)
    fg, bg = loop_masks(gt_boxes, (32, 32), 4, 4)
    sq = (s - t) ** 2 * channel_t[:, :, None, None] * spatial_t[:, None]
    expected = {
        "fg": (sq * fg[:, None]).sum() / 2,
        "bg": (sq * bg[:, None]).sum() / 2,
        "mask": (np.abs(channel_s - channel_t).sum() + np.abs(spatial_s - spatial_t).sum()) / 2,
        "relation": ((s - t) ** 2).sum() / 2,  # fresh GcBlocks are the identity
    }
    for key, value in expected.items():
        assert out[key].item() == pytest.approx(value, rel=1e-5), key
    total = 2 * expected["fg"] + 3 * expected["bg"] + 5 * expected["mask"] + 7 * expected["relation"]
    assert out["total"].item() == pytest.approx(total, rel=1e-5)


def test_zero_when_student_equals_teacher_and_when_aligned_to_it():
    gen = torch.Generator().manual_seed(4)
    teacher = torch.randn(2, 4, 5, 5, generator=gen)
    gt_boxes = [torch.tensor([[3.0, 4.0, 20.0, 30.0]]), torch.zeros(0, 4)]
    out = FGDLoss(4, 4)(teacher.clone(), teacher, gt_boxes, (40, 40))
    for key in ("fg", "bg", "mask", "relation", "total"):
        assert abs(out[key].item()) < 1e-6, key
    # Student with 6 channels whose align conv selects the teacher's 4: identity-aligned.
    student = torch.cat([teacher, torch.randn(2, 2, 5, 5, generator=gen)], dim=1)
    module = FGDLoss(6, 4)
    with torch.no_grad():
        module.align.weight.copy_(torch.eye(4, 6)[:, :, None, None])
        module.align.bias.zero_()
    out = module(student, teacher, gt_boxes, (40, 40))
    for key in ("fg", "bg", "mask", "relation"):
        assert abs(out[key].item()) < 1e-5, key


def test_gradient_reaches_the_student_and_the_loss_modules_only():
    gen = torch.Generator().manual_seed(5)
    student = torch.randn(2, 3, 4, 4, generator=gen, requires_grad=True)
    teacher = torch.randn(2, 4, 4, 4, generator=gen, requires_grad=True)
    module = FGDLoss(3, 4)
    out = module(student, teacher, [torch.tensor([[0.0, 0.0, 16.0, 16.0]]), torch.zeros(0, 4)], (32, 32))
    out["total"].backward()
    assert teacher.grad is None
    assert student.grad.abs().sum().item() > 0
    assert module.align.weight.grad.abs().sum().item() > 0
    # The zero-initialised last convolutions of both GcBlocks are trained by the relation term.
    assert module.student_gc.channel_add[-1].weight.grad.abs().sum().item() > 0
    assert module.teacher_gc.channel_add[-1].weight.grad.abs().sum().item() > 0


def test_family_defaults():
    assert FGD_DEFAULTS["fcos"] == dict(temperature=0.8, alpha=1.6e-3, beta=8e-4, gamma=8e-4, lambda_=8e-6)
    module = FGDLoss.for_family("gfl", 8, 16)
    assert (module.temperature, module.alpha, module.beta, module.gamma, module.lambda_) == (0.5, 1e-3, 5e-4, 5e-4, 5e-6)
    assert module.align is not None and FGDLoss(16, 16).align is None
    with pytest.raises(LossInputError, match="family"):
        FGDLoss.for_family("yolo", 8, 8)


def test_empty_gt_gives_zero_foreground():
    gen = torch.Generator().manual_seed(6)
    student = torch.randn(2, 4, 4, 4, generator=gen, requires_grad=True)
    teacher = torch.randn(2, 4, 4, 4, generator=gen)
    out = FGDLoss(4, 4)(student, teacher, [torch.zeros(0, 4), torch.zeros(0, 4)], (32, 32))
    assert out["fg"].item() == 0.0
    assert all(torch.isfinite(v) for v in out.values()) and out["bg"].item() > 0
    out["total"].backward()
    assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    gen = torch.Generator().manual_seed(7)
    student = torch.randn(2, 8, 6, 6, generator=gen)
    teacher = torch.randn(2, 8, 6, 6, generator=gen)
    gt_boxes = [torch.tensor([[4.0, 4.0, 30.0, 40.0]]), torch.tensor([[0.0, 10.0, 12.0, 20.0]])]
    module = FGDLoss(8, 8)
    reference = module(student, teacher, gt_boxes, (48, 48))
    student_half = student.to(dtype).requires_grad_()
    out = module(student_half, teacher.to(dtype), gt_boxes, (48, 48))
    for key, value in out.items():
        assert value.dtype == torch.float32 and torch.isfinite(value), key
        assert value.item() == pytest.approx(reference[key].item(), rel=5e-2), key
    out["total"].backward()
    assert student_half.grad.dtype == dtype and torch.isfinite(student_half.grad.float()).all()


def test_input_errors():
    module = FGDLoss(4, 8)
    with pytest.raises(LossInputError, match=r"student_feat=.*\[B, 4, H, W\].*Got Tensor\[1, 8, 4, 4\]"):
        module(torch.zeros(1, 8, 4, 4), torch.zeros(1, 8, 4, 4), [torch.zeros(0, 4)], (32, 32))
    with pytest.raises(LossInputError, match=r"teacher_feat=.*\[1, 8, 4, 4\].*Got Tensor\[1, 8, 2, 2\]"):
        module(torch.zeros(1, 4, 4, 4), torch.zeros(1, 8, 2, 2), [torch.zeros(0, 4)], (32, 32))
    with pytest.raises(LossInputError, match=r"gt_boxes=.*1 images.*length 2"):
        module(torch.zeros(1, 4, 4, 4), torch.zeros(1, 8, 4, 4), [torch.zeros(0, 4)] * 2, (32, 32))
    with pytest.raises(LossInputError, match=r"gt_boxes=.*Got Tensor\[4\]"):
        fgd_masks([torch.zeros(4)], (32, 32), 4, 4)


def test_teacher_rms_normalisation_hand_case():
    """Default scaling: both features divided by the teacher's RMS, then the released loss."""
    gen = torch.Generator().manual_seed(8)
    student = 9.0 * torch.randn(2, 4, 4, 4, generator=gen)
    teacher = 12.0 * torch.randn(2, 4, 4, 4, generator=gen)
    gt_boxes = [torch.tensor([[4.0, 2.0, 20.0, 18.0]]), torch.zeros(0, 4)]
    out = FGDLoss(4, 4, alpha=2.0, beta=3.0, gamma=5.0, lambda_=7.0, normalize="teacher_rms")(student, teacher, gt_boxes, (32, 32))
    s, t = student.numpy().astype(np.float64), teacher.numpy().astype(np.float64)
    rms = np.sqrt((t**2).mean())
    s, t = s / rms, t / rms
    spatial_t, channel_t = np_attention(t, 0.5)
    spatial_s, channel_s = np_attention(s, 0.5)
    fg, bg = loop_masks(gt_boxes, (32, 32), 4, 4)
    sq = (s - t) ** 2 * channel_t[:, :, None, None] * spatial_t[:, None]
    assert out["fg"].item() == pytest.approx((sq * fg[:, None]).sum() / 2, rel=1e-4)
    assert out["bg"].item() == pytest.approx((sq * bg[:, None]).sum() / 2, rel=1e-4)
    mask = (np.abs(channel_s - channel_t).sum() + np.abs(spatial_s - spatial_t).sum()) / 2
    assert out["mask"].item() == pytest.approx(mask, rel=1e-4)
    assert out["relation"].item() == pytest.approx(((s - t) ** 2).sum() / 2, rel=1e-4)


def test_teacher_rms_normalisation_makes_the_loss_scale_free():
    gen = torch.Generator().manual_seed(9)
    student = torch.randn(2, 4, 6, 6, generator=gen)
    teacher = torch.randn(2, 4, 6, 6, generator=gen)
    gt_boxes = [torch.tensor([[2.0, 2.0, 30.0, 20.0]]), torch.tensor([[10.0, 10.0, 40.0, 44.0]])]
    normalised, released = FGDLoss(4, 4, normalize="teacher_rms"), FGDLoss(4, 4)
    small = normalised(student, teacher, gt_boxes, (48, 48))
    large = normalised(10.0 * student, 10.0 * teacher, gt_boxes, (48, 48))
    for key in ("fg", "bg", "mask", "relation"):
        assert large[key].item() == pytest.approx(small[key].item(), rel=1e-4), key
    # As released, the same features ten times larger give a 100x relation term and a
    # different fg term (squared error 100x, attention sharper).
    released_small = released(student, teacher, gt_boxes, (48, 48))
    released_large = released(10.0 * student, 10.0 * teacher, gt_boxes, (48, 48))
    assert released_large["relation"].item() == pytest.approx(100 * released_small["relation"].item(), rel=1e-4)
    assert released_large["fg"].item() > 5 * released_small["fg"].item()


def test_unknown_normalisation_is_refused():
    with pytest.raises(LossInputError, match="normalize"):
        FGDLoss(4, 4, normalize="batch")
