"""mmdetection GFL (v1) checkpoints: the architecture read from tensor shapes, and a model with mmdetection's forward.

Legend: B images, K classes, R reg_max, C FPN channels, C_h head channels.

An mmdetection 2.x or 3.x checkpoint is ``{"meta": ..., "state_dict": ...}`` with keys
    backbone.*                                   ResNet 18-101 in torchvision's names (style "pytorch")
    neck.lateral_convs.i.conv.{weight,bias}      1x1 convs on C3..C5
    neck.fpn_convs.i.conv.{weight,bias}          3x3 output convs of P3..P5, then the stride-2
                                                 extra convs of P6 (on P5's output) and P7 (on P6, no ReLU)
    bbox_head.{cls,reg}_convs.i.conv.weight      3x3 tower convs without bias, each followed by
    bbox_head.{cls,reg}_convs.i.gn.{weight,bias} GroupNorm(32) and ReLU
    bbox_head.gfl_cls.{weight,bias}              Tensor[K, C_h, 3, 3]
    bbox_head.gfl_reg.{weight,bias}              Tensor[4*(R+1), C_h, 3, 3]
    bbox_head.scales.i.scale                     one scalar per level, multiplying gfl_reg's output
    bbox_head.integral.project                   linspace(0, R, R + 1)

The model built here (`MMDetGFL`) has exactly these parameter names, so the imported
state is mmdetection's state, unchanged. Its anchors (points) sit at ``(x * s, y * s)``:
``point_offset`` 0.0.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detcore.models.backbones import RESNET_DEPTH_BY_LAYOUT

FAMILY = "mmdet-gfl"
GROUP_NORM_GROUPS = 32
# Keys whose values are implied by the rest (torchvision publishes ResNets without the BN counters).
OPTIONAL_KEY_SUFFIXES = ("num_batches_tracked", "bbox_head.integral.project")


class MMDetImportError(ValueError):
    """A state dict that does not have the layout of an mmdetection GFL detector (names the keys)."""


# ---------------------------------------------------------------------------------------------
# Architecture from shapes
# ---------------------------------------------------------------------------------------------


def _shape(state: Mapping[str, Tensor], key: str) -> tuple[int, ...]:
    if key not in state:
        raise MMDetImportError(f"mmdet-gfl checkpoint: expected key {key!r}. Missing in the state_dict.")
    return tuple(state[key].shape)


def _count(state: Mapping[str, Tensor], pattern: str) -> int:
    """Number of consecutive indices i (from 0) for which ``pattern.format(i)`` is a key."""
    n = 0
    while pattern.format(n) in state:
        n += 1
    return n


def infer_architecture(state: Mapping[str, Tensor], num_classes_hint: int | None = None) -> dict[str, Any]:
    """The architecture dict of an mmdetection GFL state dict, from tensor shapes only.

    Raises:
        MMDetImportError: a key the layout needs is missing, or shapes do not chain.
    """
    block = "bottleneck" if "backbone.layer1.0.conv3.weight" in state else "basic"
    stem_channels = _shape(state, "backbone.conv1.weight")[0]
    stage_blocks, stage_planes = [], []
    for stage in range(1, 5):
        blocks = _count(state, f"backbone.layer{stage}.{{}}.conv1.weight")
        if blocks == 0:
            raise MMDetImportError(
                f"mmdet-gfl checkpoint: expected key 'backbone.layer{stage}.0.conv1.weight' (a ResNet stage). Missing."
            )
        last = "conv3" if block == "bottleneck" else "conv2"
        out_channels = _shape(state, f"backbone.layer{stage}.0.{last}.weight")[0]
        planes = out_channels // 4 if block == "bottleneck" else out_channels
        if block == "bottleneck":
            conv2 = _shape(state, f"backbone.layer{stage}.0.conv2.weight")
            if conv2[0] != planes or conv2[1] != planes:
                raise MMDetImportError(
                    f"mmdet-gfl checkpoint: expected a ResNet bottleneck of width {planes} in layer{stage} "
                    f"(backbone.layer{stage}.0.conv2.weight [{planes}, {planes}, 3, 3]). Got {list(conv2)}; grouped "
                    "(ResNeXt) or other backbones are not supported."
                )
        stage_blocks.append(blocks)
        stage_planes.append(planes)
    expansion = 4 if block == "bottleneck" else 1
    stage_channels = [p * expansion for p in stage_planes]

    num_laterals = _count(state, "neck.lateral_convs.{}.conv.weight")
    num_outs = _count(state, "neck.fpn_convs.{}.conv.weight")
    if num_laterals == 0 or num_outs < num_laterals:
        raise MMDetImportError(
            "mmdet-gfl checkpoint: expected keys 'neck.lateral_convs.0.conv.weight' and 'neck.fpn_convs.0.conv.weight' "
            f"(an FPN neck). Found {num_laterals} lateral and {num_outs} output convs."
        )
    start_level = 4 - num_laterals
    fpn_in = [_shape(state, f"neck.lateral_convs.{i}.conv.weight")[1] for i in range(num_laterals)]
    if fpn_in != stage_channels[start_level:]:
        raise MMDetImportError(
            f"mmdet-gfl checkpoint: expected the FPN's lateral convs to read the last {num_laterals} ResNet stages "
            f"with channels {stage_channels[start_level:]}. Got input channels {fpn_in}."
        )
    fpn_channels = _shape(state, "neck.fpn_convs.0.conv.weight")[0]

    stacked_convs = _count(state, "bbox_head.cls_convs.{}.conv.weight")
    if _count(state, "bbox_head.reg_convs.{}.conv.weight") != stacked_convs:
        raise MMDetImportError(
            f"mmdet-gfl checkpoint: expected as many 'bbox_head.reg_convs.i' as 'bbox_head.cls_convs.i' ({stacked_convs})."
        )
    feat_channels = _shape(state, "bbox_head.cls_convs.0.conv.weight")[0] if stacked_convs else fpn_channels
    num_classes = _shape(state, "bbox_head.gfl_cls.weight")[0]
    reg_channels = _shape(state, "bbox_head.gfl_reg.weight")[0]
    if reg_channels % 4 or reg_channels < 8:
        raise MMDetImportError(
            f"mmdet-gfl checkpoint: expected bbox_head.gfl_reg.weight with 4*(reg_max+1) output channels. Got {reg_channels}."
        )
    reg_max = reg_channels // 4 - 1
    num_scales = _count(state, "bbox_head.scales.{}.scale")
    if num_scales != num_outs:
        raise MMDetImportError(
            f"mmdet-gfl checkpoint: expected one 'bbox_head.scales.i.scale' per FPN level ({num_outs}). Got {num_scales}."
        )
    if stacked_convs and feat_channels % GROUP_NORM_GROUPS:
        raise MMDetImportError(
            f"mmdet-gfl checkpoint: expected head convs whose width divides into GroupNorm's {GROUP_NORM_GROUPS} groups. "
            f"Got {feat_channels} (bbox_head.cls_convs.0.conv.weight)."
        )
    strides = [2 ** (start_level + 2 + i) for i in range(num_outs)]
    depth = RESNET_DEPTH_BY_LAYOUT.get((block, tuple(stage_blocks)))
    backbone_name = f"r{depth}" if depth else f"resnet-{block}-{'-'.join(str(b) for b in stage_blocks)}"
    return {
        "family": FAMILY,
        "name": f"mmdet_gfl_{backbone_name}_fpn{fpn_channels}",
        "backbone": {
            "depth": depth,
            "block": block,
            "stem_channels": int(stem_channels),
            "stage_blocks": [int(b) for b in stage_blocks],
            "stage_planes": [int(p) for p in stage_planes],
        },
        "neck": {"in_channels": [int(c) for c in fpn_in], "out_channels": int(fpn_channels), "num_outs": int(num_outs)},
        "head": {
            "in_channels": int(fpn_channels),
            "feat_channels": int(feat_channels),
            "stacked_convs": int(stacked_convs),
            "num_classes": int(num_classes),
            "reg_max": int(reg_max),
            "gn_groups": GROUP_NORM_GROUPS,
        },
        "strides": strides,
        "reg_max": int(reg_max),
    }


# ---------------------------------------------------------------------------------------------
# The model (parameter names are mmdetection's)
# ---------------------------------------------------------------------------------------------


class MMDetResNet(nn.Module):
    """ResNet with torchvision's blocks and names; returns the four stage outputs C2..C5."""

    def __init__(self, *, block: str, stem_channels: int, stage_blocks: Sequence[int], stage_planes: Sequence[int], **_: Any) -> None:
        super().__init__()
        from torchvision.models.resnet import BasicBlock, Bottleneck

        block_cls = Bottleneck if block == "bottleneck" else BasicBlock
        self.conv1 = nn.Conv2d(3, stem_channels, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_channels = stem_channels
        for index, (blocks, planes) in enumerate(zip(stage_blocks, stage_planes)):
            stride = 1 if index == 0 else 2
            out_channels = planes * block_cls.expansion
            downsample = None
            if stride != 1 or in_channels != out_channels:
                downsample = nn.Sequential(
                    nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
                )
            layers = [block_cls(in_channels, planes, stride, downsample)]
            layers += [block_cls(out_channels, planes) for _ in range(1, blocks)]
            self.add_module(f"layer{index + 1}", nn.Sequential(*layers))
            in_channels = out_channels

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return (c2, c3, c4, c5)


class _Conv(nn.Module):
    """mmcv's ConvModule without norm or activation: the key is ``conv.weight``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class _ConvGNReLU(nn.Module):
    """mmcv's ConvModule with GroupNorm: 3x3 conv without bias, ``gn``, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.gn = nn.GroupNorm(groups, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.gn(self.conv(x)))


class MMDetFPN(nn.Module):
    """mmdetection's FPN with ``add_extra_convs="on_output"`` and ``relu_before_extra_convs=False``."""

    def __init__(self, *, in_channels: Sequence[int], out_channels: int, num_outs: int) -> None:
        super().__init__()
        self.lateral_convs = nn.ModuleList(_Conv(c, out_channels, 1) for c in in_channels)
        self.fpn_convs = nn.ModuleList(
            _Conv(out_channels, out_channels, 3, stride=1 if i < len(in_channels) else 2) for i in range(num_outs)
        )

    def forward(self, features: Sequence[Tensor]) -> tuple[Tensor, ...]:
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:], mode="nearest")
        outputs = [self.fpn_convs[i](laterals[i]) for i in range(len(laterals))]
        for i in range(len(laterals), len(self.fpn_convs)):
            outputs.append(self.fpn_convs[i](outputs[-1]))  # P6 on P5's output, P7 on P6: no ReLU between
        return tuple(outputs)


