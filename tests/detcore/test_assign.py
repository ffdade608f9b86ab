"""ATSS assignment, LD's valuable localization region and the imitation region on hand-built cases."""

import statistics

import pytest
import torch

from detcore.assign import atss_assign, atss_thresholds, imitation_region, vlr_region
from detcore.outputs import feature_hw, level_anchors


def grid_anchors(canvas=64, strides=(8, 16, 32, 64, 128)):
    shapes = [feature_hw((canvas, canvas), s) for s in strides]
    per_level = level_anchors(strides, shapes)
    return torch.cat(per_level), [a.shape[0] for a in per_level]


def iou_1d_boxes(a, b):
    """Plain-float IoU, independent of detcore.boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def test_threshold_is_mean_plus_unbiased_std_hand_case():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0], [20.0, 0.0, 30.0, 10.0]])
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    # IoUs 1, 1/3, 0: mean 4/9, unbiased std sqrt(21)/9.
    result = atss_thresholds(anchors, [3], gt, topk=9)
    assert result.thresholds.item() == pytest.approx((4.0 + 21.0**0.5) / 9.0, rel=1e-6)
    assert sorted(result.candidate_index[:, 0].tolist()) == [0, 1, 2]
    assert atss_assign(anchors, [3], gt).tolist() == [1, 0, 0]


def test_topk_is_per_level_and_limited_by_level_size():
    anchors = torch.tensor(
        [[0.0, 0.0, 10.0, 10.0], [40.0, 0.0, 50.0, 10.0], [60.0, 0.0, 70.0, 10.0], [-5.0, -5.0, 15.0, 15.0]]
    )
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    result = atss_thresholds(anchors, [3, 1], gt, topk=2)
    # Level 0: the two closest of three; level 1 has a single anchor.
    assert sorted(result.candidate_index[:, 0].tolist()) == [0, 1, 3]
    ious = [1.0, 0.0, 100.0 / 400.0]
    assert result.thresholds.item() == pytest.approx(statistics.mean(ious) + statistics.stdev(ious), rel=1e-6)


def test_single_candidate_has_zero_std_not_nan():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    gt = torch.tensor([[2.0, 2.0, 8.0, 8.0]])
    result = atss_thresholds(anchors, [1], gt)
    assert result.thresholds.item() == pytest.approx(36.0 / 100.0)
    assert atss_assign(anchors, [1], gt).tolist() == [1]


def test_gt_on_one_point_gets_exactly_that_point():
    anchors, counts = grid_anchors()
    gt = torch.tensor([[10.0, 10.0, 18.0, 18.0]])  # contains only the centre (12, 12) of p3
    assigned = atss_assign(anchors, counts, gt)
    assert assigned.nonzero().flatten().tolist() == [9]  # p3 row 1, column 1
    assert assigned[9].item() == 1
    # Threshold by hand: every candidate anchor contains the 8x8 GT, so IoU = 64 / anchor area.
    ious = [64 / 64**2] * 9 + [64 / 128**2] * 9 + [64 / 256**2] * 4 + [64 / 512**2] + [64 / 1024**2]
    thr = atss_thresholds(anchors, counts, gt).thresholds.item()
    assert thr == pytest.approx(statistics.mean(ious) + statistics.stdev(ious), rel=1e-5)
    assert thr < 64 / 64**2


def test_gt_without_qualifying_candidates_gets_no_positive():
    anchors, counts = grid_anchors()
    gt = torch.tensor([[13.0, 13.0, 15.0, 15.0]])  # between the p3 centres 12 and 20: none inside
    assert atss_assign(anchors, counts, gt).sum().item() == 0
    # A GT whose edge passes within 0.01 px of a centre is not "strictly inside" either.
    edge = torch.tensor([[12.005, 4.0, 30.0, 30.0]])
    assigned = atss_assign(anchors, counts, edge)
    points = (anchors[:, :2] + anchors[:, 2:]) / 2
    assert (points[assigned > 0, 0] > 12.015).all()


def test_overlapping_gts_anchor_goes_to_highest_iou():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [30.0, 0.0, 40.0, 10.0], [60.0, 0.0, 70.0, 10.0]])
    exact = [0.0, 0.0, 10.0, 10.0]
    shifted = [1.0, 0.0, 11.0, 10.0]
    # Anchor 0 is positive for both GTs (IoU 1 and 90/110, thresholds 0.911 and 0.745).
    for gts, expected in (([exact, shifted], 1), ([shifted, exact], 2)):
        gt = torch.tensor(gts)
        thr = atss_thresholds(anchors, [3], gt).thresholds
        assert thr.tolist() == pytest.approx(
            [(i + statistics.stdev([i, 0, 0]) * 3) / 3 for i in (iou_1d_boxes(exact, g) for g in gts)], rel=1e-5
        )
        assert atss_assign(anchors, [3], gt).tolist() == [expected, 0, 0]


def test_two_separate_gts_on_the_grid():
    anchors, counts = grid_anchors()
    gt = torch.tensor([[0.0, 0.0, 30.0, 30.0], [34.0, 34.0, 62.0, 62.0]])
    assigned = atss_assign(anchors, counts, gt)
    points = (anchors[:, :2] + anchors[:, 2:]) / 2
    for g in (1, 2):
        box = gt[g - 1]
        assert (assigned == g).sum().item() >= 1
        inside = (points[assigned == g] > box[:2] + 0.01).all() and (points[assigned == g] < box[2:] - 0.01).all()
        assert bool(inside)


def test_empty_image_and_bad_inputs():
    anchors, counts = grid_anchors()
    empty = torch.zeros((0, 4))
    assert atss_assign(anchors, counts, empty).shape == (anchors.shape[0],)
    assert atss_assign(anchors, counts, empty).abs().sum().item() == 0
    assert vlr_region(anchors, counts, empty).abs().sum().item() == 0.0
    with pytest.raises(ValueError, match="num_level_anchors"):
        atss_assign(anchors, [3, 4], torch.tensor([[0.0, 0.0, 5.0, 5.0]]))
    with pytest.raises(ValueError, match=r"gt_boxes=\) expects a Tensor\[G, 4\]"):
        atss_assign(anchors, counts, torch.zeros(4))
    with pytest.raises(ValueError, match="diou"):
        vlr_region(anchors, counts, torch.tensor([[0.0, 0.0, 5.0, 5.0]]), diou="ciou")


def _diou(a, b, released=False):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    first = iw * ih / ((a[2] - a[0]) * (a[3] - a[1])) if released else iou_1d_boxes(a, b)
    d2 = ((a[0] + a[2]) / 2 - (b[0] + b[2]) / 2) ** 2 + ((a[1] + a[3]) / 2 - (b[1] + b[3]) / 2) ** 2
    c2 = (max(a[2], b[2]) - min(a[0], b[0])) ** 2 + (max(a[3], b[3]) - min(a[1], b[1])) ** 2
    return first - d2 / c2


@pytest.mark.parametrize("mode", ["standard", "released"])
def test_vlr_hand_case(mode):
    gt = [0.0, 0.0, 10.0, 10.0]
    anchor_list = [[0.0, 0.0, 10.0, 10.0], [2.0, 0.0, 12.0, 10.0], [5.0, 0.0, 15.0, 10.0], [9.0, 0.0, 19.0, 10.0],
                   [40.0, 0.0, 50.0, 10.0]]
    ious = [iou_1d_boxes(a, gt) for a in anchor_list]
    thr = statistics.mean(ious) + statistics.stdev(ious)
    expected = [iou if 0.25 * thr <= _diou(a, gt, mode == "released") < thr else 0.0 for a, iou in zip(anchor_list, ious)]
    region = vlr_region(torch.tensor(anchor_list), [5], torch.tensor([gt]), alpha=0.25, diou=mode)
    assert region.tolist() == pytest.approx(expected, abs=1e-6)
    # Anchors 1 and 2 (IoU 2/3 and 1/3) are in the region, the exact anchor and the far ones are not.
    assert [v > 0 for v in region.tolist()] == [False, True, True, False, False]
    assert region[1].item() == pytest.approx(2.0 / 3.0, rel=1e-6)


def test_vlr_released_differs_for_anchor_inside_large_gt():
    gt = torch.tensor([[0.0, 0.0, 40.0, 10.0]])
    anchors = torch.tensor([[17.0, 0.0, 23.0, 10.0], [0.0, 0.0, 20.0, 10.0], [60.0, 0.0, 70.0, 10.0],
                            [90.0, 0.0, 100.0, 10.0]])
    ious = [60.0 / 400.0, 200.0 / 400.0, 0.0, 0.0]
    thr = statistics.mean(ious) + statistics.stdev(ious)  # 0.398
    standard = vlr_region(anchors, [4], gt, diou="standard")
    released = vlr_region(anchors, [4], gt, diou="released")
    # Anchor 0 shares the GT centre: DIoU = IoU = 0.15 lies in [0.25 thr, thr) ...
    assert 0.25 * thr <= ious[0] < thr
    assert standard[0].item() == pytest.approx(0.15, rel=1e-6)
    # ... but it lies inside the GT, so the released variant scores it 1.0 >= thr: outside.
    assert released[0].item() == 0.0
    assert standard[1:].abs().sum().item() == 0.0 and released.abs().sum().item() == 0.0


def test_vlr_keeps_positives_whose_diou_is_below_the_threshold():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    anchors = torch.tensor([[2.0, 2.0, 12.0, 12.0], [4.5, 0.0, 14.5, 10.0], [40.0, 0.0, 50.0, 10.0],
                            [60.0, 0.0, 70.0, 10.0]])
    ious = [64.0 / 136.0, 55.0 / 145.0, 0.0, 0.0]
    thr = statistics.mean(ious) + statistics.stdev(ious)  # 0.4606
    diou0 = ious[0] - 8.0 / (12.0**2 + 12.0**2)  # 0.4428
    assert diou0 < thr <= ious[0]
    assert atss_assign(anchors, [4], gt).tolist() == [1, 0, 0, 0]
    region = vlr_region(anchors, [4], gt)
    assert region.tolist() == pytest.approx([ious[0], ious[1], 0.0, 0.0], rel=1e-6)


def test_vlr_matches_its_definition_over_all_levels():
    anchors, counts = grid_anchors(canvas=128)
    gt = torch.tensor([[20.0, 24.0, 70.0, 90.0], [60.0, 8.0, 90.0, 40.0]])
    region = vlr_region(anchors, counts, gt)
    result = atss_thresholds(anchors, counts, gt)
    from detcore.boxes import box_diou

    diou = box_diou(anchors, gt)
    member = (diou >= 0.25 * result.thresholds) & (diou < result.thresholds)
    expected = torch.where(member, result.ious, torch.zeros_like(result.ious)).max(dim=1).values
    assert torch.equal(region > 0, member.any(dim=1))
    torch.testing.assert_close(region, expected)
    level_of = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    assert level_of[member.any(dim=1)].unique().numel() >= 2


def test_imitation_region_hand_case():
    # GT 0's best IoU is 1 (anchor 0); anchors 1 (IoU 2/3) and 2 (IoU 1/3) bracket half of it.
    # GT 1 overlaps only anchor 3, with IoU 0.04: a GT's own best sets its bar, so anchor 3 is in.
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [2.0, 0.0, 12.0, 10.0], [5.0, 0.0, 15.0, 10.0],
                            [40.0, 0.0, 90.0, 50.0], [200.0, 200.0, 210.0, 210.0]])
    gts = torch.tensor([[0.0, 0.0, 10.0, 10.0], [80.0, 40.0, 90.0, 50.0]])
    assert [round(iou_1d_boxes(a, gts[0].tolist()), 4) for a in anchors.tolist()[:3]] == [1.0, 0.6667, 0.3333]
    assert imitation_region(anchors, gts).tolist() == [True, True, False, True, False]
    # psi moves the bar: at 0.3 anchor 2 (1/3 > 0.3) joins; at 1.0 nothing beats the best strictly.
    assert imitation_region(anchors, gts, ratio=0.3).tolist() == [True, True, True, True, False]
    assert not imitation_region(anchors, gts, ratio=1.0).any()


def test_imitation_region_matches_its_definition_over_all_levels():
    anchors, _ = grid_anchors(canvas=64)
    gts = torch.tensor([[3.0, 5.0, 27.0, 30.0], [30.0, 20.0, 62.0, 60.0], [10.0, 40.0, 14.0, 44.0]])
    region = imitation_region(anchors, gts)
    expected = []
    for a in anchors.tolist():
        inside = False
        for g in gts.tolist():
            best = max(iou_1d_boxes(b, g) for b in anchors.tolist())
            inside |= iou_1d_boxes(a, g) > 0.5 * best
        expected.append(inside)
    assert region.tolist() == expected
    assert region.dtype == torch.bool and 0 < int(region.sum()) < anchors.shape[0]


def test_imitation_region_empty_and_bad_inputs():
    anchors, _ = grid_anchors()
    assert not imitation_region(anchors, torch.zeros((0, 4))).any()
    assert imitation_region(anchors, torch.zeros((0, 4))).shape == (anchors.shape[0],)
    with pytest.raises(ValueError, match=r"imitation_region\(ratio=\)"):
        imitation_region(anchors, torch.tensor([[0.0, 0.0, 5.0, 5.0]]), ratio=0.0)
    with pytest.raises(ValueError, match=r"imitation_region\(gt_boxes=\) expects a Tensor\[G, 4\]"):
        imitation_region(anchors, torch.zeros(4))
