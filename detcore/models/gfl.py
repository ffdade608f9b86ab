"""The GFL (v1) detector: backbone, FPN, head; ATSS targets, QFL + DFL + GIoU loss, decoding.

Legend: B images, A points (= anchors) over all levels, K classes, R reg_max, M GT boxes
of one image, P positive points of a batch. Boxes are ``(x1, y1, x2, y2)`` canvas pixels.

Target contract (`GFLTargets`): ``labels`` holds the class in [0, K) of a positive point
and K for background; nothing is ignored. Assignment is ATSS on GFL's anchors (one
square of side 8 x stride per point, `detcore.outputs.level_anchors`).

Loss conventions follow mmdetection's ``GFLHead``: QFL summed over points and classes and
divided by the number of positives in the batch (at least 1); GIoU and DFL on positives
only, each positive weighted by its largest predicted class probability (detached), and
divided by the sum of those weights (at least 1); DFL additionally averaged over the
four edges. Weights 1, 0.25 and 2 (`GFLLossWeights`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from detcore.assign import atss_assign
from detcore.boxes import box_iou_aligned
from detcore.det_losses import distribution_focal_loss, giou_loss, quality_focal_loss
from detcore.outputs import (
    DEFAULT_REG_MAX,
    DEFAULT_STRIDES,
    DenseOutputs,
    boxes_to_distance,
    distance_to_boxes,
    distribution_to_distance,
    flatten_levels,
    level_anchors,
)

# arch name -> (backbone, FPN channels, head channels, convs per tower)
ARCHITECTURES: dict[str, tuple[str, int, int, int]] = {
    "gfl_tiny": ("tiny", 32, 32, 2),
    "gfl_r18": ("resnet18", 64, 64, 4),
    "gfl_r34": ("resnet34", 128, 128, 4),
    "gfl_r50": ("resnet50", 256, 256, 4),
    "gfl_r101": ("resnet101", 256, 256, 4),
}


@dataclass(frozen=True, slots=True)
class DetectorConfig:
    """Everything needed to rebuild a detector (stored in every checkpoint)."""

    arch: str
    """Architecture name, one of `ARCHITECTURES` (``gfl_tiny``, ``gfl_r18`` ...)."""
    num_classes: int
    """K: number of foreground classes (sigmoid outputs; no background channel)."""
    backbone: str
    """``tiny`` or ``resnet18`` / ``resnet34`` / ``resnet50`` / ``resnet101``."""
    fpn_channels: int
    """Width of every FPN level."""
    head_channels: int
    """Width of the head's conv towers."""
    num_convs: int
    """3x3 conv + GroupNorm + ReLU layers per tower."""
    reg_max: int = DEFAULT_REG_MAX
    """R: each box edge is a distribution over R + 1 bins (stride units)."""
    strides: tuple[int, ...] = DEFAULT_STRIDES
    """FPN level strides, a prefix of (8, 16, 32, 64, 128) of length 3 to 5."""
    atss_topk: int = 9
    """ATSS candidates per level per GT."""
    frozen_backbone_bn: bool = False
    """Freeze BatchNorm and the stem + layer1 of a ResNet (for pretrained backbones)."""
    backbone_weights: str | None = None
    """Path of the state_dict the backbone was initialised from (provenance; a checkpoint never reloads it)."""

    def validate(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"DetectorConfig(arch=) expects one of {sorted(ARCHITECTURES)}. Got {self.arch!r}.")
        if self.num_classes < 1:
            raise ValueError(f"DetectorConfig(num_classes=) expects at least 1. Got {self.num_classes}.")
        for name in ("fpn_channels", "head_channels", "reg_max", "atss_topk"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"DetectorConfig({name}=) expects a positive integer. Got {getattr(self, name)}.")
        if self.num_convs < 0:
            raise ValueError(f"DetectorConfig(num_convs=) expects a non-negative integer. Got {self.num_convs}.")
        n = len(self.strides)
        if not (3 <= n <= 5 and tuple(self.strides) == DEFAULT_STRIDES[:n]):
            raise ValueError(
                f"DetectorConfig(strides=) expects a prefix of {DEFAULT_STRIDES} with 3 to 5 levels. Got {self.strides}."
            )

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["strides"] = list(self.strides)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DetectorConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"DetectorConfig.from_dict expects fields {sorted(names)}. Got unknown {sorted(unknown)}.")
        values = dict(data)
        if "strides" in values:
            values["strides"] = tuple(int(s) for s in values["strides"])
        config = cls(**values)
        config.validate()
        return config