class _Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class _Integral(nn.Module):
    def __init__(self, reg_max: int) -> None:
        super().__init__()
        self.register_buffer("project", torch.linspace(0, reg_max, reg_max + 1))


class MMDetGFLHead(nn.Module):
    """mmdetection's GFLHead forward: towers shared over levels, per-level Scale on the regression output."""

    def __init__(
        self, *, in_channels: int, feat_channels: int, stacked_convs: int, num_classes: int, reg_max: int, gn_groups: int,
        num_levels: int,
    ) -> None:
        super().__init__()
        self.cls_convs = nn.ModuleList(
            _ConvGNReLU(in_channels if i == 0 else feat_channels, feat_channels, gn_groups) for i in range(stacked_convs)
        )
        self.reg_convs = nn.ModuleList(
            _ConvGNReLU(in_channels if i == 0 else feat_channels, feat_channels, gn_groups) for i in range(stacked_convs)
        )
        tower_out = feat_channels if stacked_convs else in_channels
        self.gfl_cls = nn.Conv2d(tower_out, num_classes, 3, padding=1)
        self.gfl_reg = nn.Conv2d(tower_out, 4 * (reg_max + 1), 3, padding=1)
        self.scales = nn.ModuleList(_Scale() for _ in range(num_levels))
        self.integral = _Integral(reg_max)

    def forward(self, features: Sequence[Tensor]) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        cls_logits, box_logits = [], []
        for feature, scale in zip(features, self.scales):
            cls_feat, reg_feat = feature, feature
            for conv in self.cls_convs:
                cls_feat = conv(cls_feat)
            for conv in self.reg_convs:
                reg_feat = conv(reg_feat)
            cls_logits.append(self.gfl_cls(cls_feat))
            box_logits.append(scale(self.gfl_reg(reg_feat)))
        return tuple(cls_logits), tuple(box_logits)


