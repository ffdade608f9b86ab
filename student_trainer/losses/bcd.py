"""BCD: Bridging Cross-task Protocol Inconsistency for Distillation in Dense Object
Detection (Yang et al., ICCV 2023; released code: TinyTigerPan/BCKD on mmdetection).

Legend: N locations, K classes; boxes are ``(x1, y1, x2, y2)``.

Logits are raw (sigmoid classifier). The teacher side is detached inside. Inputs of any
floating dtype are computed in float32 and the loss is float32. Reduction: the result is
``sum_i weight_i * l_i / avg_factor``; ``weight=None`` means 1, ``avg_factor=None`` means the
weighted terms are averaged; no terms give 0. Weights are used as given (the recipe
passes detached ones).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import LossInputError, as_float32, check_same_shape, check_tensor, check_weight, weighted_reduce

# The released IoU-based loss clamps union and enclosing area here.
GIOU_EPS = 1e-6


def bcd_cls_loss(
    student_cls_logits: Tensor,
    teacher_cls_logits: Tensor,
    weight: Tensor | None = None,
    avg_factor: float | Tensor | None = None,
    beta: float = 1.0,
) -> Tensor:
    """Binary classification distillation, quality-focal style.

    Per location ``l_n = sum_k BCE(s_nk, sigmoid(t_nk)) * |sigmoid(t_nk) - sigmoid(s_nk)|**beta``,
    where BCE(x, y) = -(y log sigmoid(x) + (1 - y) log(1 - sigmoid(x))) takes the student
    logit. The modulating factor keeps its gradient (as in QFL and the release). With
    ``beta > 0`` the loss is 0 where student equals teacher.

    Args:
        student_cls_logits: Tensor[N, K].
        teacher_cls_logits: Tensor[N, K], detached inside.
        weight: None or Tensor[N].
        avg_factor: None, a positive number or a scalar Tensor (the recipe: number of positives).
        beta: exponent of the modulating factor, >= 0 (1 in the released config).
    Returns:
        Scalar float32 Tensor.
    """
    check_tensor("student_cls_logits", "bcd_cls_loss", student_cls_logits, 2, "[N, K]")
    check_tensor("teacher_cls_logits", "bcd_cls_loss", teacher_cls_logits, 2, "[N, K]")
    check_same_shape("bcd_cls_loss", "student_cls_logits", student_cls_logits, "teacher_cls_logits", teacher_cls_logits)
    check_weight("bcd_cls_loss", weight, student_cls_logits.shape[0])
    if not beta >= 0:
        raise LossInputError(f"bcd_cls_loss(beta=) expects a number >= 0. Got {beta!r}.")
    student = as_float32(student_cls_logits)
    teacher_prob = as_float32(teacher_cls_logits.detach()).sigmoid()
    bce = F.binary_cross_entropy_with_logits(student, teacher_prob, reduction="none")
    gap = (teacher_prob - student.sigmoid()).abs()
    if beta == 0:
        factor = torch.ones_like(gap)
    elif beta < 1:
        # d|x|^beta/dx is infinite at 0 for beta < 1: exact zeros take the (zero) constant branch.
        nonzero = gap > 0
        factor = torch.where(nonzero, torch.where(nonzero, gap, 1.0).pow(beta), 0.0)
    else:
        factor = gap.pow(beta)
    per_location = (bce * factor).sum(dim=1)
    return weighted_reduce(per_location, weight, avg_factor, "bcd_cls_loss")


def aligned_giou(boxes1: Tensor, boxes2: Tensor, eps: float = GIOU_EPS) -> Tensor:
    """GIoU of row i of ``boxes1`` with row i of ``boxes2``; Tensor[N, 4] each -> Tensor[N].

    Union and enclosing area are clamped at ``eps`` (degenerate boxes give finite values).
    """
    area1 = (boxes1[:, 2] - boxes1[:, 0]).clamp(min=0) * (boxes1[:, 3] - boxes1[:, 1]).clamp(min=0)
    area2 = (boxes2[:, 2] - boxes2[:, 0]).clamp(min=0) * (boxes2[:, 3] - boxes2[:, 1]).clamp(min=0)
    left_top = torch.maximum(boxes1[:, :2], boxes2[:, :2])
    right_bottom = torch.minimum(boxes1[:, 2:], boxes2[:, 2:])
    overlap = (right_bottom - left_top).clamp(min=0).prod(dim=1)
    union = (area1 + area2 - overlap).clamp(min=eps)
    enclose_wh = (torch.maximum(boxes1[:, 2:], boxes2[:, 2:]) - torch.minimum(boxes1[:, :2], boxes2[:, :2])).clamp(min=0)
    enclose = enclose_wh.prod(dim=1).clamp(min=eps)
    return overlap / union - (enclose - union) / enclose


def iou_ld_loss(
    student_boxes: Tensor,
    teacher_boxes: Tensor,
    weight: Tensor | None = None,
    avg_factor: float | Tensor | None = None,
) -> Tensor:
    """IoU-based localization distillation: ``l_n = 1 - GIoU(student_n, teacher_n)``.

    Args:
        student_boxes: Tensor[N, 4] (x1, y1, x2, y2), e.g. decoded from the expected edges.
        teacher_boxes: Tensor[N, 4], detached inside.
        weight: None or Tensor[N] (the recipe: max_k |sigmoid(t) - sigmoid(s)|, detached).
        avg_factor: None, a positive number or a scalar Tensor.
    Returns:
        Scalar float32 Tensor; 0 for identical boxes.
    """
    check_tensor("student_boxes", "iou_ld_loss", student_boxes, 2, "[N, 4]")
    check_tensor("teacher_boxes", "iou_ld_loss", teacher_boxes, 2, "[N, 4]")
    if student_boxes.shape[1] != 4:
        raise LossInputError(f"iou_ld_loss(student_boxes=) expects Tensor[N, 4]. Got {list(student_boxes.shape)}.")
    check_same_shape("iou_ld_loss", "student_boxes", student_boxes, "teacher_boxes", teacher_boxes)
    check_weight("iou_ld_loss", weight, student_boxes.shape[0])
    giou = aligned_giou(as_float32(student_boxes), as_float32(teacher_boxes.detach()))
    return weighted_reduce(1.0 - giou, weight, avg_factor, "iou_ld_loss")
