"""LD: Localization Distillation (Zheng et al., "Localization Distillation for Dense Object
Detection", CVPR 2022; released code: HikariTJU/LD on mmdetection).

Legend: M rows, N locations, K classes, R reg_max (each edge distribution has R + 1 bins).

All logits are raw. The teacher side is detached inside: it never receives gradient.
Weights are used as given (the recipes pass detached ones).
Inputs of any floating dtype are computed in float32 and the loss is float32.

Reduction convention (every function with ``weight`` and ``avg_factor``): the result is
``sum_i weight_i * l_i / avg_factor`` over the terms l_i; ``weight=None`` means 1 and
``avg_factor=None`` means the weighted terms are averaged. No terms give 0.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ._common import as_float32, check_same_shape, check_tensor, check_weight, weighted_reduce, LossInputError


def kd_kl_div(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Tempered KL divergence per row, averaged over the K entries (the released convention).

    ``T**2 * (1/K) * sum_k p_k (log p_k - log q_k)`` with ``p = softmax(teacher / T)`` and
    ``q = softmax(student / T)``. The mean over K, not the sum, is what the released
    ``KnowledgeDistillationKLDivLoss`` computes; loss weights are tuned for it.

    Args:
        student_logits: Tensor[M, K].
        teacher_logits: Tensor[M, K], detached inside.
        temperature: T > 0.
    Returns:
        Tensor[M] float32.
    """
    check_tensor("student_logits", "kd_kl_div", student_logits, 2, "[M, K]")
    check_tensor("teacher_logits", "kd_kl_div", teacher_logits, 2, "[M, K]")
    check_same_shape("kd_kl_div", "student_logits", student_logits, "teacher_logits", teacher_logits)
    if not temperature > 0:
        raise LossInputError(f"kd_kl_div(temperature=) expects a positive number. Got {temperature!r}.")
    log_q = F.log_softmax(as_float32(student_logits) / temperature, dim=1)
    log_p = F.log_softmax(as_float32(teacher_logits.detach()) / temperature, dim=1)
    # log_target keeps the teacher's tail exact where softmax would underflow to 0.
    kl = F.kl_div(log_q, log_p, reduction="none", log_target=True)
    return kl.mean(dim=1) * (temperature * temperature)


def ld_loss(
    student_box_logits: Tensor,
    teacher_box_logits: Tensor,
    weight: Tensor | None = None,
    avg_factor: float | Tensor | None = None,
    temperature: float = 10.0,
) -> Tensor:
    """Localization distillation between edge distributions.

    The terms are the 4N edge rows (left, top, right, bottom of each location), each a
    `kd_kl_div` over its R + 1 bins; a location's weight applies to its four edges:
    ``sum_n weight_n * sum_e kd_kl_div(s_ne, t_ne, T) / avg_factor`` (or the mean of the 4N
    weighted rows when ``avg_factor`` is None).

    Args:
        student_box_logits: Tensor[N, 4*(R+1)], channel ``e*(R+1) + j`` is bin j of edge e.
        teacher_box_logits: Tensor[N, 4*(R+1)], detached inside.
        weight: None or Tensor[N], one weight per location.
        avg_factor: None, a positive number or a scalar Tensor.
        temperature: T (10 in the released GFL recipe).
    Returns:
        Scalar float32 Tensor.
    """
    check_tensor("student_box_logits", "ld_loss", student_box_logits, 2, "[N, 4*(R+1)]")
    check_tensor("teacher_box_logits", "ld_loss", teacher_box_logits, 2, "[N, 4*(R+1)]")
    check_same_shape("ld_loss", "student_box_logits", student_box_logits, "teacher_box_logits", teacher_box_logits)
    num, channels = student_box_logits.shape
    if channels % 4 != 0 or channels < 8:
        raise LossInputError(
            f"ld_loss(student_box_logits=) expects Tensor[N, 4*(R+1)] with R >= 1. Got {list(student_box_logits.shape)}."
        )
    check_weight("ld_loss", weight, num)
    bins = channels // 4
    rows = kd_kl_div(student_box_logits.reshape(num * 4, bins), teacher_box_logits.reshape(num * 4, bins), temperature)
    edge_weight = None if weight is None else weight[:, None].expand(num, 4).reshape(-1)
    return weighted_reduce(rows, edge_weight, avg_factor, "ld_loss")


def kd_cls_loss(
    student_cls_logits: Tensor,
    teacher_cls_logits: Tensor,
    weight: Tensor | None = None,
    avg_factor: float | Tensor | None = None,
    temperature: float = 2.0,
) -> Tensor:
    """Classification KD of the LD recipe: one `kd_kl_div` term per location over its K classes.

    The released code applies a softmax over the classes even though the detector's
    classifier is a sigmoid one; kept as released.

    Args:
        student_cls_logits: Tensor[N, K].
        teacher_cls_logits: Tensor[N, K], detached inside.
        weight: None or Tensor[N].
        avg_factor: None, a positive number or a scalar Tensor.
        temperature: T (2 in the released GFL recipe).
    Returns:
        Scalar float32 Tensor.
    """
    check_tensor("student_cls_logits", "kd_cls_loss", student_cls_logits, 2, "[N, K]")
    check_tensor("teacher_cls_logits", "kd_cls_loss", teacher_cls_logits, 2, "[N, K]")
    check_same_shape("kd_cls_loss", "student_cls_logits", student_cls_logits, "teacher_cls_logits", teacher_cls_logits)
    check_weight("kd_cls_loss", weight, student_cls_logits.shape[0])
    rows = kd_kl_div(student_cls_logits, teacher_cls_logits, temperature)
    return weighted_reduce(rows, weight, avg_factor, "kd_cls_loss")