class MMDetGFL(nn.Module):
    """An mmdetection GFL detector; ``forward(images)`` returns `DenseOutputs` (point_offset 0.0).

    ``images``: Tensor[B, 3, H, W] as `detcore.views.render` gives them (RGB, ImageNet mean/std).
    """

    def __init__(self, architecture: Mapping[str, Any]) -> None:
        super().__init__()
        self.architecture = dict(architecture)
        head = dict(architecture["head"])
        self.backbone = MMDetResNet(**architecture["backbone"])
        self.neck = MMDetFPN(**architecture["neck"])
        self.bbox_head = MMDetGFLHead(**head, num_levels=int(architecture["neck"]["num_outs"]))
        self.strides = tuple(int(s) for s in architecture["strides"])
        self.reg_max = int(head["reg_max"])
        self.num_classes = int(head["num_classes"])
        self.start_level = 4 - len(architecture["neck"]["in_channels"])

    def forward(self, images: Tensor, with_backbone: bool = False):
        from detcore.outputs import DenseOutputs

        if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"MMDetGFL.forward(images=) expects a Tensor[B, 3, H, W]. Got {shape}.")
        stages = self.backbone(images)
        pyramid = self.neck(stages[self.start_level :])
        cls_logits, box_logits = self.bbox_head(pyramid)
        return DenseOutputs(
            cls_logits=cls_logits,
            box_logits=box_logits,
            fpn_features=tuple(pyramid),
            strides=self.strides,
            reg_max=self.reg_max,
            backbone_features=tuple(stages[1:]) if with_backbone else None,
            point_offset=0.0,
        )


