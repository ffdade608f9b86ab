"""Label assignment for dense detectors: ATSS, LD's valuable localization region, and the
fine-grained feature-imitation region of LD's release.

Legend: A anchors over all levels (level-major, as `detcore.outputs.level_anchors`
concatenated), L levels, G GT boxes, C candidates per GT (sum over levels of
``min(topk, anchors in the level)``). Boxes are ``(x1, y1, x2, y2)`` canvas pixels.

Label contract of `atss_assign`: 0 is a negative (background) anchor, ``g + 1`` is an
anchor assigned to GT ``g``. Nothing is ignored.

ATSS and the VLR share the per-GT ATSS threshold (`atss_thresholds`). Every region is
computed from the view's GT at training time, never stored by the teacher (DESIGN.md,
"Losses").
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from detcore.boxes import box_centers, box_diou, box_iou, box_overlap_diou

# Smallest gap (pixels) between an anchor centre and each GT edge for a positive (mmdetection's value).
CENTER_INSIDE_EPS = 0.01

DIOU_MODES = ("standard", "released")


class AtssCandidates(NamedTuple):
    """What `atss_thresholds` returns."""

    thresholds: Tensor
    """Tensor[G]: mean + unbiased std of the IoUs of each GT's candidates."""
    candidate_index: Tensor
    """LongTensor[C, G]: anchor indices of each GT's candidates (the topk closest per level)."""
    ious: Tensor
    """Tensor[A, G]: IoU of every anchor with every GT."""


def _check_boxes(fn: str, anchors: Tensor, gt_boxes: Tensor) -> None:
    if not isinstance(anchors, Tensor) or anchors.ndim != 2 or anchors.shape[1] != 4:
        shape = tuple(anchors.shape) if isinstance(anchors, Tensor) else type(anchors).__name__
        raise ValueError(f"{fn}(anchors=) expects a Tensor[A, 4]. Got {shape}.")
    if not isinstance(gt_boxes, Tensor) or gt_boxes.ndim != 2 or gt_boxes.shape[1] != 4:
        shape = tuple(gt_boxes.shape) if isinstance(gt_boxes, Tensor) else type(gt_boxes).__name__
        raise ValueError(f"{fn}(gt_boxes=) expects a Tensor[G, 4]. Got {shape}.")


def _check_inputs(fn: str, anchors: Tensor, num_level_anchors: Sequence[int], gt_boxes: Tensor, topk: int) -> None:
    _check_boxes(fn, anchors, gt_boxes)
    counts = [int(n) for n in num_level_anchors]
    if any(n < 0 for n in counts) or sum(counts) != anchors.shape[0]:
        raise ValueError(
            f"{fn}(num_level_anchors=) expects non-negative counts summing to the {anchors.shape[0]} anchors. "
            f"Got {counts} (sum {sum(counts)})."
        )
    if int(topk) < 1:
        raise ValueError(f"{fn}(topk=) expects a positive integer. Got {topk}.")


def atss_thresholds(
    anchors: Tensor, num_level_anchors: Sequence[int], gt_boxes: Tensor, topk: int = 9
) -> AtssCandidates:
    """ATSS candidates and per-GT IoU thresholds (Zhang et al., 2020).

    For each GT and each level, the ``topk`` anchors whose centres are closest to the GT
    centre (fewer if the level has fewer anchors) are candidates; the GT's threshold is
    the mean plus the unbiased standard deviation of the candidates' IoUs. A single
    candidate has a standard deviation of 0 (not NaN).

    Args:
        anchors: Tensor[A, 4].
        num_level_anchors: anchors per level, summing to A.
        gt_boxes: Tensor[G, 4].
        topk: candidates per level per GT.
    """
    _check_inputs("atss_thresholds", anchors, num_level_anchors, gt_boxes, topk)
    anchors = anchors.float()
    gt_boxes = gt_boxes.float().to(anchors.device)
    num_gt = gt_boxes.shape[0]
    ious = box_iou(anchors, gt_boxes)
    # Explicit differences, not torch.cdist, whose matmul path perturbs ties between equidistant anchors.
    distances = (box_centers(anchors)[:, None, :] - box_centers(gt_boxes)[None, :, :]).pow(2).sum(-1).sqrt()
    candidates = []
    start = 0
    for count in num_level_anchors:
        count = int(count)
        k = min(int(topk), count)
        if k > 0:
            _, index = distances[start : start + count].topk(k, dim=0, largest=False)
            candidates.append(index + start)
        start += count
    if candidates:
        candidate_index = torch.cat(candidates, dim=0)
    else:
        candidate_index = torch.zeros((0, num_gt), dtype=torch.long, device=anchors.device)
    candidate_ious = ious.gather(0, candidate_index)
    num_candidates = candidate_index.shape[0]
    if num_candidates == 0:
        thresholds = torch.full((num_gt,), float("inf"), device=anchors.device)
    elif num_candidates == 1:
        thresholds = candidate_ious[0]
    else:
        thresholds = candidate_ious.mean(dim=0) + candidate_ious.std(dim=0, unbiased=True)
    return AtssCandidates(thresholds, candidate_index, ious)


