"""HGD: this project's interpretation of Hands-on Guidance Distillation (Qin, Ling, He, Shi,
Wu, "Hands-on Guidance for Distilling Object Detectors", ICME 2021, arXiv:2103.14337).

THIS IS AN INTERPRETATION, NOT A REPRODUCTION. There is no public code and the full text
was not available to us. The abstract names four mechanisms: the method "distills the
latent knowledge of all stage features", with "correspondence establishment for
consistency, hands-on imitation loss measure and re-weighted optimization from both micro
and macro perspectives". Each is given a concrete, documented form below; none of the
formulas is the paper's.

Legend: B images, S stages (backbone c3..c5 and FPN p3..p7 by default), C_s / C_t student
and teacher channels of a stage, H x W the teacher's map of the stage, M_b GT boxes of
image b in canvas pixels.

For each stage s with student feature X_s Tensor[B, C_s, h, w] and teacher T_s
Tensor[B, C_t, H, W]:

1. Correspondence: ``A_s = resize_{H,W}(conv1x1_s(X_s))``, a trainable 1x1 convolution
   (with bias) from student to teacher channels (initialised to the identity when the
   channel counts agree), then bilinear resizing when the student map size differs.
2. Hands-on imitation on channel-normalised features: at every location,
   ``n(v) = v / sqrt(mean_c v_c^2 + eps)`` (a LayerNorm-free RMS normalisation across
   channels) and ``l_s(b, y, x) = mean_c (n(A_s) - n(T_s))_c^2``, in [0, 4] (2 - 2 cos of the
   angle between the two channel vectors). The student imitates what the teacher encodes
   at a location, independent of the stage's activation scale.
3. Micro re-weighting (per location): ``m_s = fg + rho * bg`` with FGD's masks at the
   stage's resolution (`fgd_masks`: 1/area inside GT boxes, so each object has mass <= 1
   whatever its size; background 1/N_bg). Per image
   ``L_s(b) = sum_yx m_s * l_s / sum_yx m_s`` and ``L_s = mean_b L_s(b)``: every object
   counts as much as any other, the whole background as rho objects (rho = 0.5 mirrors
   FGD's beta/alpha). Without GT the image's loss is the plain mean over locations.
4. Macro re-weighting (per stage): ``w_s = S * L_s^gamma / sum_s' L_s'^gamma`` with the
   L_s detached, so the weights sum to S. The normalisation in 2 already puts all stages
   on one scale; the macro weights then steer the guidance to the stages where the student
   lags most (gamma = 1), which drives the stages' imitation errors towards one another.
   gamma = 0 gives equal weights. When every L_s is 0 the weights are equal.

``total = sum_s w_s * L_s``. The teacher features are detached inside; the adapters train.
Features of any floating dtype are computed in float32 and the losses are float32.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import LossInputError, as_float32, check_gt_boxes, check_tensor, describe
from .fgd import fgd_masks



def channel_rms_normalize(feat: Tensor, eps: float = 1e-6) -> Tensor:
    """``v / sqrt(mean_c v_c^2 + eps)`` at every location of Tensor[B, C, H, W]."""
    return feat * torch.rsqrt(feat.pow(2).mean(dim=1, keepdim=True) + eps)


class HGDLoss(nn.Module):
    """Hands-on guidance distillation over all stages (an interpretation; see the module doc).

    Args:
        student_channels: channels per stage of the student, e.g. ``{"c3": 64, ..., "p7": 64}``.
        teacher_channels: channels per stage of the teacher; same stage names.
        background_weight: rho, the mass of the whole background relative to one object (>= 0).
        macro_power: gamma of the macro weights (>= 0; 0 gives equal stage weights).
        eps: of the RMS normalisation.
    """

    def __init__(
        self,
        student_channels: Mapping[str, int],
        teacher_channels: Mapping[str, int],
        background_weight: float = 0.5,
        macro_power: float = 1.0,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if not student_channels or set(student_channels) != set(teacher_channels):
            raise LossInputError(
                f"HGDLoss(teacher_channels=) expects the stage names of student_channels, {sorted(student_channels)}. "
                f"Got {sorted(teacher_channels)}."
            )
        if not background_weight >= 0:
            raise LossInputError(f"HGDLoss(background_weight=) expects a number >= 0. Got {background_weight!r}.")
        if not macro_power >= 0:
            raise LossInputError(f"HGDLoss(macro_power=) expects a number >= 0. Got {macro_power!r}.")
        self.stages = tuple(student_channels)
        self.student_channels = {s: int(student_channels[s]) for s in self.stages}
        self.teacher_channels = {s: int(teacher_channels[s]) for s in self.stages}
        self.background_weight = float(background_weight)
        self.macro_power = float(macro_power)
        self.eps = float(eps)
        self.adapters = nn.ModuleDict(
            {s: nn.Conv2d(self.student_channels[s], self.teacher_channels[s], kernel_size=1) for s in self.stages}
        )
        for stage, adapter in self.adapters.items():
            if self.student_channels[stage] == self.teacher_channels[stage]:
                # Start from the plain imitation the adapter can only improve on.
                with torch.no_grad():
                    adapter.weight.copy_(torch.eye(self.teacher_channels[stage])[:, :, None, None])
                    adapter.bias.zero_()

    def extra_repr(self) -> str:
        return f"stages={self.stages}, background_weight={self.background_weight}, macro_power={self.macro_power}"

    def _check(self, student_feats: Mapping[str, Tensor], teacher_feats: Mapping[str, Tensor], gt_boxes) -> int:
        for name, feats in (("student_feats", student_feats), ("teacher_feats", teacher_feats)):
            if set(feats) != set(self.stages):
                raise LossInputError(f"HGDLoss.forward({name}=) expects the stages {sorted(self.stages)}. Got {sorted(feats)}.")
        batch = None
        for stage in self.stages:
            student, teacher = student_feats[stage], teacher_feats[stage]
            for name, feat, channels in (
                ("student_feats", student, self.student_channels[stage]),
                ("teacher_feats", teacher, self.teacher_channels[stage]),
            ):
                check_tensor(name, "HGDLoss.forward", feat, 4, f"[B, {channels}, H, W] for stage {stage}")
            batch = student.shape[0] if batch is None else batch
            if student.shape[0] != batch or student.shape[1] != self.student_channels[stage]:
                raise LossInputError(
                    f"HGDLoss.forward(student_feats=) expects Tensor[{batch}, {self.student_channels[stage]}, H, W] "
                    f"for stage {stage}. Got {describe(student)}."
                )
            if teacher.shape[0] != batch or teacher.shape[1] != self.teacher_channels[stage]:
                raise LossInputError(
                    f"HGDLoss.forward(teacher_feats=) expects Tensor[{batch}, {self.teacher_channels[stage]}, H, W] "
                    f"for stage {stage}. Got {describe(teacher)}."
                )
        check_gt_boxes("HGDLoss.forward", gt_boxes, batch)
        return batch

    def stage_loss(
        self, stage: str, student_feat: Tensor, teacher_feat: Tensor, gt_boxes: Sequence[Tensor], canvas_hw: tuple[int, int]
    ) -> Tensor:
        """Micro-weighted imitation loss L_s of one stage (float32 scalar); inputs as in `forward`."""
        teacher = as_float32(teacher_feat.detach().to(student_feat.device))
        adapted = self.adapters[stage](as_float32(student_feat))
        height, width = teacher.shape[-2:]
        if adapted.shape[-2:] != teacher.shape[-2:]:
            adapted = F.interpolate(adapted, size=(height, width), mode="bilinear", align_corners=False)
        per_location = (channel_rms_normalize(adapted, self.eps) - channel_rms_normalize(teacher, self.eps)).pow(2).mean(dim=1)
        foreground, background = fgd_masks([b.to(teacher.device) for b in gt_boxes], canvas_hw, height, width)
        micro = foreground + self.background_weight * background  # [B, H, W]
        mass = micro.sum(dim=(1, 2))
        per_image = (micro * per_location).sum(dim=(1, 2)) / mass.clamp(min=torch.finfo(torch.float32).tiny)
        return per_image.mean()

    def forward(
        self,
        student_feats: Mapping[str, Tensor],
        teacher_feats: Mapping[str, Tensor],
        gt_boxes: Sequence[Tensor],
        canvas_hw: tuple[int, int],
    ) -> dict[str, Tensor]:
        """Losses over all stages.

        Args:
            student_feats: stage name -> Tensor[B, C_s, h, w].
            teacher_feats: stage name -> Tensor[B, C_t, H, W], detached inside.
            gt_boxes: per image Tensor[M_b, 4] in canvas pixels.
            canvas_hw: (canvas_h, canvas_w).
        Returns:
            dict of float32 scalars: ``total``; ``imitation_<stage>`` (L_s) and
            ``macro_<stage>`` (w_s, detached) per stage.
        """
        self._check(student_feats, teacher_feats, gt_boxes)
        device_type = next(iter(student_feats.values())).device.type
        with torch.autocast(device_type=device_type, enabled=False):
            losses = torch.stack(
                [self.stage_loss(s, student_feats[s], teacher_feats[s], gt_boxes, canvas_hw) for s in self.stages]
            )
            magnitude = losses.detach().pow(self.macro_power)
            num_stages = len(self.stages)
            mass = magnitude.sum()
            # Equal weights when every stage is already matched (no device sync to decide).
            macro = torch.where(mass > 0, num_stages * magnitude / mass.clamp(min=torch.finfo(torch.float32).tiny), 1.0)
            total = (macro * losses).sum()
        out = {"total": total}
        for index, stage in enumerate(self.stages):
            out[f"imitation_{stage}"] = losses[index]
            out[f"macro_{stage}"] = macro[index]
        return out
