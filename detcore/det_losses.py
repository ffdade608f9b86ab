"""GFL's detection losses as pure, unreduced functions (Li et al., 2020; mmdetection's GFL).

Legend: N samples (points, or points x edges for DFL), K classes, R reg_max.
Each function returns one loss per sample; reductions, weights and normalisers live in
the caller (`detcore.models.gfl.GFLDetector.loss`) and in its run config.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from detcore.boxes import box_giou_pairwise


def quality_focal_loss(cls_logits: Tensor, quality_targets: Tensor, beta: float = 2.0) -> Tensor:
    """Quality Focal Loss, summed over classes.

    ``QFL(s, y) = BCE(s, y) * |y - sigmoid(s)|^beta`` per class, where ``y`` is the IoU
    quality at the assigned class of a positive point and 0 elsewhere. With this dense
    target it equals mmdetection's ``quality_focal_loss(pred, (label, score))``.

    Args:
        cls_logits: Tensor[N, K] sigmoid logits.
        quality_targets: Tensor[N, K] in [0, 1], same shape.
        beta: focusing exponent (2 in GFL).

    Returns:
        Tensor[N] float32.
    """
    if cls_logits.shape != quality_targets.shape or cls_logits.ndim != 2:
        raise ValueError(
            f"quality_focal_loss(cls_logits=, quality_targets=) expects two Tensor[N, K] of one shape. "
            f"Got {tuple(cls_logits.shape)} and {tuple(quality_targets.shape)}."
        )
    logits = cls_logits.float()
    targets = quality_targets.float()
    modulator = (targets - logits.sigmoid()).abs().pow(beta)
    return (F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * modulator).sum(dim=1)


def distribution_focal_loss(edge_logits: Tensor, edge_targets: Tensor) -> Tensor:
    """Distribution Focal Loss of one edge per row.

    The continuous target ``t`` in [0, R) is split between its two neighbouring bins
    ``floor(t)`` and ``floor(t) + 1`` with weights ``floor(t) + 1 - t`` and ``t - floor(t)``.

    Args:
        edge_logits: Tensor[N, R + 1] bin logits.
        edge_targets: Tensor[N] float in [0, R) (``boxes_to_distance`` clamps to R - 0.01).

    Returns:
        Tensor[N] float32.
    """
    if edge_logits.ndim != 2 or edge_targets.shape != edge_logits.shape[:1]:
        raise ValueError(
            f"distribution_focal_loss(edge_logits=, edge_targets=) expects Tensor[N, R + 1] and Tensor[N]. "
            f"Got {tuple(edge_logits.shape)} and {tuple(edge_targets.shape)}."
        )
    reg_max = edge_logits.shape[1] - 1
    targets = edge_targets.float()
    if targets.numel() and bool(((targets < 0) | (targets >= reg_max)).any()):
        raise ValueError(
            f"distribution_focal_loss(edge_targets=) expects values in [0, {reg_max}). "
            f"Got range [{targets.min().item():.4f}, {targets.max().item():.4f}]; clamp with boxes_to_distance."
        )
    logits = edge_logits.float()
    left = targets.long()
    right = left + 1
    weight_left = right.float() - targets
    weight_right = targets - left.float()
    return (
        F.cross_entropy(logits, left, reduction="none") * weight_left
        + F.cross_entropy(logits, right, reduction="none") * weight_right
    )


def giou_loss(pred_boxes: Tensor, target_boxes: Tensor, eps: float = 1e-6) -> Tensor:
    """``1 - GIoU`` of matching rows (mmdetection's ``GIoULoss`` before weighting).

    Args:
        pred_boxes: Tensor[N, 4] (x1, y1, x2, y2).
        target_boxes: Tensor[N, 4], same units.

    Returns:
        Tensor[N] in [0, 2].
    """
    return 1.0 - box_giou_pairwise(pred_boxes.float(), target_boxes.float(), eps=eps)
