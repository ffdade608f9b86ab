"""The dense output structure shared by teacher, student, label store and losses.

Legend: B images, L FPN levels, K classes, R reg_max, C channels, A points over all levels.

Per level l (stride s_l, map H_l x W_l), a detector of this family produces
    cls_logits[l]   Tensor[B, K, H_l, W_l]        sigmoid classification logits
    box_logits[l]   Tensor[B, 4*(R+1), H_l, W_l]  edge-distribution logits, channel
                                                  ``e*(R+1) + j`` is bin j of edge e in
                                                  (left, top, right, bottom)
    fpn_features[l] Tensor[B, C, H_l, W_l]
and, on request, backbone stage features C3..C5 (Tensor[B, C_s, H_s, W_s]).

Point (x, y) of level l sits at canvas pixel ``((x + 0.5) * s_l, (y + 0.5) * s_l)``;
its anchor is the square of side ``8 * s_l`` centred there (GFL's anchors). Edge
distances are in units of the stride: a box is ``point -/+ stride * E[edge]`` where
``E[edge] = sum_j j * softmax(box_logits)_j`` ranges over [0, R].

Target names used by the label store (`target_names`): ``cls/p3``, ``box/p3``,
``fpn/p3`` ... for FPN levels and ``backbone/c3`` ... for backbone stages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

DEFAULT_STRIDES = (8, 16, 32, 64, 128)
DEFAULT_REG_MAX = 16
BACKBONE_STAGES = ("c3", "c4", "c5")
BACKBONE_STRIDES = {"c3": 8, "c4": 16, "c5": 32}


def level_name(stride: int) -> str:
    """FPN level name of a stride: 8 -> ``p3``, 128 -> ``p7``."""
    return f"p{int(math.log2(stride))}"


def feature_hw(canvas_hw: tuple[int, int], stride: int) -> tuple[int, int]:
    """Map size of a level for a canvas: ``ceil(H / stride), ceil(W / stride)``.

    Exact for the stride-2 3x3 convolutions with padding 1 that every backbone and the
    P6/P7 convolutions of this family use.
    """
    return (math.ceil(canvas_hw[0] / stride), math.ceil(canvas_hw[1] / stride))


@dataclass(frozen=True)
class DenseOutputs:
    """Raw outputs of one forward pass of a dense detector (teacher or student)."""

    cls_logits: tuple[Tensor, ...]
    """Per level Tensor[B, K, H, W]."""
    box_logits: tuple[Tensor, ...]
    """Per level Tensor[B, 4*(R+1), H, W]."""
    fpn_features: tuple[Tensor, ...]
    """Per level Tensor[B, C, H, W]."""
    strides: tuple[int, ...]
    """Stride of each level, e.g. (8, 16, 32, 64, 128)."""
    reg_max: int
    """R: each edge distribution has R + 1 bins."""
    backbone_features: tuple[Tensor, ...] | None = None
    """Stage features C3..C5 (Tensor[B, C_s, H, W] each) when requested, else None."""
    point_offset: float = 0.5
    """Cell (x, y) of stride s sits at ((x + o) * s, (y + o) * s): 0.5 here, 0.0 for mmdetection and torchvision."""

    @property
    def num_levels(self) -> int:
        return len(self.strides)

    @property
    def level_names(self) -> tuple[str, ...]:
        return tuple(level_name(s) for s in self.strides)

    def targets(self) -> dict[str, Tensor]:
        """All arrays by label-store target name (``cls/p3``, ``box/p3``, ``fpn/p3``, ``backbone/c3``)."""
        out: dict[str, Tensor] = {}
        for name, cls, box, feat in zip(self.level_names, self.cls_logits, self.box_logits, self.fpn_features):
            out[f"cls/{name}"] = cls
            out[f"box/{name}"] = box
            out[f"fpn/{name}"] = feat
        if self.backbone_features is not None:
            for stage, feat in zip(BACKBONE_STAGES, self.backbone_features):
                out[f"backbone/{stage}"] = feat
        return out

    def detach(self) -> "DenseOutputs":
        return map_outputs(self, lambda t: t.detach())


def map_outputs(outputs: DenseOutputs, fn) -> DenseOutputs:
    """Apply ``fn`` to every tensor (e.g. ``.float()``, ``.to(device)``, ``[i:i+1]``)."""
    return DenseOutputs(
        cls_logits=tuple(fn(t) for t in outputs.cls_logits),
        box_logits=tuple(fn(t) for t in outputs.box_logits),
        fpn_features=tuple(fn(t) for t in outputs.fpn_features),
        strides=outputs.strides,
        reg_max=outputs.reg_max,
        backbone_features=None if outputs.backbone_features is None else tuple(fn(t) for t in outputs.backbone_features),
        point_offset=outputs.point_offset,
    )


def level_points(strides: Sequence[int], shapes_hw: Sequence[tuple[int, int]], device=None) -> list[Tensor]:
    """Point centres per level: Tensor[H*W, 2] in (x, y) canvas pixels, row-major."""
    points = []
    for stride, (h, w) in zip(strides, shapes_hw):
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) * stride
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) * stride
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1))
    return points


def level_anchors(strides: Sequence[int], shapes_hw: Sequence[tuple[int, int]], device=None) -> list[Tensor]:
    """GFL anchors per level: Tensor[H*W, 4], squares of side 8*stride centred on the points."""
    anchors = []
    for stride, points in zip(strides, level_points(strides, shapes_hw, device)):
        half = 4.0 * stride
        anchors.append(torch.cat([points - half, points + half], dim=1))
    return anchors


def distribution_to_distance(box_logits_flat: Tensor, reg_max: int) -> Tensor:
    """Expected edge distances in stride units.

    Args:
        box_logits_flat: Tensor[N, 4*(R+1)].
    Returns:
        Tensor[N, 4] (left, top, right, bottom), each in [0, R].
    """
    n = box_logits_flat.shape[0]
    probs = box_logits_flat.float().reshape(n, 4, reg_max + 1).softmax(dim=-1)
    bins = torch.arange(reg_max + 1, device=box_logits_flat.device, dtype=probs.dtype)
    return (probs * bins).sum(dim=-1)


def distance_to_boxes(points: Tensor, distances: Tensor, max_hw: tuple[int, int] | None = None) -> Tensor:
    """Boxes ``(x1, y1, x2, y2)`` from points Tensor[N, 2] and pixel distances Tensor[N, 4]."""
    x1 = points[:, 0] - distances[:, 0]
    y1 = points[:, 1] - distances[:, 1]
    x2 = points[:, 0] + distances[:, 2]
    y2 = points[:, 1] + distances[:, 3]
    boxes = torch.stack([x1, y1, x2, y2], dim=-1)
    if max_hw is not None:
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, max_hw[1])
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, max_hw[0])
    return boxes


def boxes_to_distance(points: Tensor, boxes: Tensor, reg_max: int, eps: float = 0.01) -> Tensor:
    """Inverse of `distance_to_boxes` in stride-free units, clamped to [0, R - eps].

    Callers divide by the stride first: ``boxes_to_distance(points / s, boxes / s, R)``.
    """
    left = points[:, 0] - boxes[:, 0]
    top = points[:, 1] - boxes[:, 1]
    right = boxes[:, 2] - points[:, 0]
    bottom = boxes[:, 3] - points[:, 1]
    return torch.stack([left, top, right, bottom], dim=-1).clamp(min=0, max=reg_max - eps)


def flatten_levels(per_level: Sequence[Tensor]) -> Tensor:
    """[B, X, H_l, W_l] per level -> Tensor[B, A, X] with points in level-major, row-major order."""
    return torch.cat([t.flatten(2).transpose(1, 2) for t in per_level], dim=1)