def atss_assign(anchors: Tensor, num_level_anchors: Sequence[int], gt_boxes: Tensor, topk: int = 9) -> Tensor:
    """Adaptive Training Sample Selection, as mmdetection's ``ATSSAssigner`` (GFL's assigner).

    A candidate (see `atss_thresholds`) is positive for a GT if its IoU is at least the
    GT's threshold and its centre lies strictly inside the GT (each of the four gaps
    between centre and edge > 0.01 px). An anchor positive for several GTs goes to the
    GT with the highest IoU (the lowest index on a tie).

    Args:
        anchors: Tensor[A, 4].
        num_level_anchors: anchors per level, summing to A.
        gt_boxes: Tensor[G, 4].
        topk: candidates per level per GT (9 in ATSS and GFL).

    Returns:
        LongTensor[A]: 0 for a negative, ``g + 1`` for an anchor assigned to GT g.
    """
    _check_inputs("atss_assign", anchors, num_level_anchors, gt_boxes, topk)
    num_anchors, num_gt = anchors.shape[0], gt_boxes.shape[0]
    assigned = torch.zeros(num_anchors, dtype=torch.long, device=anchors.device)
    if num_gt == 0 or num_anchors == 0:
        return assigned
    thresholds, candidate_index, ious = atss_thresholds(anchors, num_level_anchors, gt_boxes, topk)
    gt_boxes = gt_boxes.float().to(anchors.device)
    candidate_ious = ious.gather(0, candidate_index)
    positive_mask = candidate_ious >= thresholds[None, :]

    centres = box_centers(anchors.float())
    cx = centres[:, 0][candidate_index]
    cy = centres[:, 1][candidate_index]
    gaps = torch.stack(
        [cx - gt_boxes[None, :, 0], cy - gt_boxes[None, :, 1], gt_boxes[None, :, 2] - cx, gt_boxes[None, :, 3] - cy],
        dim=-1,
    )
    positive_mask &= gaps.min(dim=-1).values > CENTER_INSIDE_EPS

    gt_index = torch.arange(num_gt, device=anchors.device).expand_as(candidate_index)
    claimed = torch.full_like(ious, float("-inf"))
    rows, cols = candidate_index[positive_mask], gt_index[positive_mask]
    claimed[rows, cols] = ious[rows, cols]
    best_iou, best_gt = claimed.max(dim=1)
    positive = best_iou > float("-inf")
    assigned[positive] = best_gt[positive] + 1
    return assigned


def vlr_region(
    anchors: Tensor,
    num_level_anchors: Sequence[int],
    gt_boxes: Tensor,
    topk: int = 9,
    alpha: float = 0.25,
    diou: str = "standard",
) -> Tensor:
    """The valuable localization region of Localization Distillation (Zheng et al., 2022).

    Anchor a lies in the VLR of GT g iff ``alpha * thr_g <= DIoU(a, g) < thr_g``, with
    ``thr_g`` the ATSS threshold of g (`atss_thresholds`). All anchors of all levels are
    considered and ATSS positives are not excluded. The value of an anchor is the largest
    IoU (not DIoU) over the GTs whose VLR contains it, and 0 outside every VLR.

    ``diou`` selects the DIoU:
        ``"standard"``: ``IoU - d^2 / c^2`` (the paper's definition; `detcore.boxes.box_diou`).
        ``"released"``: what the authors' released code computes,
            ``intersection / area(anchor) - d^2 / c^2`` (`detcore.boxes.box_overlap_diou`).
            Its first term is the fraction of the anchor covered by the GT, which is at
            least the IoU and reaches 1 for an anchor inside a large GT; large GTs then
            pull more (and more central) anchors above ``thr_g`` out of the region, while
            anchors much larger than a small GT are scored alike in both modes.

    Args:
        anchors: Tensor[A, 4].
        num_level_anchors: anchors per level, summing to A.
        gt_boxes: Tensor[G, 4].
        topk: ATSS candidates per level per GT.
        alpha: lower bound of the region as a fraction of the threshold (0.25 in LD).
        diou: ``"standard"`` or ``"released"``.

    Returns:
        Tensor[A] float32 in [0, 1].
    """
    if diou not in DIOU_MODES:
        raise ValueError(f"vlr_region(diou=) expects one of {DIOU_MODES}. Got {diou!r}.")
    _check_inputs("vlr_region", anchors, num_level_anchors, gt_boxes, topk)
    num_anchors, num_gt = anchors.shape[0], gt_boxes.shape[0]
    region = torch.zeros(num_anchors, dtype=torch.float32, device=anchors.device)
    if num_gt == 0 or num_anchors == 0:
        return region
    thresholds, _, ious = atss_thresholds(anchors, num_level_anchors, gt_boxes, topk)
    gt_boxes = gt_boxes.float().to(anchors.device)
    anchors = anchors.float()
    dious = box_diou(anchors, gt_boxes) if diou == "standard" else box_overlap_diou(anchors, gt_boxes)
    in_region = (dious >= alpha * thresholds[None, :]) & (dious < thresholds[None, :])
    values = torch.where(in_region, ious, torch.full_like(ious, float("-inf"))).max(dim=1).values
    inside = in_region.any(dim=1)
    region[inside] = values[inside]
    return region


