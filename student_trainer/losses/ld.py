"""LD: Localization Distillation (Zheng et al., "Localization Distillation for Dense Object
Detection", CVPR 2022; released code: HikariTJU/LD on mmdetection).

Legend: M rows, N locations, K classes, R reg_max (each edge distribution has R + 1 bins).

All logits are raw. The teacher side is detached inside: it never receives gradient.
Weights are used as given (the recipes pass detached ones).
Inputs of any floating dtype are computed in float32 and the loss is float32.

Reduction convention (every function with ``weight`` and ``avg_factor``): the result is
``sum_i weight_i * l_i / avg_factor`` over the terms l_i; ``weight=None`` means 1 and
``avg_factor=None`` means the weighted terms are averaged. No terms give 0.

`imitation_loss` and `FeatureImitation` are the release's optional feature imitation
(``loss_im``), which the authors' training configs turn on next to the LD terms; the
paper's LD ("main KD + main LD + VLR LD") does not include it.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import (
    FEATURE_NORMALIZE,
    LossInputError,
    as_float32,
    check_same_shape,
    check_tensor,
    check_weight,
    describe,
    normalize_features,
    weighted_reduce,
)


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


def imitation_loss(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    """Feature imitation as released (``IMLoss``): the mean squared error over the N x C entries.

    Args:
        student_feat: Tensor[N, C], the (adapted) student features at the imitation region.
        teacher_feat: Tensor[N, C], detached inside.
    Returns:
        Scalar float32 Tensor (0, still connected to the graph, when N = 0).
    """
    check_tensor("student_feat", "imitation_loss", student_feat, 2, "[N, C]")
    check_tensor("teacher_feat", "imitation_loss", teacher_feat, 2, "[N, C]")
    check_same_shape("imitation_loss", "student_feat", student_feat, "teacher_feat", teacher_feat)
    diff = as_float32(student_feat) - as_float32(teacher_feat.detach())
    return (diff * diff).mean() if diff.numel() > 0 else diff.sum()


class FeatureImitation(nn.Module):
    """LD's released feature imitation on the FPN levels (``loss_im``, ``finegrained`` region).

    Per level, `imitation_loss` between the student's FPN features and the teacher's at
    the points of the imitation region (`detcore.assign.imitation_region`), pooled over
    the batch; the levels' losses are summed by the recipe. The release imitates 256
    channels with 256 and needs no adapter; where the widths differ, each level gets a
    trainable 1x1 convolution (with bias) from C_s to C_t, as FGD's ``align``.

    ``normalize="teacher_rms"`` (the default, as FGD's) first divides the adapted student
    and the teacher by the teacher level's root mean square over the batch, a detached
    scalar; ``"none"`` is the release. The release's weight (2) was set for mmdetection's
    COCO features; on the synthetic benchmark's teacher (FPN RMS 6-15) the raw squared
    error is ~100-400 per level against a detection loss of ~2.

    Args:
        student_channels: C_s.
        teacher_channels: C_t.
        num_levels: L.
        normalize: one of `FEATURE_NORMALIZE`.
    """

    def __init__(self, student_channels: int, teacher_channels: int, num_levels: int, normalize: str = "teacher_rms") -> None:
        super().__init__()
        if min(int(student_channels), int(teacher_channels), int(num_levels)) < 1:
            raise LossInputError(
                "FeatureImitation(student_channels=, teacher_channels=, num_levels=) expects positive integers. "
                f"Got {student_channels!r}, {teacher_channels!r}, {num_levels!r}."
            )
        if normalize not in FEATURE_NORMALIZE:
            raise LossInputError(f"FeatureImitation(normalize=) expects one of {list(FEATURE_NORMALIZE)}. Got {normalize!r}.")
        self.normalize = normalize
        self.student_channels, self.teacher_channels = int(student_channels), int(teacher_channels)
        self.adapters = (
            nn.ModuleList(nn.Conv2d(self.student_channels, self.teacher_channels, 1) for _ in range(int(num_levels)))
            if self.student_channels != self.teacher_channels
            else None
        )
        self.num_levels = int(num_levels)

    def extra_repr(self) -> str:
        return (
            f"student_channels={self.student_channels}, teacher_channels={self.teacher_channels}, "
            f"num_levels={self.num_levels}, normalize={self.normalize!r}"
        )

    def forward(self, student_fpn: Sequence[Tensor], teacher_fpn: Sequence[Tensor], region: Tensor) -> Tensor:
        """Args:
            student_fpn: per level Tensor[B, C_s, H_l, W_l].
            teacher_fpn: per level Tensor[B, C_t, H_l, W_l], detached inside.
            region: BoolTensor[B, A], A = sum of H_l * W_l (level-major, row-major).
        Returns:
            Tensor[L] float32: each level's loss (0 for a level without region points).
        """
        if not (len(student_fpn) == len(teacher_fpn) == self.num_levels):
            raise LossInputError(
                f"FeatureImitation(student_fpn=, teacher_fpn=) expect {self.num_levels} levels each. "
                f"Got {len(student_fpn)} and {len(teacher_fpn)}."
            )
        points = [int(f.shape[2] * f.shape[3]) for f in student_fpn]
        batch = student_fpn[0].shape[0]
        if not isinstance(region, Tensor) or tuple(region.shape) != (batch, sum(points)):
            raise LossInputError(
                f"FeatureImitation(region=) expects a BoolTensor[{batch}, {sum(points)}] (points per level {points}). "
                f"Got {describe(region)}."
            )
        losses, start = [], 0
        for level, (student, teacher) in enumerate(zip(student_fpn, teacher_fpn)):
            count = points[level]
            with torch.autocast(device_type=student.device.type, enabled=False):
                student = as_float32(student)
                teacher = as_float32(teacher.detach().to(student.device))
                if self.adapters is not None:
                    student = self.adapters[level](student)
                if teacher.shape != student.shape:
                    raise LossInputError(
                        f"FeatureImitation(teacher_fpn=) expects Tensor{list(student.shape)} at level {level} "
                        f"(the adapted student's shape). Got {describe(teacher)}."
                    )
                student, teacher = normalize_features(student, teacher, self.normalize)
                mask = region[:, start : start + count].reshape(-1).to(student.device)
                flat_s = student.permute(0, 2, 3, 1).reshape(-1, student.shape[1])
                flat_t = teacher.permute(0, 2, 3, 1).reshape(-1, teacher.shape[1])
                losses.append(imitation_loss(flat_s[mask], flat_t[mask]))
            start += count
        return torch.stack(losses)