@dataclass(frozen=True, slots=True)
class GFLLossWeights:
    """Weights of the three GFL losses (mmdetection's GFL config)."""

    qfl: float = 1.0
    """Quality focal loss (classification)."""
    dfl: float = 0.25
    """Distribution focal loss (edge distributions)."""
    giou: float = 2.0
    """GIoU loss of decoded boxes."""
    qfl_beta: float = 2.0
    """Focusing exponent of QFL."""


@dataclass(frozen=True)
class GFLTargets:
    """ATSS targets of a batch, computed once and shared by the GFL loss and the distillation losses."""

    labels: Tensor
    """LongTensor[B, A]: class in [0, K) for a positive point, K for background."""
    boxes: Tensor
    """Tensor[B, A, 4]: the assigned GT box (canvas px); zeros for background."""
    positive_mask: Tensor
    """BoolTensor[B, A]."""
    gt_index: Tensor
    """LongTensor[B, A]: index of the assigned GT within its image, -1 for background."""
    anchors: Tensor
    """Tensor[A, 4]: GFL anchors, level-major then row-major (`flatten_levels` order)."""
    points: Tensor
    """Tensor[A, 2]: anchor centres (x, y) in canvas px."""
    point_strides: Tensor
    """Tensor[A]: stride of each point's level."""
    num_level_anchors: tuple[int, ...]
    """Points per level."""

    @property
    def num_positives(self) -> int:
        return int(self.positive_mask.sum().item())


def anchors_for_outputs(outputs: DenseOutputs) -> tuple[Tensor, Tensor, Tensor, tuple[int, ...]]:
    """Anchors Tensor[A, 4], points Tensor[A, 2], point strides Tensor[A], points per level."""
    shapes = outputs.shapes_hw
    device = next(t for g in (outputs.fpn_features, outputs.cls_logits) if g for t in g).device
    per_level = level_anchors(outputs.strides, shapes, device=device, point_offset=outputs.point_offset)
    anchors = torch.cat(per_level)
    points = (anchors[:, :2] + anchors[:, 2:]) * 0.5
    counts = tuple(a.shape[0] for a in per_level)
    point_strides = torch.repeat_interleave(
        torch.tensor(outputs.strides, dtype=torch.float32, device=device), torch.tensor(counts, device=device)
    )
    return anchors, points, point_strides, counts


def _check_gt(gt_boxes: Sequence[Tensor], gt_labels: Sequence[Tensor], batch_size: int, num_classes: int) -> None:
    if len(gt_boxes) != batch_size or len(gt_labels) != batch_size:
        raise ValueError(
            f"GFLDetector expects one gt_boxes and one gt_labels tensor per image ({batch_size}). "
            f"Got {len(gt_boxes)} and {len(gt_labels)}."
        )
    for index, (boxes, labels) in enumerate(zip(gt_boxes, gt_labels)):
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"GFLDetector(gt_boxes=) expects Tensor[M, 4] per image. Got {tuple(boxes.shape)} for image {index}.")
        if labels.shape != boxes.shape[:1]:
            raise ValueError(
                f"GFLDetector(gt_labels=) expects Tensor[M] matching gt_boxes. Got {tuple(labels.shape)} "
                f"for {boxes.shape[0]} boxes in image {index}."
            )
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(
                f"GFLDetector(gt_labels=) expects classes in [0, {num_classes}). "
                f"Got [{int(labels.min())}, {int(labels.max())}] in image {index}."
            )


def assign_gfl_targets(
    outputs: DenseOutputs,
    gt_boxes: Sequence[Tensor],
    gt_labels: Sequence[Tensor],
    num_classes: int,
    topk: int = 9,
) -> GFLTargets:
    """ATSS targets for every image of a batch (see `GFLTargets`)."""
    batch_size = outputs.cls_logits[0].shape[0]
    _check_gt(gt_boxes, gt_labels, batch_size, num_classes)
    anchors, points, point_strides, counts = anchors_for_outputs(outputs)
    device = anchors.device
    num_points = anchors.shape[0]
    labels = torch.full((batch_size, num_points), num_classes, dtype=torch.long, device=device)
    boxes = torch.zeros((batch_size, num_points, 4), dtype=torch.float32, device=device)
    gt_index = torch.full((batch_size, num_points), -1, dtype=torch.long, device=device)
    for b in range(batch_size):
        image_boxes = gt_boxes[b].to(device=device, dtype=torch.float32)
        if image_boxes.shape[0] == 0:
            continue
        assigned = atss_assign(anchors, counts, image_boxes, topk=topk)
        positive = assigned > 0
        index = assigned[positive] - 1
        gt_index[b, positive] = index
        labels[b, positive] = gt_labels[b].to(device=device, dtype=torch.long)[index]
        boxes[b, positive] = image_boxes[index]
    return GFLTargets(labels, boxes, gt_index >= 0, gt_index, anchors, points, point_strides, counts)


