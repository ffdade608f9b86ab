"""The dense output structure shared by teacher, student, label store and losses.

Legend: B images, L FPN levels, K classes, R reg_max, C channels, A points over all levels.

Per level l (stride s_l, map H_l x W_l), a detector of this family produces
    cls_logits[l]   Tensor[B, K, H_l, W_l]        sigmoid classification logits
    box_logits[l]   Tensor[B, 4*(R+1), H_l, W_l]  edge-distribution logits, channel
                                                  ``e*(R+1) + j`` is bin j of edge e in
                                                  (left, top, right, bottom)
    fpn_features[l] Tensor[B, C, H_l, W_l]
and, on request, backbone stage features C3..C5 (Tensor[B, C_s, H_s, W_s]).

Point (x, y) of level l sits at canvas pixel ``((x + o) * s_l, (y + o) * s_l)`` with o the
outputs' ``point_offset`` (0.5 here, 0.0 for mmdetection and torchvision);
its anchor is the square of side ``8 * s_l`` centred there (GFL's anchors). Edge
distances are in units of the stride: a box is ``point -/+ stride * E[edge]`` where
``E[edge] = sum_j j * softmax(box_logits)_j`` ranges over [0, R].

Target names used by the label store (`DenseOutputs.to_targets` / `from_targets`):
``cls/p3``, ``box/p3``, ``edges/p3``, ``fpn/p3`` ... for FPN levels and ``backbone/c3`` ...
for backbone stages.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor

from label_store.schema import TARGET_GROUPS

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
    """Raw outputs of one forward pass of a dense detector (teacher or student).

    The one typed structure between teacher, label store and student: `to_targets`
    encodes it to label-store target names, `from_targets` decodes it back.
    """

    cls_logits: tuple[Tensor, ...] | None
    """Per level Tensor[B, K, H, W]; None for teachers without per-point class logits."""
    box_logits: tuple[Tensor, ...] | None
    """Per level Tensor[B, 4*(R+1), H, W] after the level's Scale; None without edge distributions."""
    fpn_features: tuple[Tensor, ...]
    """Per level Tensor[B, C, H, W]."""
    strides: tuple[int, ...]
    """Stride of each level, e.g. (8, 16, 32, 64, 128)."""
    reg_max: int | None
    """R: each edge distribution has R + 1 bins; None when ``box_logits`` is None."""
    backbone_features: tuple[Tensor, ...] | None = None
    """Stage features C3..C5 (Tensor[B, C_s, H, W] each) when requested, else None."""
    distances: tuple[Tensor, ...] | None = None
    """Per level Tensor[B, 4, H, W] (left, top, right, bottom) in stride units, given directly
    by teachers that regress distances; None when they come from ``box_logits``."""
    point_offset: float = 0.5
    """Cell (x, y) of stride s sits at ``((x + o) * s, (y + o) * s)``: 0.5 for this project's
    detectors, 0.0 for mmdetection and torchvision."""

    @property
    def num_levels(self) -> int:
        return len(self.strides)

    @property
    def level_names(self) -> tuple[str, ...]:
        return tuple(level_name(s) for s in self.strides)

    @property
    def shapes_hw(self) -> tuple[tuple[int, int], ...]:
        """(H_l, W_l) of each level."""
        for group in (self.fpn_features, self.cls_logits, self.box_logits, self.distances):
            if group:
                return tuple((int(t.shape[-2]), int(t.shape[-1])) for t in group)
        raise ValueError("DenseOutputs.shapes_hw needs at least one per-level group; all are empty.")

    @property
    def batch_size(self) -> int:
        for group in (self.fpn_features, self.cls_logits, self.box_logits, self.distances):
            if group:
                return int(group[0].shape[0])
        raise ValueError("DenseOutputs.batch_size needs at least one per-level group; all are empty.")

    @property
    def available_groups(self) -> tuple[str, ...]:
        """Target groups `to_targets` can encode, in `TARGET_GROUPS` order."""
        present = {
            "cls": self.cls_logits is not None,
            "box": self.box_logits is not None,
            "edges": self.box_logits is not None or self.distances is not None,
            "fpn": bool(self.fpn_features),
            "backbone": self.backbone_features is not None,
        }
        return tuple(g for g in TARGET_GROUPS if present[g])

    def edge_distances(self) -> tuple[Tensor, ...]:
        """Per level Tensor[B, 4, H, W] (left, top, right, bottom) in stride units.

        ``distances`` when set, else the expectation of the softmax of ``box_logits`` over
        the R + 1 bins (float32).
        """
        if self.distances is not None:
            return self.distances
        if self.box_logits is None or self.reg_max is None:
            raise ValueError("DenseOutputs.edge_distances() needs `distances` or `box_logits` with `reg_max`; both are None.")
        out = []
        for box in self.box_logits:
            b, _, h, w = box.shape
            probs = box.float().reshape(b, 4, self.reg_max + 1, h, w).softmax(dim=2)
            bins = torch.arange(self.reg_max + 1, device=box.device, dtype=probs.dtype).reshape(1, 1, -1, 1, 1)
            out.append((probs * bins).sum(dim=2))
        return tuple(out)

    def to_targets(self, groups: Sequence[str]) -> dict[str, Tensor]:
        """Arrays by label-store target name (``cls/p3``, ``box/p3``, ``edges/p3``, ``fpn/p3``,
        ``backbone/c3``) of ``groups`` (from `TARGET_GROUPS`): the one encoder."""
        groups = tuple(groups)
        unknown = [g for g in groups if g not in TARGET_GROUPS]
        if unknown:
            raise ValueError(f"DenseOutputs.to_targets(groups=) expects names from {TARGET_GROUPS}. Got {list(unknown)}.")
        missing = [g for g in groups if g not in self.available_groups]
        if missing:
            raise ValueError(
                f"DenseOutputs.to_targets(groups=) asks for {missing}, which these outputs do not hold "
                f"(available: {list(self.available_groups)})."
            )
        out: dict[str, Tensor] = {}
        per_group = {
            "cls": lambda: self.cls_logits,
            "box": lambda: self.box_logits,
            "edges": self.edge_distances,
            "fpn": lambda: self.fpn_features,
        }
        for group in TARGET_GROUPS:
            if group not in groups:
                continue
            if group == "backbone":
                for stage, feat in zip(BACKBONE_STAGES, self.backbone_features):
                    out[f"backbone/{stage}"] = feat
            else:
                for name, t in zip(self.level_names, per_group[group]()):
                    out[f"{group}/{name}"] = t
        return out

    @classmethod
    def from_targets(
        cls,
        targets: Mapping[str, Tensor],
        *,
        strides: Sequence[int],
        reg_max: int | None,
        point_offset: float = 0.5,
    ) -> "DenseOutputs":
        """The outputs that `to_targets` encoded: the one decoder of label-store names.

        Groups absent from ``targets`` stay None (``fpn_features`` empty). ``edges`` become
        ``distances``, which `edge_distances` returns (without them it derives them from
        ``box``): a store may hold ``box`` only where LD reads it and ``edges`` everywhere.
        """
        strides = tuple(int(s) for s in strides)
        names = [level_name(s) for s in strides]
        known = {f"{g}/{lv}" for g in ("cls", "box", "edges", "fpn") for lv in names}
        known |= {f"backbone/{stage}" for stage in BACKBONE_STAGES}
        unknown = sorted(set(targets) - known)
        if unknown:
            raise ValueError(f"DenseOutputs.from_targets(targets=) got names {unknown} outside {sorted(known)}.")

        def group(g: str) -> tuple[Tensor, ...] | None:
            present = [f"{g}/{lv}" in targets for lv in names]
            if not any(present):
                return None
            if not all(present):
                missing = [f"{g}/{lv}" for lv, p in zip(names, present) if not p]
                raise ValueError(f"DenseOutputs.from_targets(targets=) holds part of group {g!r}; missing {missing}.")
            return tuple(targets[f"{g}/{lv}"] for lv in names)

        box = group("box")
        edges = group("edges")
        stages = [s for s in BACKBONE_STAGES if f"backbone/{s}" in targets]
        if stages and len(stages) != len(BACKBONE_STAGES):
            raise ValueError(f"DenseOutputs.from_targets(targets=) holds backbone stages {stages}; expected all of {list(BACKBONE_STAGES)}.")
        return cls(
            cls_logits=group("cls"),
            box_logits=box,
            fpn_features=group("fpn") or (),
            strides=strides,
            reg_max=reg_max if box is not None else None,
            backbone_features=tuple(targets[f"backbone/{s}"] for s in BACKBONE_STAGES) if stages else None,
            distances=edges,
            point_offset=float(point_offset),
        )

    def detach(self) -> "DenseOutputs":
        return map_outputs(self, lambda t: t.detach())


