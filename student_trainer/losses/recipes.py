"""The released distillation recipes: per-batch loss dicts from per-level outputs.

Legend: B images, L FPN levels, K classes, R reg_max, C channels, A points over all
levels (level-major, row-major, as `detcore.outputs.level_anchors`), M_b GT boxes of
image b in canvas pixels ``(x1, y1, x2, y2)``.

Student inputs are per-level lists as in `detcore.outputs.DenseOutputs`; teacher inputs
are the same per-level tensors, wherever they come from (label store, endpoint or an
in-process teacher): the recipes detach them and move them to the student's device. Regions (ATSS positives, LD's valuable
localization region, FGD's masks) are computed here from the view's GT, never taken from
the teacher. Loss weights are arguments, held by the frozen config dataclasses of
`student_trainer.config` (`LDConfig`, `BCDConfig`, `FGDConfig`, `HGDConfig`) with the papers'
released defaults; the ``build_*`` functions below make the trainable modules they describe.

Keys to add to the training loss are listed in `OPTIMISED_KEYS`; the other keys of a
dict are detached, unweighted components for logging.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from detcore.assign import atss_assign, imitation_region, vlr_region
from detcore.outputs import distance_to_boxes, distribution_to_distance, level_anchors, level_points
from student_trainer.config import BCDConfig, FGDConfig, HGDConfig, LDConfig

from ._common import LossInputError, as_float32, check_gt_boxes, describe
from .bcd import bcd_cls_loss, iou_ld_loss
from .fgd import FGDLoss
from .hgd import HGDLoss
from .ld import FeatureImitation, kd_cls_loss, ld_loss

OPTIMISED_KEYS: dict[str, tuple[str, ...]] = {
    "ld": ("ld_main", "ld_vlr", "ld_kd"),
    "ld_im": ("ld_im",),
    "bcd": ("bcd_cls", "bcd_iou"),
    "fgd": ("fgd",),
    "hgd": ("hgd",),
}
"""Per recipe, the keys of its dict that are weighted losses to add to the training loss."""


def build_imitation(config: LDConfig, student_channels: int, teacher_channels: int, num_levels: int) -> FeatureImitation:
    """The ``ld_im`` module of ``config`` (its adapters, if any, train with the student)."""
    return FeatureImitation(student_channels, teacher_channels, num_levels, config.im_normalize)


def build_fgd_modules(config: FGDConfig, student_channels: int, teacher_channels: int, num_levels: int) -> nn.ModuleList:
    """One `FGDLoss` per FPN level with ``config``'s weights (the student's optimiser must include their parameters)."""
    return nn.ModuleList(
        FGDLoss(
            student_channels, teacher_channels, config.temperature, config.alpha, config.beta, config.gamma, config.lambda_,
            config.normalize,
        )
        for _ in range(num_levels)
    )


def build_hgd_module(config: HGDConfig, student_channels: Mapping[str, int], teacher_channels: Mapping[str, int]) -> HGDLoss:
    """`HGDLoss` over ``config.stages`` (channel dicts may name more stages; those are ignored)."""
    missing = [s for s in config.stages if s not in student_channels or s not in teacher_channels]
    if missing:
        raise LossInputError(f"build_hgd_module(config=) expects channels for the stages {list(config.stages)}. Missing {missing}.")
    return HGDLoss(
        {s: student_channels[s] for s in config.stages},
        {s: teacher_channels[s] for s in config.stages},
        background_weight=config.background_weight,
        macro_power=config.macro_power,
    )


@dataclass(frozen=True, slots=True)
class PointAssignment:
    """ATSS assignment (and LD's valuable localization region) of every point of a batch."""

    assigned_gt: Tensor
    """LongTensor[B, A]: 0 for a negative, ``g + 1`` for a point assigned to GT g of its image."""
    vlr: Tensor | None
    """Tensor[B, A] VLR value (IoU inside the region, 0 outside), or None when not computed."""
    num_level_points: tuple[int, ...]
    """H_l * W_l of each level, summing to A."""


def assign_points(
    gt_boxes: Sequence[Tensor],
    strides: Sequence[int],
    shapes_hw: Sequence[tuple[int, int]],
    *,
    topk: int = 9,
    vlr_alpha: float | None = 0.25,
    vlr_diou: str = "standard",
    device=None,
    point_offset: float = 0.5,
) -> PointAssignment:
    """ATSS over the GFL anchors of all levels, per image, from the view's GT.

    Args:
        gt_boxes: per image Tensor[M_b, 4] canvas pixels.
        strides: stride of each level.
        shapes_hw: (H_l, W_l) of each level.
        topk: ATSS candidates per level per GT.
        vlr_alpha: alpha of `detcore.assign.vlr_region`; None skips the VLR.
        vlr_diou: DIoU flavour of the VLR.
        device: of the anchors (default: the GT's).
        point_offset: where a cell's point sits (`detcore.outputs.level_points`).
    """
    if len(strides) != len(shapes_hw):
        raise LossInputError(f"assign_points(shapes_hw=) expects one (H, W) per stride ({len(strides)}). Got {len(shapes_hw)}.")
    if device is None:
        device = gt_boxes[0].device if len(gt_boxes) else torch.device("cpu")
    anchors_per_level = level_anchors(strides, shapes_hw, device=device, point_offset=point_offset)
    num_level_points = tuple(int(a.shape[0]) for a in anchors_per_level)
    anchors = torch.cat(anchors_per_level, dim=0)
    assigned, regions = [], []
    for boxes in gt_boxes:
        boxes = boxes.detach().to(device=device, dtype=torch.float32)
        assigned.append(atss_assign(anchors, num_level_points, boxes, topk=topk))
        if vlr_alpha is not None:
            regions.append(vlr_region(anchors, num_level_points, boxes, topk=topk, alpha=vlr_alpha, diou=vlr_diou))
    num_points = anchors.shape[0]
    assigned_gt = torch.stack(assigned) if assigned else torch.zeros(0, num_points, dtype=torch.long, device=device)
    vlr = None
    if vlr_alpha is not None:
        vlr = torch.stack(regions) if regions else torch.zeros(0, num_points, device=device)
    return PointAssignment(assigned_gt, vlr, num_level_points)


def _flat(x: Tensor) -> Tensor:
    """[B, X, H, W] -> [B*H*W, X], image-major then row-major (the order of `PointAssignment` rows)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def _check_dense(
    owner: str,
    student_cls: Sequence[Tensor],
    student_box: Sequence[Tensor],
    teacher_cls: Sequence[Tensor],
    teacher_box: Sequence[Tensor],
    gt_boxes: Sequence[Tensor],
    strides: Sequence[int],
    reg_max: int,
    teacher_edges: Sequence[Tensor] | None = None,
) -> list[tuple[int, int]]:
    num_levels = len(strides)
    teacher_regression = ("teacher_box", teacher_box) if teacher_box is not None else ("teacher_edges", teacher_edges)
    if teacher_regression[1] is None:
        raise LossInputError(f"{owner}(teacher_box=, teacher_edges=) expects one of them per level. Got None for both.")
    for name, per_level in (
        ("student_cls", student_cls),
        ("student_box", student_box),
        ("teacher_cls", teacher_cls),
        teacher_regression,
    ):
        if len(per_level) != num_levels:
            raise LossInputError(
                f"{owner}({name}=) expects one Tensor per level ({num_levels} strides). Got {describe(per_level)}."
            )
    shapes_hw = []
    batch = None
    for level, stride in enumerate(strides):
        cls, box = student_cls[level], student_box[level]
        if not isinstance(cls, Tensor) or cls.dim() != 4:
            raise LossInputError(
                f"{owner}(student_cls=) expects Tensor[B, K, H, W] per level. Got {describe(cls)} at stride {stride}."
            )
        batch = cls.shape[0] if batch is None else batch
        b, _, h, w = cls.shape
        expected_box = (b, 4 * (reg_max + 1), h, w)
        if b != batch:
            raise LossInputError(
                f"{owner}(student_cls=) expects batch {batch} on every level. Got {describe(cls)} at stride {stride}."
            )
        if not isinstance(box, Tensor) or tuple(box.shape) != expected_box:
            raise LossInputError(
                f"{owner}(student_box=) expects Tensor{list(expected_box)} at stride {stride} (reg_max={reg_max}). "
                f"Got {describe(box)}."
            )
        expected = {"teacher_cls": tuple(cls.shape), "teacher_box": tuple(box.shape), "teacher_edges": (b, 4, h, w)}
        for name, teacher in (("teacher_cls", teacher_cls[level]), (teacher_regression[0], teacher_regression[1][level])):
            if not isinstance(teacher, Tensor) or tuple(teacher.shape) != expected[name]:
                raise LossInputError(
                    f"{owner}({name}=) expects the shape {list(expected[name])} at stride {stride}. "
                    f"Got {describe(teacher)}."
                )
        shapes_hw.append((h, w))
    check_gt_boxes(owner, gt_boxes, batch)
    return shapes_hw


def _check_assignment(owner: str, assignment: PointAssignment, batch: int, shapes_hw, need_vlr: bool) -> None:
    expected = tuple(h * w for h, w in shapes_hw)
    if assignment.num_level_points != expected or tuple(assignment.assigned_gt.shape) != (batch, sum(expected)):
        raise LossInputError(
            f"{owner}(assignment=) expects an assignment of {batch} images with points per level {list(expected)}. "
            f"Got assigned_gt {describe(assignment.assigned_gt)} with points per level {list(assignment.num_level_points)}."
        )
    if need_vlr and (assignment.vlr is None or assignment.vlr.shape != assignment.assigned_gt.shape):
        raise LossInputError(
            f"{owner}(assignment=) expects a vlr Tensor[{batch}, {sum(expected)}]. Got {describe(assignment.vlr)}."
        )


def _check_read(teacher_rows: Tensor, owner: str, name: str, level: int, region: str) -> None:
    """Raise unless the teacher rows a term reads are finite.

    A region store (`label_store.StoreRegion`) decodes the points it did not store as NaN;
    reading one means the run's GT or settings select points the store's did not.
    """
    if not bool(torch.isfinite(teacher_rows).all()):
        bad = int((~torch.isfinite(teacher_rows)).any(dim=1).sum())
        raise LossInputError(
            f"{owner}({name}=) expects finite teacher values at the points of {region} it reads. Got NaN/inf at {bad} of "
            f"{teacher_rows.shape[0]} on level {level}: a label store with region storage did not store them (its region "
            "was computed from other GT boxes or other ATSS/VLR settings than this run's)."
        )


def _zero_like(x: Tensor) -> Tensor:
    # Connected to the graph, so that every parameter gets a (zero) gradient under DDP.
    return as_float32(x).sum() * 0.0


def _known_classes(student: Tensor, teacher: Tensor, class_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Student and teacher Tensor[N, K] restricted to the classes of ``class_mask`` (BoolTensor[K]; None: all)."""
    if class_mask is None:
        return student, teacher
    if class_mask.dim() != 1 or class_mask.shape[0] != student.shape[1] or class_mask.dtype != torch.bool:
        raise ValueError(f"class_mask expects a BoolTensor[{student.shape[1]}]. Got {class_mask.dtype} of shape {tuple(class_mask.shape)}.")
    if bool(class_mask.all()):
        return student, teacher
    mask = class_mask.to(student.device)
    return student[:, mask], teacher[:, mask]


def ld_recipe(
    student_cls: Sequence[Tensor],
    student_box: Sequence[Tensor],
    teacher_cls: Sequence[Tensor],
    teacher_box: Sequence[Tensor],
    gt_boxes: Sequence[Tensor],
    strides: Sequence[int],
    reg_max: int,
    config: LDConfig = LDConfig(),
    assignment: PointAssignment | None = None,
    point_offset: float = 0.5,
    class_mask: Tensor | None = None,
) -> dict[str, Tensor]:
    """LD on GFL as released, summed over levels; each level pools the batch's locations.

    Per level: main LD on the ATSS positives, weighted by the student's max class sigmoid
    (detached), ``avg_factor = main_avg_factor * B / avg_factor_images``; VLR LD on the
    points with VLR value > 0, weighted by that value, ``avg_factor = vlr_avg_factor * B /
    avg_factor_images`` (B the batch; see `LDConfig.avg_factor_images`); KD on the classes at the
    positives with ``avg_factor`` = the level's number of positives. A level without
    positives adds 0 to the main LD and the KD (and without VLR points, 0 to the VLR LD).

    Args:
        student_cls: per level Tensor[B, K, H, W].
        student_box: per level Tensor[B, 4*(R+1), H, W].
        teacher_cls, teacher_box: the same shapes, detached inside.
        gt_boxes: per image Tensor[M_b, 4] canvas pixels.
        strides: stride of each level.
        reg_max: R.
        config: weights, temperatures, avg factors, ATSS/VLR settings.
        assignment: precomputed `assign_points` result with ``vlr`` (else computed here).
        point_offset: the student's point convention, for ATSS and the VLR.
        class_mask: BoolTensor[K], the classes the KD term covers (False: a category the
            teacher lacks, `label_store.TeacherFingerprint.class_mask`); None: all.
    Returns:
        dict of float32 scalars ``ld_main``, ``ld_vlr``, ``ld_kd`` (weighted).
    """
    shapes_hw = _check_dense("ld_recipe", student_cls, student_box, teacher_cls, teacher_box, gt_boxes, strides, reg_max)
    batch = student_cls[0].shape[0]
    if assignment is None:
        assignment = assign_points(
            gt_boxes, strides, shapes_hw, topk=config.topk, vlr_alpha=config.alpha, vlr_diou=config.vlr_diou,
            device=student_cls[0].device, point_offset=point_offset,
        )
    _check_assignment("ld_recipe", assignment, batch, shapes_hw, need_vlr=True)
    per_batch = batch / config.avg_factor_images if config.avg_factor_images else 1.0
    main_avg_factor, vlr_avg_factor = config.main_avg_factor * per_batch, config.vlr_avg_factor * per_batch
    main, vlr_total, kd = [], [], []
    start = 0
    for level, count in enumerate(assignment.num_level_points):
        assigned = assignment.assigned_gt[:, start : start + count].reshape(-1).to(student_cls[level].device)
        region = assignment.vlr[:, start : start + count].reshape(-1).to(student_cls[level].device)
        start += count
        device = student_cls[level].device
        s_cls, t_cls = _flat(student_cls[level]), _flat(teacher_cls[level].detach().to(device))
        s_box, t_box = _flat(student_box[level]), _flat(teacher_box[level].detach().to(device))
        positive = assigned > 0
        if bool(positive.any()):
            quality = as_float32(s_cls.detach()).sigmoid().max(dim=1).values[positive]
            _check_read(t_box[positive], "ld_recipe", "teacher_box", level, "the ATSS positives")
            main.append(
                config.main_weight
                * ld_loss(s_box[positive], t_box[positive], quality, main_avg_factor, config.main_temperature)
            )
            _check_read(t_cls[positive], "ld_recipe", "teacher_cls", level, "the ATSS positives")
            s_known, t_known = _known_classes(s_cls[positive], t_cls[positive], class_mask)
            kd.append(config.kd_weight * kd_cls_loss(s_known, t_known, None, float(positive.sum()), config.kd_temperature))
        else:
            main.append(_zero_like(s_box))
            kd.append(_zero_like(s_cls))
        in_region = region > 0
        if bool(in_region.any()):
            _check_read(t_box[in_region], "ld_recipe", "teacher_box", level, "the VLR")
            vlr_total.append(
                config.vlr_weight
                * ld_loss(s_box[in_region], t_box[in_region], region[in_region], vlr_avg_factor, config.vlr_temperature)
            )
        else:
            vlr_total.append(_zero_like(s_box))
    return {"ld_main": torch.stack(main).sum(), "ld_vlr": torch.stack(vlr_total).sum(), "ld_kd": torch.stack(kd).sum()}


def view_regions(
    anchors: Tensor, num_level_anchors: Sequence[int], gt_boxes: Tensor, config: LDConfig, keys: Sequence[str]
) -> dict[str, Tensor]:
    """LD's regions of one view from its GT, on the anchors' device, as ``keys`` asks:
    ``vlr`` (Tensor[A], `detcore.assign.vlr_region`) and/or ``im`` (BoolTensor[A],
    `detcore.assign.imitation_region`), with ``config``'s settings."""
    boxes = gt_boxes.detach().to(device=anchors.device, dtype=torch.float32)
    out = {}
    if "vlr" in keys:
        out["vlr"] = vlr_region(anchors, num_level_anchors, boxes, topk=config.topk, alpha=config.alpha, diou=config.vlr_diou)
    if "im" in keys:
        out["im"] = imitation_region(anchors, boxes, config.im_ratio)
    return out


def imitation_points(
    gt_boxes: Sequence[Tensor], strides: Sequence[int], shapes_hw: Sequence[tuple[int, int]], ratio: float = 0.5,
    device=None, point_offset: float = 0.5,
) -> Tensor:
    """`detcore.assign.imitation_region` of every image over the GFL anchors of all levels.

    Returns:
        BoolTensor[B, A], level-major then row-major per image.
    """
    if device is None:
        device = gt_boxes[0].device if len(gt_boxes) else torch.device("cpu")
    per_level = level_anchors(strides, shapes_hw, device=device, point_offset=point_offset)
    anchors, counts = torch.cat(per_level, dim=0), [int(a.shape[0]) for a in per_level]
    config = LDConfig(im_ratio=ratio)
    rows = [view_regions(anchors, counts, boxes, config, ("im",))["im"] for boxes in gt_boxes]
    return torch.stack(rows) if rows else torch.zeros(0, anchors.shape[0], dtype=torch.bool, device=device)


def ld_im_recipe(
    module: FeatureImitation,
    student_fpn: Sequence[Tensor],
    teacher_fpn: Sequence[Tensor],
    gt_boxes: Sequence[Tensor],
    strides: Sequence[int],
    config: LDConfig = LDConfig(),
    region: Tensor | None = None,
    point_offset: float = 0.5,
) -> dict[str, Tensor]:
    """The release's feature imitation next to LD (``loss_im``, ``finegrained``), summed over levels.

    Per level, the mean squared error between the (adapted) student FPN features and the
    teacher's, both scaled as ``config.im_normalize`` says, at the fine-grained imitation
    points of the batch (`imitation_points`, from the view's GT), times ``config.im_weight``.
    A level without such points adds 0. The release also zeroes a level's imitation when
    that level has no ATSS positive; this recipe does not (the region does not depend on
    the positives).

    Args:
        module: `FeatureImitation` (`build_imitation`).
        student_fpn: per level Tensor[B, C_s, H, W].
        teacher_fpn: per level Tensor[B, C_t, H, W], detached inside.
        gt_boxes: per image Tensor[M_b, 4] canvas pixels.
        strides: stride of each level.
        config: ``im_weight`` and ``im_ratio``.
        region: precomputed `imitation_points` (else computed here).
        point_offset: the student's point convention, for the region.
    Returns:
        dict of float32 scalars: ``ld_im`` (weighted, to optimise) and, detached and
        unweighted, ``ld_im_<level index>`` per level.
    """
    if not (len(student_fpn) == len(teacher_fpn) == len(strides)) or not strides:
        raise LossInputError(
            f"ld_im_recipe(student_fpn=, teacher_fpn=) expect one Tensor per level ({len(strides)} strides) each. "
            f"Got {len(student_fpn)} and {len(teacher_fpn)}."
        )
    check_gt_boxes("ld_im_recipe", gt_boxes, student_fpn[0].shape[0])
    if region is None:
        shapes_hw = [(int(f.shape[2]), int(f.shape[3])) for f in student_fpn]
        region = imitation_points(
            gt_boxes, strides, shapes_hw, config.im_ratio, device=student_fpn[0].device, point_offset=point_offset
        )
    per_level = module(student_fpn, teacher_fpn, region)
    out = {"ld_im": config.im_weight * per_level.sum()}
    for level, value in enumerate(per_level):
        out[f"ld_im_{level}"] = value.detach()
    return out


def bcd_recipe(
    student_cls: Sequence[Tensor],
    student_box: Sequence[Tensor],
    teacher_cls: Sequence[Tensor],
    teacher_box: Sequence[Tensor],
    gt_boxes: Sequence[Tensor],
    strides: Sequence[int],
    reg_max: int,
    config: BCDConfig = BCDConfig(),
    assignment: PointAssignment | None = None,
    point_offset: float = 0.5,
    teacher_edges: Sequence[Tensor] | None = None,
    teacher_point_offset: float | None = None,
    class_mask: Tensor | None = None,
) -> dict[str, Tensor]:
    """BCD on GFL as released, summed over levels.

    Every location of a level (positives and negatives) takes part, with
    ``avg_factor`` = the batch's number of ATSS positives over all levels. The IoU term
    compares boxes decoded from each distribution's expected edges (``point -/+ stride *
    E[edge]``), with per-location weight ``max_k |sigmoid(t) - sigmoid(s)|`` (detached).
    A level without positives adds 0 (so does a batch without any).

    Args: as `ld_recipe` (``assignment`` needs no ``vlr``), and
        teacher_box: may be None when ``teacher_edges`` are given: the IoU term needs only
            the teacher's decoded boxes.
        teacher_edges: per level Tensor[B, 4, H, W] expected edge distances in stride units
            (`DenseOutputs.edge_distances`), used when ``teacher_box`` is None.
        point_offset: the student's point convention (ATSS, the student's boxes).
        teacher_point_offset: the teacher's, for its boxes (default: ``point_offset``).
        class_mask: BoolTensor[K], the classes the class term and the IoU term's weight
            cover (False: a category the teacher lacks); None: all.
    Returns:
        dict of float32 scalars ``bcd_cls``, ``bcd_iou`` (weighted).
    """
    shapes_hw = _check_dense(
        "bcd_recipe", student_cls, student_box, teacher_cls, teacher_box, gt_boxes, strides, reg_max, teacher_edges
    )
    batch = student_cls[0].shape[0]
    device = student_cls[0].device
    if teacher_point_offset is None:
        teacher_point_offset = point_offset
    if assignment is None:
        assignment = assign_points(
            gt_boxes, strides, shapes_hw, topk=config.topk, vlr_alpha=None, device=device, point_offset=point_offset
        )
    _check_assignment("bcd_recipe", assignment, batch, shapes_hw, need_vlr=False)
    assigned_gt = assignment.assigned_gt.to(device)
    num_positives = float((assigned_gt > 0).sum())
    points_per_level = level_points(strides, shapes_hw, device=device, point_offset=point_offset)
    teacher_points_per_level = level_points(strides, shapes_hw, device=device, point_offset=teacher_point_offset)
    cls_terms, iou_terms = [], []
    start = 0
    for level, count in enumerate(assignment.num_level_points):
        positive = assigned_gt[:, start : start + count] > 0
        start += count
        device = student_cls[level].device
        s_cls, t_cls = _flat(student_cls[level]), _flat(teacher_cls[level].detach().to(device))
        s_box = _flat(student_box[level])
        if not bool(positive.any()):
            cls_terms.append(_zero_like(s_cls))
            iou_terms.append(_zero_like(s_box))
            continue
        s_known, t_known = _known_classes(s_cls, t_cls, class_mask)
        cls_terms.append(config.cls_weight * bcd_cls_loss(s_known, t_known, None, num_positives, config.beta))
        gap = (as_float32(t_known).sigmoid() - as_float32(s_known.detach()).sigmoid()).abs().max(dim=1).values
        points = points_per_level[level].repeat(batch, 1)
        teacher_points = teacher_points_per_level[level].repeat(batch, 1)
        stride = float(strides[level])
        if teacher_box is not None:
            t_distance = distribution_to_distance(_flat(teacher_box[level].detach().to(device)), reg_max)
        else:
            t_distance = as_float32(_flat(teacher_edges[level].detach().to(device)))
        s_boxes = distance_to_boxes(points, distribution_to_distance(s_box, reg_max) * stride)
        t_boxes = distance_to_boxes(teacher_points, t_distance * stride)
        iou_terms.append(config.iou_weight * iou_ld_loss(s_boxes, t_boxes, gap, num_positives))
    return {"bcd_cls": torch.stack(cls_terms).sum(), "bcd_iou": torch.stack(iou_terms).sum()}


def fgd_recipe(
    fgd_modules: Sequence[FGDLoss],
    student_fpn: Sequence[Tensor],
    teacher_fpn: Sequence[Tensor],
    gt_boxes: Sequence[Tensor],
    canvas_hw: tuple[int, int],
) -> dict[str, Tensor]:
    """FGD summed over FPN levels, one `FGDLoss` per level.

    Args:
        fgd_modules: one `FGDLoss` per level (`build_fgd_modules`).
        student_fpn: per level Tensor[B, C_s, H, W].
        teacher_fpn: per level Tensor[B, C_t, H, W], detached inside.
        gt_boxes: per image Tensor[M_b, 4] canvas pixels.
        canvas_hw: (canvas_h, canvas_w).
    Returns:
        dict of float32 scalars: ``fgd`` (the weighted total, to optimise) and the unweighted,
        detached sums ``fgd_fg``, ``fgd_bg``, ``fgd_mask``, ``fgd_relation``.
    """
    if not (len(fgd_modules) == len(student_fpn) == len(teacher_fpn)) or len(fgd_modules) == 0:
        raise LossInputError(
            f"fgd_recipe(fgd_modules=, student_fpn=, teacher_fpn=) expect one entry per level each. "
            f"Got {len(fgd_modules)} modules, {len(student_fpn)} student and {len(teacher_fpn)} teacher levels."
        )
    per_level = [module(s, t, gt_boxes, canvas_hw) for module, s, t in zip(fgd_modules, student_fpn, teacher_fpn)]
    out = {"fgd": torch.stack([d["total"] for d in per_level]).sum()}
    for key in ("fg", "bg", "mask", "relation"):
        out[f"fgd_{key}"] = torch.stack([d[key].detach() for d in per_level]).sum()
    return out


def hgd_recipe(
    hgd_module: HGDLoss,
    student_feats: Mapping[str, Tensor],
    teacher_feats: Mapping[str, Tensor],
    gt_boxes: Sequence[Tensor],
    canvas_hw: tuple[int, int],
    config: HGDConfig = HGDConfig(),
) -> dict[str, Tensor]:
    """HGD over the module's stages.

    Args:
        hgd_module: `HGDLoss` (`build_hgd_module`).
        student_feats: stage name -> Tensor[B, C_s, h, w] (extra stages are ignored).
        teacher_feats: stage name -> Tensor[B, C_t, H, W], detached inside.
        gt_boxes: per image Tensor[M_b, 4] canvas pixels.
        canvas_hw: (canvas_h, canvas_w).
        config: holds the loss weight.
    Returns:
        dict of float32 scalars: ``hgd`` (``config.weight * total``, to optimise) and, detached,
        ``hgd_imitation_<stage>`` and ``hgd_macro_<stage>``.
    """
    stages = hgd_module.stages
    missing = [s for s in stages if s not in student_feats or s not in teacher_feats]
    if missing:
        raise LossInputError(
            f"hgd_recipe(student_feats=, teacher_feats=) expect the stages {list(stages)}. Missing {missing} "
            f"(student has {sorted(student_feats)}, teacher has {sorted(teacher_feats)})."
        )
    losses = hgd_module({s: student_feats[s] for s in stages}, {s: teacher_feats[s] for s in stages}, gt_boxes, canvas_hw)
    out = {"hgd": config.weight * losses["total"]}
    for key, value in losses.items():
        if key != "total":
            out[f"hgd_{key}"] = value.detach()
    return out
