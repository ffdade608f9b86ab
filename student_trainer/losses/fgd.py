"""FGD: Focal and Global Knowledge Distillation for Detectors (Yang et al., CVPR 2022;
released code: yzd-v/FGD on mmdetection, ``FeatureLoss``).

Legend: B images, C channels (C_s student, C_t teacher), H x W the level's map,
M_b GT boxes of image b in canvas pixels ``(x1, y1, x2, y2)``.

One `FGDLoss` module per FPN level. Features of any floating dtype are computed in float32
(autocast is switched off inside the module) and the losses are float32. The teacher
feature is detached inside; the loss's own modules (align conv, both GcBlocks) train.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from student_trainer.config import FGD_DEFAULTS

from ._common import FEATURE_NORMALIZE, LossInputError, as_float32, check_gt_boxes, check_tensor, describe, normalize_features

FGD_NORMALIZE = FEATURE_NORMALIZE
"""Feature scalings `FGDLoss` accepts before the loss (see its docstring)."""


def fgd_attention(feat: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Spatial and channel attention of a feature map.

    ``spatial = H*W * softmax_{hw}(mean_c |F| / T)`` and
    ``channel = C * softmax_c(mean_{hw} |F| / T)``; both average to 1.

    Args:
        feat: Tensor[B, C, H, W].
        temperature: T > 0.
    Returns:
        (spatial Tensor[B, H, W], channel Tensor[B, C]), float32.
    """
    check_tensor("feat", "fgd_attention", feat, 4, "[B, C, H, W]")
    if not temperature > 0:
        raise LossInputError(f"fgd_attention(temperature=) expects a positive number. Got {temperature!r}.")
    batch, channels, height, width = feat.shape
    value = as_float32(feat).abs()
    spatial_map = value.mean(dim=1).reshape(batch, height * width)
    spatial = (height * width * F.softmax(spatial_map / temperature, dim=1)).reshape(batch, height, width)
    channel_map = value.mean(dim=(2, 3))
    channel = channels * F.softmax(channel_map / temperature, dim=1)
    return spatial, channel


def fgd_masks(gt_boxes: Sequence[Tensor], canvas_hw: tuple[int, int], H: int, W: int) -> tuple[Tensor, Tensor]:
    """Foreground and background masks of FGD at an H x W map, without a loop over boxes.

    Each box maps to cells ``x1' = floor(x1*W/canvas_w)`` .. ``x2' = ceil(x2*W/canvas_w)`` and
    likewise in y (inclusive, clipped to the map); its cells take
    ``max(current, 1 / ((y2' - y1' + 1) * (x2' - x1' + 1)))`` (area before clipping, as
    released), so each box's mass is at most 1 and small boxes weigh as much as large ones.
    Background is 1 where foreground is 0, divided by the number of such cells (all 0 when
    the foreground covers the map).

    Args:
        gt_boxes: per image Tensor[M_b, 4] in canvas pixels (M_b may be 0).
        canvas_hw: (canvas_h, canvas_w) in pixels.
        H, W: map size.
    Returns:
        (foreground Tensor[B, H, W], background Tensor[B, H, W]), float32, on the boxes' device.
    """
    check_gt_boxes("fgd_masks", gt_boxes, len(gt_boxes))
    canvas_h, canvas_w = canvas_hw
    if not (canvas_h > 0 and canvas_w > 0 and H > 0 and W > 0):
        raise LossInputError(
            f"fgd_masks(canvas_hw=, H=, W=) expects positive sizes. Got canvas_hw={canvas_hw!r}, H={H!r}, W={W!r}."
        )
    device = gt_boxes[0].device if len(gt_boxes) else torch.device("cpu")
    rows = torch.arange(H, device=device)
    cols = torch.arange(W, device=device)
    foregrounds = []
    for boxes in gt_boxes:  # images, not boxes: each image's boxes are one broadcast
        boxes = boxes.detach().to(device=device, dtype=torch.float64)
        x1 = torch.floor(boxes[:, 0] * W / canvas_w).long()
        y1 = torch.floor(boxes[:, 1] * H / canvas_h).long()
        x2 = torch.ceil(boxes[:, 2] * W / canvas_w).long()
        y2 = torch.ceil(boxes[:, 3] * H / canvas_h).long()
        inside_y = (rows[None, :] >= y1[:, None]) & (rows[None, :] <= y2[:, None])  # [M, H]
        inside_x = (cols[None, :] >= x1[:, None]) & (cols[None, :] <= x2[:, None])  # [M, W]
        inside = inside_y[:, :, None] & inside_x[:, None, :]  # [M, H, W]
        # Cells outside a box never read its value, so a degenerate box's inf is harmless.
        value = 1.0 / ((y2 - y1 + 1) * (x2 - x1 + 1)).to(torch.float32)
        cell_values = torch.where(inside, value[:, None, None], torch.zeros((), device=device))
        foreground = cell_values.amax(dim=0) if boxes.shape[0] else torch.zeros(H, W, device=device)
        foregrounds.append(foreground)
    foreground = torch.stack(foregrounds) if foregrounds else torch.zeros(0, H, W)
    background = (foreground == 0).to(torch.float32)
    count = background.sum(dim=(1, 2), keepdim=True)
    background = background / count.clamp(min=1)
    return foreground, background


