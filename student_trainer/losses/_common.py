"""Shared plumbing of the distillation losses: input checks, precision, reduction.

Every loss computes in float32, whatever its inputs' dtype: fp16 and bf16 inputs are cast
up (the cast is differentiable, so the gradient flows back in the input's dtype) and the
loss is returned as float32. Tempered softmaxes and the squared errors of 256-channel
features lose too much in half precision.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


class LossInputError(ValueError):
    """A distillation loss got tensors of the wrong shape, dtype or length."""


def describe(x) -> str:
    """Short description of an argument for error messages."""
    if isinstance(x, Tensor):
        return f"Tensor{list(x.shape)} ({x.dtype})"
    if isinstance(x, (list, tuple)):
        return f"{type(x).__name__} of length {len(x)}"
    return repr(x)


def check_tensor(name: str, owner: str, x, ndim: int, expected: str) -> None:
    """Raise `LossInputError` unless ``x`` is a floating tensor with ``ndim`` dimensions."""
    if not isinstance(x, Tensor) or x.dim() != ndim or not x.is_floating_point():
        raise LossInputError(f"{owner}({name}=) expects a floating Tensor{expected}. Got {describe(x)}.")


def check_same_shape(owner: str, student_name: str, student: Tensor, teacher_name: str, teacher: Tensor) -> None:
    if student.shape != teacher.shape:
        raise LossInputError(
            f"{owner}({teacher_name}=) expects the shape of {student_name}, {list(student.shape)}. "
            f"Got {list(teacher.shape)}."
        )


def check_weight(owner: str, weight: Tensor | None, num: int) -> None:
    if weight is None:
        return
    if not isinstance(weight, Tensor) or weight.shape != (num,):
        raise LossInputError(
            f"{owner}(weight=) expects None or a Tensor[{num}] (one weight per location). Got {describe(weight)}."
        )


def check_gt_boxes(owner: str, gt_boxes: Sequence[Tensor], batch: int) -> None:
    if len(gt_boxes) != batch:
        raise LossInputError(
            f"{owner}(gt_boxes=) expects one Tensor[M, 4] per image ({batch} images). Got {describe(gt_boxes)}."
        )
    for i, boxes in enumerate(gt_boxes):
        if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4:
            raise LossInputError(
                f"{owner}(gt_boxes=) expects Tensor[M, 4] (x1, y1, x2, y2) canvas pixels per image. "
                f"Got {describe(boxes)} for image {i} of the batch."
            )


def as_float32(x: Tensor) -> Tensor:
    """Cast half-precision (or float64) input to float32; a no-op for float32."""
    return x if x.dtype == torch.float32 else x.float()


def weighted_reduce(terms: Tensor, weight: Tensor | None, avg_factor: float | Tensor | None, owner: str) -> Tensor:
    """``sum_i weight_i * terms_i / avg_factor``; the mean of the weighted terms when avg_factor is None.

    No terms give a zero that stays connected to the graph (never NaN from an empty mean).
    A Python avg_factor must be positive; a tensor one is used as given (no device sync).
    """
    if weight is not None:
        terms = terms * as_float32(weight)
    if avg_factor is None:
        return terms.mean() if terms.numel() > 0 else terms.sum()
    if not isinstance(avg_factor, Tensor) and not avg_factor > 0:
        raise LossInputError(f"{owner}(avg_factor=) expects None or a positive number. Got {avg_factor!r}.")
    return terms.sum() / avg_factor


FEATURE_NORMALIZE = ("teacher_rms", "none")
"""Feature scalings the feature losses (FGD, LD's imitation) accept: ``teacher_rms`` divides
student and teacher by the teacher level's root mean square over the batch (a detached
scalar), ``none`` leaves them as they are (the released code)."""


def normalize_features(student: Tensor, teacher: Tensor, mode: str) -> tuple[Tensor, Tensor]:
    """Apply a `FEATURE_NORMALIZE` mode to one level's (aligned) student and teacher features."""
    if mode == "teacher_rms":
        scale = teacher.detach().pow(2).mean().sqrt().clamp(min=1e-6)
        return student / scale, teacher / scale
    return student, teacher
