"""Stateless box operations: areas, centres, IoU, GIoU, DIoU.

Legend: N, M boxes. Boxes are Tensor[N, 4] in ``(x1, y1, x2, y2)`` pixels with
``x1 <= x2`` and ``y1 <= y2``; degenerate (zero-area) boxes are allowed and give IoU 0
against everything instead of NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_boxes(name: str, boxes: Tensor) -> None:
    if not isinstance(boxes, Tensor) or boxes.ndim != 2 or boxes.shape[-1] != 4:
        shape = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
        raise ValueError(f"{name} expects a Tensor[N, 4] of (x1, y1, x2, y2) boxes. Got {shape}.")


def box_area(boxes: Tensor) -> Tensor:
    """Areas of Tensor[N, 4] boxes -> Tensor[N] (negative extents count as 0)."""
    _check_boxes("box_area(boxes=)", boxes)
    return (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)


def box_centers(boxes: Tensor) -> Tensor:
    """Centres of Tensor[N, 4] boxes -> Tensor[N, 2] in (x, y)."""
    _check_boxes("box_centers(boxes=)", boxes)
    return torch.stack([(boxes[:, 0] + boxes[:, 2]) * 0.5, (boxes[:, 1] + boxes[:, 3]) * 0.5], dim=1)


def _pairwise_inter_union(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Intersection Tensor[N, M], union Tensor[N, M] and area of ``a`` Tensor[N]."""
    area_a = box_area(a)
    area_b = box_area(b)
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return inter, union, area_a


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise IoU.

    Args:
        a: Tensor[N, 4]. b: Tensor[M, 4].
    Returns:
        Tensor[N, M]; 0 where the union is empty (two degenerate boxes).
    """
    _check_boxes("box_iou(a=)", a)
    _check_boxes("box_iou(b=)", b)
    inter, union, _ = _pairwise_inter_union(a, b)
    # torchvision.ops.box_iou divides 0/0 for degenerate pairs; clamping the union avoids NaN.
    return inter / union.clamp(min=torch.finfo(inter.dtype).tiny)


def box_diou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise distance-IoU: ``IoU - d^2 / c^2``.

    ``d`` is the distance between the centres and ``c`` the diagonal of the smallest
    box enclosing both (Zheng et al., 2020). Values lie in (-1, 1].

    Args:
        a: Tensor[N, 4]. b: Tensor[M, 4].
    Returns:
        Tensor[N, M].
    """
    iou = box_iou(a, b)
    return iou - _center_penalty(a, b)


def box_overlap_diou(a: Tensor, b: Tensor) -> Tensor:
    """The DIoU variant of the LD authors' released code: ``inter / area(a) - d^2 / c^2``.

    The first term is the fraction of box ``a`` (the anchor) covered by ``b`` (the GT),
    not the IoU; it is 1 for an anchor fully inside a large GT. See
    `detcore.assign.vlr_region` for where this matters.

    Args:
        a: Tensor[N, 4] (anchors). b: Tensor[M, 4] (GT boxes).
    Returns:
        Tensor[N, M].
    """
    _check_boxes("box_overlap_diou(a=)", a)
    _check_boxes("box_overlap_diou(b=)", b)
    inter, _, area_a = _pairwise_inter_union(a, b)
    overlap = inter / area_a.clamp(min=torch.finfo(inter.dtype).tiny)[:, None]
    return overlap - _center_penalty(a, b)


def _center_penalty(a: Tensor, b: Tensor) -> Tensor:
    """``d^2 / c^2`` of DIoU, Tensor[N, M]."""
    center_a = box_centers(a)
    center_b = box_centers(b)
    dist2 = ((center_a[:, None, :] - center_b[None, :, :]) ** 2).sum(-1)
    lt = torch.min(a[:, None, :2], b[None, :, :2])
    rb = torch.max(a[:, None, 2:], b[None, :, 2:])
    diag2 = ((rb - lt) ** 2).sum(-1)
    return dist2 / diag2.clamp(min=torch.finfo(dist2.dtype).tiny)


def box_iou_aligned(a: Tensor, b: Tensor, eps: float = 1e-6) -> Tensor:
    """IoU of matching rows: Tensor[N, 4], Tensor[N, 4] -> Tensor[N] (union floored at ``eps``)."""
    _check_boxes("box_iou_aligned(a=)", a)
    _check_boxes("box_iou_aligned(b=)", b)
    if a.shape != b.shape:
        raise ValueError(f"box_iou_aligned(a=, b=) expects boxes of the same shape. Got {tuple(a.shape)} and {tuple(b.shape)}.")
    lt = torch.max(a[:, :2], b[:, :2])
    rb = torch.min(a[:, 2:], b[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    union = box_area(a) + box_area(b) - inter
    # mmdetection's bbox_overlaps(is_aligned=True): the union is floored at eps.
    return inter / union.clamp(min=eps)


def box_giou_pairwise(a: Tensor, b: Tensor, eps: float = 1e-6) -> Tensor:
    """Generalised IoU of matching rows (mmdetection's ``bbox_overlaps(mode="giou", is_aligned=True)``).

    ``GIoU = IoU - (C - U) / C`` with C the area of the smallest enclosing box, U the
    union; ``eps`` is added to U and C as mmdetection does, so identical boxes give
    ``1 - eps/(area+eps)`` (not exactly 1 for tiny boxes) and degenerate ones no NaN.

    Args:
        a: Tensor[N, 4]. b: Tensor[N, 4].
    Returns:
        Tensor[N] in [-1, 1].
    """
    _check_boxes("box_giou_pairwise(a=)", a)
    _check_boxes("box_giou_pairwise(b=)", b)
    if a.shape != b.shape:
        raise ValueError(
            f"box_giou_pairwise(a=, b=) expects boxes of the same shape. Got {tuple(a.shape)} and {tuple(b.shape)}."
        )
    lt = torch.max(a[:, :2], b[:, :2])
    rb = torch.min(a[:, 2:], b[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    union = box_area(a) + box_area(b) - inter + eps
    iou = inter / union
    enclose_lt = torch.min(a[:, :2], b[:, :2])
    enclose_rb = torch.max(a[:, 2:], b[:, 2:])
    enclose_wh = (enclose_rb - enclose_lt).clamp(min=0)
    enclose = enclose_wh[:, 0] * enclose_wh[:, 1] + eps
    return iou - (enclose - union) / enclose
