"""The student with its distillation terms: one module whose forward returns every loss.

Legend: B images, L FPN levels, K classes, R reg_max, C channels (C_s student, C_t
teacher), A points over all levels, M_b GT boxes of image b (canvas pixels, x1y1x2y2).

`DistillationModel` owns the student and the trainable parts of the losses (FGD's align
convs and GcBlocks, HGD's adapters, the adapters of LD's feature imitation), so one
optimizer, one ``state_dict`` and one DDP wrapper (Ray Train) cover all of them. Its forward runs the student, assigns ATSS targets
once (`GFLDetector.assign`) and shares that assignment with LD and BCD, computes the
GFL loss and the enabled distillation recipes with the weights of the run config, and
returns the weighted terms to add plus detached components for logging.

Teacher targets enter as `detcore.outputs.DenseOutputs` (sources decode the label-store
names with `DenseOutputs.from_targets`); `check_targets` refuses any whose shape does not
fit the student. Decoding and regions use each side's own ``point_offset``: ATSS, VLR and
imitation regions the student's, the teacher's boxes (BCD's IoU term) the teacher's.
"""

from __future__ import annotations

from typing import Collection, Mapping, Sequence

import torch
from torch import Tensor, nn

from detcore.outputs import BACKBONE_STAGES, DenseOutputs, feature_hw, level_anchors, level_name
from student_trainer.config import LossConfig
from student_trainer.losses.recipes import (
    OPTIMISED_KEYS, PointAssignment, bcd_recipe, build_fgd_modules, build_hgd_module, build_imitation, fgd_recipe, hgd_recipe,
    ld_im_recipe, ld_recipe, view_regions,
)


class TargetShapeError(ValueError):
    """Teacher targets whose shapes do not fit the student's outputs."""


def needed_target_names(
    losses: LossConfig, strides: Sequence[int], available: Collection[str] | None = None, region_groups: Collection[str] = ()
) -> list[str]:
    """Label-store names of the groups the enabled terms read (`LossConfig.groups_read`), every
    level or stage of each, in store order; `DenseOutputs.from_targets` decodes them.

    ``available``: the groups the store holds; ``region_groups``: those it holds only in its
    region (BCD reads ``edges`` when ``box`` is not at every point).
    """
    levels = [level_name(s) for s in strides]
    names: list[str] = []
    for group in losses.groups_read(available, region_groups):
        names += [f"{group}/{part}" for part in (BACKBONE_STAGES if group == "backbone" else levels)]
    return names


def check_targets(teacher: DenseOutputs, outputs: DenseOutputs, groups: Sequence[str], where: str = "") -> None:
    """Raise `TargetShapeError` unless every needed teacher group fits the student's outputs.

    ``cls`` and ``box`` must match the student's shapes exactly, ``edges`` must be
    [B, 4, H, W] at the student's map sizes; ``fpn`` and ``backbone`` must match in batch
    and spatial size (channels may differ: adapters map them).
    """
    if not isinstance(teacher, DenseOutputs):
        raise TargetShapeError(f"DistillationModel(teacher=) expects DenseOutputs. Got {type(teacher).__name__}{where}.")
    student_names = list(outputs.level_names)
    per_group = {
        "cls": (teacher.cls_logits, outputs.cls_logits, student_names, True),
        "box": (teacher.box_logits, outputs.box_logits, student_names, True),
        "edges": (
            teacher.edge_distances() if "edges" in teacher.available_groups else None,
            outputs.fpn_features,
            student_names, "edges",
        ),
        "fpn": (teacher.fpn_features or None, outputs.fpn_features, student_names, False),
        "backbone": (teacher.backbone_features, outputs.backbone_features, list(BACKBONE_STAGES), False),
    }
    for group in groups:
        given, student, names, exact = per_group[group]
        if given is None:
            raise TargetShapeError(
                f"DistillationModel(teacher=) expects the target group {group!r}. Got {list(teacher.available_groups)}{where}."
            )
        if student is None:
            raise TargetShapeError(f"DistillationModel(teacher=) got {group!r}, which the student does not produce{where}.")
        if len(given) != len(student):
            raise TargetShapeError(
                f"DistillationModel(teacher=) expects {len(student)} levels of {group!r}. Got {len(given)}{where}."
            )
        for name, t, s in zip(names, given, student):
            name = f"{group}/{name}"
            if exact == "edges":
                expected = [s.shape[0], 4, *s.shape[2:]]
                same = list(t.shape) == expected
            elif exact:
                expected = list(s.shape)
                same = tuple(t.shape) == tuple(s.shape)
            else:
                expected = [s.shape[0], "C", *s.shape[2:]]
                same = t.shape[0] == s.shape[0] and tuple(t.shape[2:]) == tuple(s.shape[2:])
            if t.ndim != 4 or not same:
                raise TargetShapeError(
                    f"DistillationModel(targets=) expects {name!r} as Tensor{expected}. Got {list(t.shape)}{where}; "
                    "the store's canvas, classes or reg_max do not fit the student."
                )