def imitation_region(anchors: Tensor, gt_boxes: Tensor, ratio: float = 0.5) -> Tensor:
    """The fine-grained feature-imitation region (Wang et al., CVPR 2019), as LD's release uses it.

    Anchor a is in the region iff ``IoU(a, g) > ratio * max_a' IoU(a', g)`` for some GT g,
    the maximum taken over the anchors of all levels. A GT that no anchor overlaps adds
    nothing. This is the ``finegrained`` imitation region of the LD authors' released head
    (HikariTJU/LD, ``LDHead.get_im_region``, psi = 0.5), which its feature imitation term
    (``loss_im``) reads.

    Args:
        anchors: Tensor[A, 4].
        gt_boxes: Tensor[G, 4].
        ratio: psi, the fraction of each GT's best IoU an anchor must exceed (0 < ratio <= 1).

    Returns:
        BoolTensor[A].
    """
    _check_boxes("imitation_region", anchors, gt_boxes)
    if not 0.0 < float(ratio) <= 1.0:
        raise ValueError(f"imitation_region(ratio=) expects a number in (0, 1]. Got {ratio!r}.")
    num_anchors, num_gt = anchors.shape[0], gt_boxes.shape[0]
    if num_gt == 0 or num_anchors == 0:
        return torch.zeros(num_anchors, dtype=torch.bool, device=anchors.device)
    ious = box_iou(anchors.float(), gt_boxes.float().to(anchors.device))
    best = ious.max(dim=0).values
    return (ious > float(ratio) * best[None, :]).any(dim=1)


def stored_region(
    gt_boxes: Tensor,
    canvas_hw: tuple[int, int],
    strides: Sequence[int],
    *,
    topk: int,
    vlr_alpha: float,
    vlr_diou: str = "standard",
    point_offset: float = 0.5,
) -> Tensor:
    """The points of a view where a region store keeps LD's targets (`label_store.StoreRegion`).

    The union, over the GT boxes, of each GT's ATSS candidates (`atss_thresholds`; every
    positive of `atss_assign` with this ``topk`` is one) and of the anchors whose DIoU with
    the GT is at least ``vlr_alpha`` times its ATSS threshold (`vlr_region` at any alpha >=
    ``vlr_alpha`` lies inside, having also the upper bound ``DIoU < threshold``), on the GFL
    anchors of every level (`detcore.outputs.level_anchors`). No GT: no point.

    Args:
        gt_boxes: Tensor[G, 4] canvas pixels (the view's GT, `detcore.views.image_to_view_boxes`).
        canvas_hw: the view's canvas ``(H, W)``.
        strides: the FPN strides; level l has ``ceil(H / s) x ceil(W / s)`` points.
        topk: ATSS candidates per level per GT.
        vlr_alpha: the smallest VLR alpha to serve.
        vlr_diou: DIoU flavour of the VLR (`DIOU_MODES`).
        point_offset: the student's point convention.
    Returns:
        BoolTensor[A] on the CPU, level-major then row-major.
    """
    import math

    from detcore.outputs import level_anchors

    if vlr_diou not in DIOU_MODES:
        raise ValueError(f"stored_region(vlr_diou=) expects one of {DIOU_MODES}. Got {vlr_diou!r}.")
    shapes = [(math.ceil(int(canvas_hw[0]) / s), math.ceil(int(canvas_hw[1]) / s)) for s in strides]
    per_level = level_anchors(strides, shapes, point_offset=point_offset)
    anchors, counts = torch.cat(per_level), [int(a.shape[0]) for a in per_level]
    boxes = torch.as_tensor(gt_boxes, dtype=torch.float32).reshape(-1, 4).cpu()
    _check_inputs("stored_region", anchors, counts, boxes, topk)
    mask = torch.zeros(anchors.shape[0], dtype=torch.bool)
    if boxes.shape[0] == 0:
        return mask
    thresholds, candidate_index, _ = atss_thresholds(anchors, counts, boxes, topk)
    mask[candidate_index.reshape(-1)] = True
    dious = box_diou(anchors, boxes) if vlr_diou == "standard" else box_overlap_diou(anchors, boxes)
    mask |= (dious >= vlr_alpha * thresholds[None, :]).any(dim=1)
    return mask