class GFLDetector(nn.Module):
    """Backbone -> FPN -> GFL head. Build with `build_detector` or `build_detector_from_config`."""

    point_offset = 0.5
    """Cell (x, y) of stride s sits at ((x + 0.5) * s, (y + 0.5) * s) (`DenseOutputs.point_offset`)."""

    def __init__(self, config: DetectorConfig, backbone: nn.Module, fpn: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.fpn = fpn
        self.head = head

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def strides(self) -> tuple[int, ...]:
        return tuple(self.config.strides)

    @property
    def reg_max(self) -> int:
        return self.config.reg_max

    def forward(self, images: Tensor, with_backbone: bool = False) -> DenseOutputs:
        """Args:
            images: Tensor[B, 3, H, W], normalised (`detcore.views.render`).
            with_backbone: also return the backbone stage features C3..C5.

        Returns:
            `DenseOutputs` with one entry per level of ``config.strides``.
        """
        if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"GFLDetector.forward(images=) expects a Tensor[B, 3, H, W]. Got {shape}.")
        stages = self.backbone(images)
        pyramid = self.fpn(stages)
        cls_logits, box_logits = self.head(pyramid)
        return DenseOutputs(
            cls_logits=cls_logits,
            box_logits=box_logits,
            fpn_features=tuple(pyramid),
            strides=self.strides,
            reg_max=self.reg_max,
            backbone_features=tuple(stages) if with_backbone else None,
            point_offset=self.point_offset,
        )

    def assign(self, outputs: DenseOutputs, gt_boxes: Sequence[Tensor], gt_labels: Sequence[Tensor]) -> GFLTargets:
        """ATSS targets for a batch; pass them to `loss` (and to distillation losses) to assign once."""
        return assign_gfl_targets(outputs, gt_boxes, gt_labels, self.num_classes, topk=self.config.atss_topk)

    def loss(
        self,
        outputs: DenseOutputs,
        gt_boxes: Sequence[Tensor],
        gt_labels: Sequence[Tensor],
        *,
        targets: GFLTargets | None = None,
        weights: GFLLossWeights = GFLLossWeights(),
    ) -> dict[str, Tensor]:
        """Weighted ``{"qfl", "dfl", "giou"}`` losses (scalars); their sum is the training loss."""
        if targets is None:
            targets = self.assign(outputs, gt_boxes, gt_labels)
        return gfl_loss(outputs, targets, weights)

    @torch.no_grad()
    def predict(
        self,
        outputs: DenseOutputs,
        score_thr: float = 0.05,
        pre_nms_topk: int = 1000,
        nms_iou: float = 0.6,
        max_per_image: int = 100,
        canvas_hw: tuple[int, int] | None = None,
    ) -> list[dict[str, Tensor]]:
        """Decode and NMS; see `predict_detections`."""
        return predict_detections(
            outputs,
            score_thr=score_thr,
            pre_nms_topk=pre_nms_topk,
            nms_iou=nms_iou,
            max_per_image=max_per_image,
            canvas_hw=canvas_hw,
        )