class GTRegions:
    """The distillation regions of one view, from its GT alone: for the DataLoader workers.

    LD's valuable localization region (``vlr``, Tensor[A] float32) and the fine-grained
    imitation region of ``ld_im`` (``im``, BoolTensor[A]) depend only on the view's GT boxes,
    the canvas and the student's strides, never on the model or the teacher. Computing them
    per view in the loader's worker processes takes ~400 small tensor ops per image off the
    training step (the VLR of a batch of 16 at canvas 256: 6200 ops, 21 ms on one CPU
    thread; on a GPU each op is a kernel launch).
    `DistillationModel.forward(regions=)` uses them as if it had computed them itself.

    Picklable (plain tensors and numbers), so every DataLoader worker gets a copy.
    """

    def __init__(
        self, strides: Sequence[int], canvas_hw: tuple[int, int], ld_config, vlr: bool, im: bool, point_offset: float = 0.5
    ) -> None:
        self.strides = [int(s) for s in strides]
        self.canvas_hw = (int(canvas_hw[0]), int(canvas_hw[1]))
        self.point_offset = point_offset
        self._points: dict[tuple[int, int], tuple[Tensor, tuple[int, ...]]] = {}
        self.ld_config = ld_config
        self.keys = tuple(key for key, wanted in (("vlr", vlr), ("im", im)) if wanted)

    def points(self, canvas_hw: tuple[int, int]) -> tuple[Tensor, tuple[int, ...]]:
        """Anchor points Tensor[A, ...] and points per level of one canvas (cached)."""
        canvas_hw = (int(canvas_hw[0]), int(canvas_hw[1]))
        if canvas_hw not in self._points:
            per_level = level_anchors(self.strides, [feature_hw(canvas_hw, s) for s in self.strides], point_offset=self.point_offset)
            self._points[canvas_hw] = (torch.cat(per_level), tuple(int(a.shape[0]) for a in per_level))
        return self._points[canvas_hw]

    @property
    def anchors(self) -> Tensor:
        return self.points(self.canvas_hw)[0]

    @property
    def num_level_anchors(self) -> tuple[int, ...]:
        return self.points(self.canvas_hw)[1]

    def __call__(self, gt_boxes: Tensor, canvas_hw: tuple[int, int] | None = None) -> dict[str, Tensor]:
        """Regions of one view from its Tensor[M, 4] GT boxes (canvas pixels) on ``canvas_hw`` (default: the store's first canvas)."""
        anchors, num_level_anchors = self.points(canvas_hw or self.canvas_hw)
        return view_regions(anchors, num_level_anchors, gt_boxes.cpu(), self.ld_config, self.keys)