def fingerprint_point_offset(fingerprint) -> float:
    """The point convention of a store's teacher: ``preprocessing["point_offset"]`` of its
    `label_store.TeacherFingerprint` when recorded (imported teachers), else 0.5."""
    return float((getattr(fingerprint, "preprocessing", None) or {}).get("point_offset", 0.5))


def map_outputs(outputs: DenseOutputs, fn) -> DenseOutputs:
    """Apply ``fn`` to every tensor (e.g. ``.float()``, ``.to(device)``, ``[i:i+1]``)."""

    def each(ts):
        return None if ts is None else tuple(fn(t) for t in ts)

    return dataclasses.replace(
        outputs,
        cls_logits=each(outputs.cls_logits),
        box_logits=each(outputs.box_logits),
        fpn_features=each(outputs.fpn_features),
        backbone_features=each(outputs.backbone_features),
        distances=each(outputs.distances),
    )


def level_points(
    strides: Sequence[int], shapes_hw: Sequence[tuple[int, int]], device=None, point_offset: float = 0.5
) -> list[Tensor]:
    """Point centres per level: Tensor[H*W, 2] in (x, y) canvas pixels, row-major.

    Cell (x, y) of stride s sits at ``((x + point_offset) * s, (y + point_offset) * s)``.
    """
    points = []
    for stride, (h, w) in zip(strides, shapes_hw):
        ys = (torch.arange(h, device=device, dtype=torch.float32) + point_offset) * stride
        xs = (torch.arange(w, device=device, dtype=torch.float32) + point_offset) * stride
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1))
    return points


def level_anchors(
    strides: Sequence[int], shapes_hw: Sequence[tuple[int, int]], device=None, point_offset: float = 0.5
) -> list[Tensor]:
    """GFL anchors per level: Tensor[H*W, 4], squares of side 8*stride centred on the points."""
    anchors = []
    for stride, points in zip(strides, level_points(strides, shapes_hw, device, point_offset)):
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