def gfl_loss(outputs: DenseOutputs, targets: GFLTargets, weights: GFLLossWeights = GFLLossWeights()) -> dict[str, Tensor]:
    """QFL + DFL + GIoU of a batch with mmdetection's normalisers (module docstring)."""
    reg_max = outputs.reg_max
    cls_flat = flatten_levels(outputs.cls_logits).float()  # [B, A, K]
    box_flat = flatten_levels(outputs.box_logits).float()  # [B, A, 4(R+1)]
    batch_size, num_points, num_classes = cls_flat.shape
    if num_points != targets.labels.shape[1]:
        raise ValueError(f"gfl_loss(targets=) expects {num_points} points per image. Got {targets.labels.shape[1]}.")
    positive = targets.positive_mask
    num_positives = positive.sum()
    batch_index, point_index = positive.nonzero(as_tuple=True)

    pos_strides = targets.point_strides[point_index][:, None]
    pos_points = targets.points[point_index] / pos_strides
    pos_box_logits = box_flat[batch_index, point_index]
    pos_pred_boxes = distance_to_boxes(pos_points, distribution_to_distance(pos_box_logits, reg_max))
    pos_target_boxes = targets.boxes[batch_index, point_index] / pos_strides
    pos_labels = targets.labels[batch_index, point_index]

    quality = torch.zeros_like(cls_flat)
    quality[batch_index, point_index, pos_labels] = box_iou_aligned(pos_pred_boxes.detach(), pos_target_boxes)
    qfl = quality_focal_loss(cls_flat.reshape(-1, num_classes), quality.reshape(-1, num_classes), beta=weights.qfl_beta)
    qfl = qfl.sum() / num_positives.clamp(min=1).to(qfl.dtype)

    if batch_index.numel() == 0:
        zero = box_flat.sum() * 0.0
        return {"qfl": weights.qfl * qfl, "dfl": zero, "giou": zero}
    box_weight = cls_flat.detach().sigmoid()[batch_index, point_index].max(dim=1).values
    normaliser = box_weight.sum().clamp(min=1.0)
    giou = (giou_loss(pos_pred_boxes, pos_target_boxes) * box_weight).sum() / normaliser
    edge_targets = boxes_to_distance(pos_points, pos_target_boxes, reg_max).reshape(-1)
    dfl = distribution_focal_loss(pos_box_logits.reshape(-1, reg_max + 1), edge_targets)
    dfl = (dfl * box_weight[:, None].expand(-1, 4).reshape(-1)).sum() / 4.0 / normaliser
    return {"qfl": weights.qfl * qfl, "dfl": weights.dfl * dfl, "giou": weights.giou * giou}


@torch.no_grad()
def predict_detections(
    outputs: DenseOutputs,
    score_thr: float = 0.05,
    pre_nms_topk: int = 1000,
    nms_iou: float = 0.6,
    max_per_image: int = 100,
    canvas_hw: tuple[int, int] | None = None,
) -> list[dict[str, Tensor]]:
    """Decode dense outputs into detections (mmdetection's GFL test config by default).

    Per level, the ``pre_nms_topk`` points with the highest class score are decoded
    (expected edge distances x stride around the point, clipped to the canvas); every
    (point, class) pair scoring above ``score_thr`` is a candidate; torchvision's
    ``batched_nms`` per class at ``nms_iou``; the ``max_per_image`` best are kept.

    Args:
        outputs: `DenseOutputs` of B images.
        canvas_hw: canvas (H, W) to clip to; default: level-0 map size x its stride.

    Returns:
        Per image a dict with ``boxes`` Tensor[N, 4] (canvas px), ``scores`` Tensor[N],
        ``labels`` LongTensor[N] in [0, K), sorted by decreasing score.
    """
    from torchvision.ops import batched_nms

    if canvas_hw is None:
        h0, w0 = outputs.cls_logits[0].shape[-2:]
        canvas_hw = (int(h0) * outputs.strides[0], int(w0) * outputs.strides[0])
    anchors, points, point_strides, counts = anchors_for_outputs(outputs)
    batch_size = outputs.cls_logits[0].shape[0]
    results = []
    for b in range(batch_size):
        boxes_all, scores_all, labels_all = [], [], []
        start = 0
        for level, count in enumerate(counts):
            scores = outputs.cls_logits[level][b].flatten(1).t().float().sigmoid()  # [HW, K]
            if outputs.box_logits is not None:
                box_logits = outputs.box_logits[level][b].flatten(1).t()  # [HW, 4(R+1)]
            else:
                box_logits = outputs.distances[level][b].flatten(1).t()  # [HW, 4] stride units
            level_points = points[start : start + count]
            stride = outputs.strides[level]
            start += count
            if count > pre_nms_topk:
                keep = scores.max(dim=1).values.topk(pre_nms_topk).indices
                scores, box_logits, level_points = scores[keep], box_logits[keep], level_points[keep]
            candidate, label = (scores > score_thr).nonzero(as_tuple=True)
            if candidate.numel() == 0:
                continue
            if outputs.box_logits is not None:
                distances = distribution_to_distance(box_logits[candidate], outputs.reg_max) * stride
            else:
                distances = box_logits[candidate].float() * stride
            boxes_all.append(distance_to_boxes(level_points[candidate], distances, max_hw=canvas_hw))
            scores_all.append(scores[candidate, label])
            labels_all.append(label)
        if boxes_all:
            boxes = torch.cat(boxes_all)
            scores = torch.cat(scores_all)
            labels = torch.cat(labels_all)
            keep = batched_nms(boxes, scores, labels, nms_iou)[:max_per_image]
            results.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        else:
            device = points.device
            results.append(
                {
                    "boxes": torch.zeros((0, 4), device=device),
                    "scores": torch.zeros((0,), device=device),
                    "labels": torch.zeros((0,), dtype=torch.long, device=device),
                }
            )
    return results