class DistillationModel(nn.Module):
    """Student detector + trainable distillation modules; forward returns the losses.

    Args:
        student: a `detcore.models.gfl.GFLDetector`.
        losses: which terms and their recipe configs (weights, temperatures).
        canvas_hw: the store's first canvas (regions by default); FGD masks and HGD micro
            weights take each batch's canvas from its images (one canvas per batch).
        teacher_channels: channels of every teacher target by name (``fpn/p3`` ...,
            ``backbone/c3`` ...), from the source's target specs; its groups say whether
            BCD reads the teacher's ``box`` or ``edges``.
        class_mask: per class, False for a dataset category the teacher lacks
            (`label_store.TeacherFingerprint.class_mask`): LD's KD and BCD's class term leave
            it out. None: every class.
        region_groups: groups the store holds only in its region (`label_store.StoreRegion`):
            BCD then reads the teacher's boxes from dense ``edges``.
    """

    def __init__(
        self,
        student: nn.Module,
        losses: LossConfig,
        canvas_hw: tuple[int, int],
        teacher_channels: Mapping[str, int],
        class_mask: Sequence[bool] | None = None,
        region_groups: Collection[str] = (),
    ) -> None:
        super().__init__()
        self.student = student
        self.class_mask = None
        if class_mask is not None and not all(class_mask):
            if len(class_mask) != student.num_classes:
                raise TargetShapeError(
                    f"DistillationModel(class_mask=) expects one flag per student class ({student.num_classes}). Got {len(class_mask)}."
                )
            self.class_mask = torch.tensor([bool(v) for v in class_mask], dtype=torch.bool)
        self.losses = losses
        self.canvas_hw = (int(canvas_hw[0]), int(canvas_hw[1]))
        available = {name.split("/", 1)[0] for name in teacher_channels}
        self.groups = losses.groups_read(available, region_groups)
        self.bcd_group = losses.bcd_box_group(available, region_groups)
        self.levels = [level_name(s) for s in student.strides]
        self.fgd = None
        self.hgd = None
        self.ld_im = None
        if losses.uses("ld_im"):
            self.ld_im = build_imitation(
                losses.ld, student.config.fpn_channels, self._teacher_fpn_width(teacher_channels), len(self.levels)
            )
        if losses.uses("fgd"):
            self.fgd = build_fgd_modules(
                losses.fgd, student.config.fpn_channels, self._teacher_fpn_width(teacher_channels), len(self.levels)
            )
        if losses.uses("hgd"):
            student_channels = {lv: student.config.fpn_channels for lv in self.levels}
            for stage, channels in zip(BACKBONE_STAGES, student.backbone.out_channels):
                student_channels[stage] = int(channels)
            teacher = {}
            for stage in losses.hgd.stages:
                key = f"backbone/{stage}" if stage in BACKBONE_STAGES else f"fpn/{stage}"
                if key in teacher_channels:
                    teacher[stage] = int(teacher_channels[key])
            self.hgd = build_hgd_module(losses.hgd, student_channels, teacher)

    def _teacher_fpn_width(self, teacher_channels: Mapping[str, int]) -> int:
        missing = [f"fpn/{lv}" for lv in self.levels if f"fpn/{lv}" not in teacher_channels]
        if missing:
            raise TargetShapeError(
                f"DistillationModel(teacher_channels=) expects the teacher's FPN targets {missing} "
                f"(terms {list(self.losses.enabled)} read them). Got {sorted(teacher_channels)}."
            )
        channels = {int(teacher_channels[f"fpn/{lv}"]) for lv in self.levels}
        if len(channels) != 1:
            raise TargetShapeError(f"DistillationModel expects one teacher FPN width over all levels. Got {sorted(channels)}.")
        return channels.pop()

    @property
    def distill_modules(self) -> nn.ModuleDict:
        """The trainable loss modules (saved with the checkpoints)."""
        out = nn.ModuleDict()
        if self.ld_im is not None:
            out["ld_im"] = self.ld_im
        if self.fgd is not None:
            out["fgd"] = self.fgd
        if self.hgd is not None:
            out["hgd"] = self.hgd
        return out

    def distill_state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().cpu() for k, v in self.distill_modules.state_dict().items()}

    def load_distill_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self.distill_modules.load_state_dict(dict(state))

    def _region_keys(self) -> tuple[str, ...]:
        return tuple(key for key, wanted in (("vlr", self.losses.uses("ld_vlr")), ("im", self.ld_im is not None)) if wanted)

    def region_spec(self) -> GTRegions | None:
        """What the loader's workers should compute per view (`GTRegions`), or None when no enabled term reads a region."""
        keys = self._region_keys()
        if not keys:
            return None
        return GTRegions(
            self.student.strides, self.canvas_hw, self.losses.ld, "vlr" in keys, "im" in keys, self.student.point_offset
        )

    def _batch_regions(self, regions: Mapping[str, Tensor] | None, gfl_targets, gt_boxes: Sequence[Tensor]) -> dict[str, Tensor]:
        """The batch's regions, Tensor[B, A] each: those given (shape-checked), the rest computed here."""
        like = gfl_targets.gt_index
        out, missing = {}, []
        for key in self._region_keys():
            region = None if regions is None else regions.get(key)
            if region is None:
                missing.append(key)
            elif not isinstance(region, Tensor) or tuple(region.shape) != tuple(like.shape[:2]):
                raise TargetShapeError(
                    f"DistillationModel.forward(regions=) expects {key!r} as Tensor{list(like.shape[:2])} (images, points). "
                    f"Got {list(region.shape) if isinstance(region, Tensor) else type(region).__name__}."
                )
            else:
                out[key] = region.to(like.device)
        if missing:
            per_view = [
                view_regions(gfl_targets.anchors, gfl_targets.num_level_anchors, boxes, self.losses.ld, missing)
                for boxes in gt_boxes
            ]
            for key in missing:
                out[key] = torch.stack([r[key] for r in per_view])
        return out

    def _assignment(self, gfl_targets, vlr: Tensor | None) -> PointAssignment:
        """ATSS from the detector's own assignment (computed once per batch) plus LD's VLR (zeros when off)."""
        assigned_gt = gfl_targets.gt_index + 1
        # Without the VLR term its region is all zero, so ld_recipe adds 0 for it at no cost.
        vlr = torch.zeros_like(assigned_gt, dtype=torch.float32) if vlr is None else vlr.float()
        return PointAssignment(assigned_gt, vlr, tuple(int(n) for n in gfl_targets.num_level_anchors))

    def forward(
        self,
        images: Tensor,
        gt_boxes: Sequence[Tensor],
        gt_labels: Sequence[Tensor],
        teacher: DenseOutputs | None = None,
        regions: Mapping[str, Tensor] | None = None,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Args:
            images: Tensor[B, 3, H, W] rendered views.
            gt_boxes: per image Tensor[M_b, 4] canvas pixels.
            gt_labels: per image LongTensor[M_b].
            teacher: the teacher's outputs for the batch (None when no term is on); only the
                groups the enabled terms read need be present.
            regions: the batch's `GTRegions` stacked by the loader (``vlr`` Tensor[B, A],
                ``im`` BoolTensor[B, A]); whatever is missing is computed here, the same way.

        Returns:
            ``(terms, logs)``: the weighted loss terms to sum (``qfl``, ``dfl``, ``giou`` and
            the enabled ones of ``ld_main``, ``ld_vlr``, ``ld_kd``, ``ld_im``, ``bcd_cls``,
            ``bcd_iou``, ``fgd``, ``hgd``), and detached, unweighted components for logging.
        """
        losses = self.losses
        outputs = self.student(images, with_backbone=self.hgd is not None)
        gfl_targets = self.student.assign(outputs, gt_boxes, gt_labels)
        det = self.student.loss(outputs, gt_boxes, gt_labels, targets=gfl_targets)
        terms = {name: value * losses.detector_weight for name, value in det.items()}
        logs: dict[str, Tensor] = {}
        if not self.groups:
            return terms, logs
        if teacher is None:
            raise TargetShapeError(f"DistillationModel.forward(teacher=) expects the teacher groups {list(self.groups)}. Got None.")
        check_targets(teacher, outputs, self.groups)
        strides, reg_max = outputs.strides, outputs.reg_max
        batch_regions = self._batch_regions(regions, gfl_targets, gt_boxes)
        if losses.uses("ld_main", "ld_vlr", "ld_kd", "bcd"):
            teacher_cls = teacher.cls_logits
            teacher_box = teacher.box_logits if "box" in self.groups else None
            bcd_box = teacher.box_logits if self.bcd_group == "box" else None
            same_atss = losses.ld.topk == self.student.config.atss_topk
            if losses.uses("ld_main", "ld_vlr", "ld_kd"):
                assignment = self._assignment(gfl_targets, batch_regions.get("vlr")) if same_atss else None
                ld = ld_recipe(
                    outputs.cls_logits, outputs.box_logits, teacher_cls, teacher_box, gt_boxes, strides, reg_max,
                    config=losses.ld, assignment=assignment, point_offset=outputs.point_offset, class_mask=self.class_mask,
                )
                terms.update({key: ld[key] for key in OPTIMISED_KEYS["ld"] if key in losses.enabled})
            if losses.uses("bcd"):
                same_atss = losses.bcd.topk == self.student.config.atss_topk
                assignment = self._assignment(gfl_targets, None) if same_atss else None
                bcd = bcd_recipe(
                    outputs.cls_logits, outputs.box_logits, teacher_cls, bcd_box, gt_boxes, strides, reg_max,
                    config=losses.bcd, assignment=assignment, point_offset=outputs.point_offset,
                    teacher_edges=None if bcd_box is not None else teacher.edge_distances(),
                    teacher_point_offset=teacher.point_offset, class_mask=self.class_mask,
                )
                terms.update({key: bcd[key] for key in OPTIMISED_KEYS["bcd"]})
        if self.ld_im is not None:
            im = ld_im_recipe(
                self.ld_im, outputs.fpn_features, teacher.fpn_features, gt_boxes, strides,
                config=losses.ld, region=batch_regions["im"].bool(), point_offset=outputs.point_offset,
            )
            terms["ld_im"] = im.pop("ld_im")
            logs.update(im)
        if self.fgd is not None:
            fgd = fgd_recipe(
                self.fgd, outputs.fpn_features, teacher.fpn_features, gt_boxes, tuple(images.shape[-2:])
            )
            terms["fgd"] = fgd.pop("fgd")
            logs.update(fgd)
        if self.hgd is not None:
            student_feats = dict(zip(self.levels, outputs.fpn_features))
            student_feats.update(zip(BACKBONE_STAGES, outputs.backbone_features))
            available = dict(zip(self.levels, teacher.fpn_features))
            if teacher.backbone_features is not None:
                available.update(zip(BACKBONE_STAGES, teacher.backbone_features))
            teacher_feats = {stage: available[stage] for stage in self.hgd.stages}
            hgd = hgd_recipe(self.hgd, student_feats, teacher_feats, gt_boxes, tuple(images.shape[-2:]), config=losses.hgd)
            terms["hgd"] = hgd.pop("hgd")
            logs.update(hgd)
        return terms, logs