class GcBlock(nn.Module):
    """Global context block of the FGD release (GCNet's context modelling and channel add).

    ``out = x + transform(context(x))``: the context is ``sum_hw softmax_hw(conv_mask(x)) * x``
    (Tensor[B, C, 1, 1]); the transform is conv1x1(C -> C/2) -> LayerNorm([C/2, 1, 1]) ->
    ReLU -> conv1x1(C/2 -> C), whose last convolution starts at zero (weights and bias),
    so a fresh block is the identity.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        if channels < 2:
            raise LossInputError(f"GcBlock(channels=) expects at least 2 channels. Got {channels!r}.")
        hidden = channels // 2
        self.conv_mask = nn.Conv2d(channels, 1, kernel_size=1)
        self.channel_add = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1),
            nn.LayerNorm([hidden, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, kernel_size=1),
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The release: kaiming (fan_in) for the attention conv, zero for the last conv.
        nn.init.kaiming_normal_(self.conv_mask.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.conv_mask.bias)
        nn.init.zeros_(self.channel_add[-1].weight)
        nn.init.zeros_(self.channel_add[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        """Tensor[B, C, H, W] -> Tensor[B, C, H, W]."""
        batch, channels, height, width = x.shape
        attention = F.softmax(self.conv_mask(x).reshape(batch, 1, height * width), dim=2)  # [B, 1, HW]
        context = torch.bmm(x.reshape(batch, channels, height * width), attention.transpose(1, 2))  # [B, C, 1]
        return x + self.channel_add(context.reshape(batch, channels, 1, 1))


class FGDLoss(nn.Module):
    """FGD for one FPN level.

    With S the (aligned) student feature and T the teacher feature, Tensor[B, C_t, H, W],
    spatial/channel attentions A^S, A^C from `fgd_attention` and masks from `fgd_masks`:

        fg       = sum fg_mask * A^S_T * A^C_T * (S - T)^2 / B
        bg       = sum bg_mask * A^S_T * A^C_T * (S - T)^2 / B
        mask     = (sum |A^C_S - A^C_T| + sum |A^S_S - A^S_T|) / B
        relation = sum (GC_s(S) - GC_t(T))^2 / B          (GC(x) = x + context transform)
        total    = alpha * fg + beta * bg + gamma * mask + lambda_ * relation

    The attentions of the teacher are constants; the student's attention keeps its gradient
    in the mask term (as released). ``align`` is a 1x1 convolution with bias when C_s != C_t.
    The hyper-parameters are the released ones per family (`FGD_DEFAULTS`, `for_family`).

    ``normalize="none"`` (the default) is the released code exactly.
    ``normalize="teacher_rms"`` (what the training recipe, `FGDConfig`, chooses) first
    divides S (after ``align``) and T by the teacher level's root mean square over the
    batch (a detached scalar), so the released weights and temperature meet features of
    unit scale whatever the teacher's FPN magnitude. Why the recipe does: the released
    weights were tuned on mmdetection's COCO teachers; a from-scratch teacher here has FPN
    features with RMS 6-15, where mean|F| / T ~ 20 turns the spatial attention into a
    near one-hot map (one cell weighted H*W) and the weighted term outgrows the detection
    loss 25-fold (docs/losses.md, "FGD feature scale").
    """

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        temperature: float = 0.5,
        alpha: float = 1e-3,
        beta: float = 5e-4,
        gamma: float = 5e-4,
        lambda_: float = 5e-6,
        normalize: str = "none",
    ) -> None:
        super().__init__()
        if not temperature > 0:
            raise LossInputError(f"FGDLoss(temperature=) expects a positive number. Got {temperature!r}.")
        if normalize not in FGD_NORMALIZE:
            raise LossInputError(f"FGDLoss(normalize=) expects one of {list(FGD_NORMALIZE)}. Got {normalize!r}.")
        self.normalize = normalize
        self.student_channels = int(student_channels)
        self.teacher_channels = int(teacher_channels)
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.gamma = float(gamma)
        self.lambda_ = float(lambda_)
        self.align = (
            nn.Conv2d(student_channels, teacher_channels, kernel_size=1) if student_channels != teacher_channels else None
        )
        self.student_gc = GcBlock(teacher_channels)
        self.teacher_gc = GcBlock(teacher_channels)

    @classmethod
    def for_family(cls, family: str, student_channels: int, teacher_channels: int) -> "FGDLoss":
        """The released hyper-parameters of ``family`` (``retinanet``, ``gfl``, ``fcos``)."""
        if family not in FGD_DEFAULTS:
            raise LossInputError(f"FGDLoss.for_family(family=) expects one of {sorted(FGD_DEFAULTS)}. Got {family!r}.")
        return cls(student_channels, teacher_channels, **FGD_DEFAULTS[family])

    def extra_repr(self) -> str:
        return (
            f"student_channels={self.student_channels}, teacher_channels={self.teacher_channels}, "
            f"temperature={self.temperature}, alpha={self.alpha}, beta={self.beta}, gamma={self.gamma}, lambda_={self.lambda_}, "
            f"normalize={self.normalize!r}"
        )

    def _check(self, student_feat: Tensor, teacher_feat: Tensor, gt_boxes: Sequence[Tensor]) -> None:
        check_tensor("student_feat", "FGDLoss.forward", student_feat, 4, f"[B, {self.student_channels}, H, W]")
        check_tensor("teacher_feat", "FGDLoss.forward", teacher_feat, 4, f"[B, {self.teacher_channels}, H, W]")
        if student_feat.shape[1] != self.student_channels:
            raise LossInputError(
                f"FGDLoss.forward(student_feat=) expects Tensor[B, {self.student_channels}, H, W]. "
                f"Got {describe(student_feat)}."
            )
        expected = (student_feat.shape[0], self.teacher_channels, *student_feat.shape[2:])
        if tuple(teacher_feat.shape) != expected:
            raise LossInputError(
                f"FGDLoss.forward(teacher_feat=) expects Tensor{list(expected)} (the student's batch and map). "
                f"Got {describe(teacher_feat)}."
            )
        check_gt_boxes("FGDLoss.forward", gt_boxes, student_feat.shape[0])

    def forward(
        self, student_feat: Tensor, teacher_feat: Tensor, gt_boxes: Sequence[Tensor], canvas_hw: tuple[int, int]
    ) -> dict[str, Tensor]:
        """Losses of one level.

        Args:
            student_feat: Tensor[B, C_s, H, W].
            teacher_feat: Tensor[B, C_t, H, W], detached inside.
            gt_boxes: per image Tensor[M_b, 4] in canvas pixels.
            canvas_hw: (canvas_h, canvas_w).
        Returns:
            dict of float32 scalars ``total``, ``fg``, ``bg``, ``mask``, ``relation`` (the last
            four unweighted).
        """
        self._check(student_feat, teacher_feat, gt_boxes)
        with torch.autocast(device_type=student_feat.device.type, enabled=False):
            student = as_float32(student_feat)
            teacher = as_float32(teacher_feat.detach().to(student_feat.device))
            if self.align is not None:
                student = self.align(student)
            student, teacher = normalize_features(student, teacher, self.normalize)
            batch, _, height, width = student.shape
            spatial_t, channel_t = fgd_attention(teacher, self.temperature)
            spatial_s, channel_s = fgd_attention(student, self.temperature)
            foreground, background = fgd_masks([b.to(student.device) for b in gt_boxes], canvas_hw, height, width)

            squared = (student - teacher).pow(2) * channel_t[:, :, None, None]  # [B, C, H, W]
            weighted = squared.sum(dim=1) * spatial_t  # [B, H, W]
            fg = (weighted * foreground).sum() / batch
            bg = (weighted * background).sum() / batch
            mask = ((channel_s - channel_t).abs().sum() + (spatial_s - spatial_t).abs().sum()) / batch
            relation = (self.student_gc(student) - self.teacher_gc(teacher)).pow(2).sum() / batch
            total = self.alpha * fg + self.beta * bg + self.gamma * mask + self.lambda_ * relation
        return {"total": total, "fg": fg, "bg": bg, "mask": mask, "relation": relation}