def build_detector_from_config(config: DetectorConfig, load_backbone_weights: bool = True) -> GFLDetector:
    """Assemble a detector; ``load_backbone_weights=False`` when the weights come from a checkpoint."""
    from detcore.models.backbones import build_backbone
    from detcore.models.fpn import FPN
    from detcore.models.head import GFLHead

    config.validate()
    weights = config.backbone_weights if load_backbone_weights else None
    backbone = build_backbone(config.backbone, weights_path=weights, frozen_bn=config.frozen_backbone_bn)
    fpn = FPN(backbone.out_channels, config.fpn_channels, num_levels=len(config.strides))
    head = GFLHead(
        in_channels=config.fpn_channels,
        channels=config.head_channels,
        num_classes=config.num_classes,
        num_convs=config.num_convs,
        reg_max=config.reg_max,
        num_levels=len(config.strides),
    )
    return GFLDetector(config, backbone, fpn, head)


def make_detector_config(
    arch: str,
    num_classes: int,
    *,
    fpn_channels: int | None = None,
    head_channels: int | None = None,
    num_convs: int | None = None,
    reg_max: int = DEFAULT_REG_MAX,
    strides: Sequence[int] = DEFAULT_STRIDES,
    backbone_weights: str | None = None,
    frozen_backbone_bn: bool | None = None,
) -> DetectorConfig:
    """The one place where an architecture name and options become a `DetectorConfig`.

    ``head_channels`` defaults to ``fpn_channels`` when only that is given;
    ``frozen_backbone_bn`` defaults to True exactly when ``backbone_weights`` is given.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"build_detector(arch=) expects one of {sorted(ARCHITECTURES)}. Got {arch!r}.")
    backbone, default_fpn, default_head, default_convs = ARCHITECTURES[arch]
    if backbone_weights is not None and backbone == "tiny":
        raise ValueError(f"build_detector(backbone_weights=) is only for ResNet architectures. Got {arch!r}.")
    fpn = int(fpn_channels) if fpn_channels is not None else default_fpn
    head = int(head_channels) if head_channels is not None else (fpn if fpn_channels is not None else default_head)
    config = DetectorConfig(
        arch=arch,
        num_classes=int(num_classes),
        backbone=backbone,
        fpn_channels=fpn,
        head_channels=head,
        num_convs=int(num_convs) if num_convs is not None else default_convs,
        reg_max=int(reg_max),
        strides=tuple(int(s) for s in strides),
        frozen_backbone_bn=(backbone_weights is not None) if frozen_backbone_bn is None else bool(frozen_backbone_bn),
        backbone_weights=None if backbone_weights is None else str(backbone_weights),
    )
    config.validate()
    return config


def build_detector(
    arch: str,
    num_classes: int,
    *,
    fpn_channels: int | None = None,
    head_channels: int | None = None,
    num_convs: int | None = None,
    reg_max: int = DEFAULT_REG_MAX,
    strides: Sequence[int] = DEFAULT_STRIDES,
    backbone_weights: str | None = None,
    frozen_backbone_bn: bool | None = None,
) -> GFLDetector:
    """Build a GFL detector by architecture name (``gfl_tiny``, ``gfl_r18``, ``gfl_r34``, ``gfl_r50``, ``gfl_r101``).

    Defaults (FPN / head channels, convs per tower): tiny 32/32/2, r18 64/64/4,
    r34 128/128/4, r50 and r101 256/256/4. ``backbone_weights``: a ResNet state_dict file
    (never downloaded); BatchNorm and the stem + layer1 are then frozen as in mmdetection
    unless ``frozen_backbone_bn=False``.
    """
    config = make_detector_config(
        arch,
        num_classes,
        fpn_channels=fpn_channels,
        head_channels=head_channels,
        num_convs=num_convs,
        reg_max=reg_max,
        strides=strides,
        backbone_weights=backbone_weights,
        frozen_backbone_bn=frozen_backbone_bn,
    )
    return build_detector_from_config(config)