def build_mmdet_gfl(architecture: Mapping[str, Any]) -> MMDetGFL:
    """The module of an ``architecture`` dict written by `convert_mmdet_gfl` (weights not loaded)."""
    if architecture.get("family") != FAMILY:
        raise MMDetImportError(f"build_mmdet_gfl(architecture=) expects family {FAMILY!r}. Got {architecture.get('family')!r}.")
    return MMDetGFL(architecture)


# ---------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------


def checkpoint_classes(checkpoint: Mapping[str, Any]) -> list[str] | None:
    """Class names stored by mmcv 1.x (``meta['CLASSES']``) or mmengine (``meta['dataset_meta']['classes']``)."""
    meta = checkpoint.get("meta")
    if not isinstance(meta, Mapping):
        return None
    names = meta.get("CLASSES")
    if names is None and isinstance(meta.get("dataset_meta"), Mapping):
        names = meta["dataset_meta"].get("classes")
    if names is None:
        return None
    if isinstance(names, str):
        names = [names]
    return [str(n) for n in names]


def _format_keys(keys: Sequence[str], limit: int = 8) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def convert_mmdet_gfl(
    checkpoint: Mapping[str, Any], class_names: Sequence[str] | None
) -> tuple[dict[str, Any], dict[str, Tensor], list[str]]:
    """Architecture, state and classes of an mmdetection GFL checkpoint.

    Args:
        checkpoint: the loaded file, ``{"meta": ..., "state_dict": ...}``.
        class_names: names by class channel; default the checkpoint's own (``meta``).

    Returns:
        ``(architecture, model_state, classes)``: ``build_mmdet_gfl(architecture)`` loads
        ``model_state`` strictly.

    Raises:
        MMDetImportError: not this layout; missing or unknown keys (named); a class count that
            differs from ``bbox_head.gfl_cls``'s output channels; no class names anywhere.
    """
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("state_dict"), Mapping):
        found = sorted(checkpoint)[:8] if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise MMDetImportError(
            "mmdet-gfl checkpoint: expected an mmdetection file, a dict with 'meta' and 'state_dict'. "
            f"Got top-level {found}."
        )
    raw = checkpoint["state_dict"]
    state = {str(k): v for k, v in raw.items() if isinstance(v, Tensor)}
    if not any(k.startswith("bbox_head.gfl_cls.") for k in state):
        prefixes = sorted({k.split(".")[0] for k in state})
        raise MMDetImportError(
            "mmdet-gfl checkpoint: expected a GFL head ('bbox_head.gfl_cls.weight', 'bbox_head.gfl_reg.weight'). "
            f"Got state_dict keys under {prefixes[:8]}; is it another detector or format?"
        )
    architecture = infer_architecture(state)
    model = build_mmdet_gfl(architecture)
    expected = model.state_dict()
    unknown = [k for k in state if k not in expected]
    missing = [k for k in expected if k not in state and not k.endswith(OPTIONAL_KEY_SUFFIXES)]
    if unknown or missing:
        parts = []
        if missing:
            parts.append(f"missing keys: {_format_keys(missing)}")
        if unknown:
            parts.append(f"unknown keys: {_format_keys(unknown)}")
        raise MMDetImportError(f"mmdet-gfl checkpoint: the state_dict does not fit a GFL {_describe(architecture)}; " + "; ".join(parts) + ".")
    wrong = [f"{k} {list(state[k].shape)} (expected {list(v.shape)})" for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if wrong:
        raise MMDetImportError(f"mmdet-gfl checkpoint: tensor shapes do not chain: {'; '.join(wrong[:5])}.")
    project = state.get("bbox_head.integral.project")
    if project is not None and not torch.equal(project.float(), expected["bbox_head.integral.project"]):
        raise MMDetImportError(
            "mmdet-gfl checkpoint: expected bbox_head.integral.project = linspace(0, reg_max, reg_max + 1). Got other values."
        )
    model_state = {}
    for key, value in expected.items():
        tensor = state.get(key)
        model_state[key] = (value.clone() if tensor is None else tensor.detach().clone().to(value.dtype)).contiguous()

    num_classes = architecture["head"]["num_classes"]
    source = "--class-names"
    if class_names is None:
        class_names = checkpoint_classes(checkpoint)
        source = "the checkpoint's meta"
    if class_names is None:
        raise MMDetImportError(
            f"mmdet-gfl checkpoint: no class names in meta['CLASSES'] or meta['dataset_meta']['classes']; pass "
            f"--class-names FILE with {num_classes} names, one per line."
        )
    classes = [str(c) for c in class_names]
    if len(classes) != num_classes:
        raise MMDetImportError(
            f"mmdet-gfl checkpoint: {source} gives {len(classes)} class names, but the classifier "
            f"(bbox_head.gfl_cls.weight) has {num_classes} output channels."
        )
    return architecture, model_state, classes


def _describe(architecture: Mapping[str, Any]) -> str:
    backbone = architecture["backbone"]
    depth = backbone["depth"]
    name = f"ResNet-{depth}" if depth else f"ResNet ({backbone['block']}, blocks {backbone['stage_blocks']})"
    return f"{name} FPN-{architecture['neck']['out_channels']} head"

