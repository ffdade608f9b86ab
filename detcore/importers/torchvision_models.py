"""torchvision FCOS and RetinaNet detectors as distillery teachers.

Legend: B images, K classes, A anchors per point (1 for FCOS, 9 for RetinaNet), C channels.

`convert_torchvision_state` reads the ``state_dict`` of torchvision's ``fcos_resnet50_fpn``,
``retinanet_resnet50_fpn`` or ``retinanet_resnet50_fpn_v2`` (any class count, any ResNet
depth, with or without BatchNorm's ``num_batches_tracked``), infers the architecture from the
tensor shapes and returns it as a plain dict; `build_torchvision_detector` rebuilds the model
from that dict with torchvision's own backbone, FPN and head modules.

What differs from torchvision's ``FCOS`` / ``RetinaNet`` modules: no ``GeneralizedRCNNTransform``
(the input is a view rendered by `detcore.views.render`, already normalised: torchvision's
ImageNet mean and std on 0-1 pixels are this project's on 0-255 pixels) and no anchors or post-processing: ``forward`` returns the raw
per-level maps as `detcore.outputs.DenseOutputs`:

- FCOS: ``cls_logits[l]`` Tensor[B, K, H, W], the head's raw sigmoid logits;
  ``distances[l]`` Tensor[B, 4, H, W], the ReLU'd regression (left, top, right, bottom).
  torchvision decodes it with ``BoxLinearCoder(normalize_by_size=True)`` against an anchor of
  side ``s`` (anchor sizes 8..128 equal the strides), so it is already in stride units.
  Cell (x, y) sits at ``(x * s, y * s)`` (``AnchorGenerator`` shifts by ``arange(W) * s``):
  ``point_offset`` 0.0. The centerness branch (``bbox_ctrness``) is computed by the head
  but not part of DenseOutputs: torchvision multiplies it into the score only at
  post-processing (``sqrt(sigmoid(cls) * sigmoid(ctrness))``); class distillation uses the raw
  logits. `TorchvisionDenseDetector.centerness` returns it per level when needed.
- RetinaNet: A = 9 anchors per point leave no per-point class or box map, so only
  ``fpn_features`` (and backbone features) are given; cls_logits, box_logits, distances are None.

Strides are those of the levels P3..P7, (8, 16, 32, 64, 128). torchvision pads images to a
multiple of 32 before its backbone; canvases that are multiples of 128 give the same grids.
"""

from __future__ import annotations

import re
from functools import partial
from typing import Any, Mapping, Sequence

from torch import Tensor, nn

from detcore.models.backbones import RESNET_DEPTH_BY_LAYOUT

TORCHVISION_KINDS = ("fcos", "retinanet")
TORCHVISION_STRIDES = (8, 16, 32, 64, 128)
TORCHVISION_POINT_OFFSET = 0.0
FPN_CHANNELS = 256

_BACKBONE_PREFIX = "backbone.body."
_FCOS_MARKER = "head.regression_head.bbox_ctrness.weight"
_CLS_WEIGHT = "head.classification_head.cls_logits.weight"
_REG_WEIGHT = "head.regression_head.bbox_reg.weight"
_P6_WEIGHT = "backbone.fpn.extra_blocks.p6.weight"
_SHOWN_KEYS = 12


class TorchvisionImportError(ValueError):
    """A state_dict that is not one of the supported torchvision detectors (names the keys or shapes)."""


def _show(keys: Sequence[str]) -> str:
    keys = sorted(keys)
    more = f" ... ({len(keys) - _SHOWN_KEYS} more)" if len(keys) > _SHOWN_KEYS else ""
    return ", ".join(keys[:_SHOWN_KEYS]) + more


def _plain_state(state_dict: Mapping[str, Any]) -> dict[str, Tensor]:
    """The tensors of a state_dict; unwraps torchvision's training checkpoints (``{"model": ...}``)."""
    if not isinstance(state_dict, Mapping):
        raise TorchvisionImportError(f"convert_torchvision_state(state_dict=) expects a mapping of tensors. Got {type(state_dict).__name__}.")
    if "model" in state_dict and isinstance(state_dict["model"], Mapping):
        state_dict = state_dict["model"]
    not_tensors = [str(k) for k, v in state_dict.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise TorchvisionImportError(
            f"convert_torchvision_state(state_dict=) expects a state_dict (name -> tensor). Got non-tensor values at keys: {_show(not_tensors)}."
        )
    state = {str(k): v for k, v in state_dict.items()}
    if state and all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _require(state: Mapping[str, Tensor], keys: Sequence[str], kind: str) -> None:
    missing = [k for k in keys if k not in state]
    if missing:
        raise TorchvisionImportError(
            f"convert_torchvision_state(kind={kind!r}) expects the keys of torchvision's {kind} state_dict. Missing keys: {_show(missing)}."
        )


def _infer_backbone(state: Mapping[str, Tensor], kind: str) -> dict[str, Any]:
    block_counts = []
    for stage in range(1, 5):
        pattern = re.compile(rf"^{re.escape(_BACKBONE_PREFIX)}layer{stage}\.(\d+)\.")
        blocks = {int(m.group(1)) for k in state if (m := pattern.match(k))}
        if not blocks:
            raise TorchvisionImportError(
                f"convert_torchvision_state(kind={kind!r}) expects a ResNet backbone. Missing keys: {_BACKBONE_PREFIX}layer{stage}.*."
            )
        block_counts.append(max(blocks) + 1)
    block = "bottleneck" if f"{_BACKBONE_PREFIX}layer1.0.conv3.weight" in state else "basic"
    depth = RESNET_DEPTH_BY_LAYOUT.get((block, tuple(block_counts)))
    if depth is None:
        raise TorchvisionImportError(
            f"convert_torchvision_state(kind={kind!r}) expects a ResNet-18/34/50/101/152 backbone. "
            f"Got {block} blocks {block_counts} under {_BACKBONE_PREFIX}layer1..4."
        )
    with_counter = any(k.endswith("num_batches_tracked") for k in state if k.startswith(_BACKBONE_PREFIX))
    return {"depth": depth, "norm": "batch_norm" if with_counter else "frozen_batch_norm"}


def convert_torchvision_state(
    kind: str,
    state_dict: Mapping[str, Any],
    class_names: Sequence[str],
    *,
    batch_norm_eps: float | None = None,
) -> tuple[dict[str, Any], dict[str, Tensor], list[str]]:
    """Architecture, model state and classes of a torchvision FCOS / RetinaNet state_dict.

    Args:
        kind: ``"fcos"`` (``fcos_resnet50_fpn``) or ``"retinanet"`` (``retinanet_resnet50_fpn``
            and ``_v2``, told apart by their head's GroupNorm and P6's input).
        state_dict: the model's ``state_dict`` (a ``{"model": state_dict}`` training checkpoint
            and ``module.`` prefixes are accepted).
        class_names: one name per classifier output channel (K = cls_logits channels / A).
        batch_norm_eps: the backbone's BatchNorm eps. Default 1e-5, except for a RetinaNet v1
            state without ``num_batches_tracked``: 0.0, as torchvision loads its COCO weights
            (``overwrite_eps(model, 0.0)``).

    The backbone's normalisation follows the file: a state with ``num_batches_tracked``
    comes from ``nn.BatchNorm2d`` (run in eval mode), one without from torchvision's
    ``FrozenBatchNorm2d`` (its published detection weights).

    Returns:
        (architecture, model_state, classes): a plain dict for `build_torchvision_detector`
        (``family`` "torchvision-fcos" or "torchvision-retinanet"), the state_dict of the
        rebuilt model in the current torchvision layout, and the class names.

    Raises:
        TorchvisionImportError: unknown kind, a state of the other kind, missing or unexpected
            keys, wrong shapes, or a class count that differs from the classifier's.
    """
    if kind not in TORCHVISION_KINDS:
        raise TorchvisionImportError(f"convert_torchvision_state(kind=) expects one of {TORCHVISION_KINDS}. Got {kind!r}.")
    state = _plain_state(state_dict)
    _require(state, [_CLS_WEIGHT, _REG_WEIGHT, _P6_WEIGHT], kind)
    is_fcos = _FCOS_MARKER in state
    if kind == "fcos" and not is_fcos:
        raise TorchvisionImportError(
            f"convert_torchvision_state(kind='fcos') expects an FCOS state_dict with key {_FCOS_MARKER}. "
            "It is missing: this looks like a RetinaNet state_dict (use kind='retinanet')."
        )
    if kind == "retinanet" and is_fcos:
        raise TorchvisionImportError(
            f"convert_torchvision_state(kind='retinanet') expects a RetinaNet state_dict. Got key {_FCOS_MARKER}: "
            "this looks like an FCOS state_dict (use kind='fcos')."
        )

    num_anchors = int(state[_REG_WEIGHT].shape[0]) // 4
    cls_channels = int(state[_CLS_WEIGHT].shape[0])
    if num_anchors < 1 or cls_channels % num_anchors:
        raise TorchvisionImportError(
            f"convert_torchvision_state(kind={kind!r}) expects {_CLS_WEIGHT} with a multiple of A={num_anchors} output channels. "
            f"Got shape {tuple(state[_CLS_WEIGHT].shape)}."
        )
    num_classes = cls_channels // num_anchors
    classes = [str(name) for name in class_names]
    if len(classes) != num_classes:
        raise TorchvisionImportError(
            f"convert_torchvision_state(class_names=) expects {num_classes} names, one per output channel of {_CLS_WEIGHT} "
            f"({cls_channels} channels / {num_anchors} anchors). Got {len(classes)}."
        )

    backbone = _infer_backbone(state, kind)
    p6_in = int(state[_P6_WEIGHT].shape[1])
    head_norm = "group_norm" if "head.classification_head.conv.0.1.weight" in state else None
    if is_fcos:
        conv_indices = {int(m.group(1)) for k in state if (m := re.match(r"^head\.classification_head\.conv\.(\d+)\.weight$", k))}
        num_convs = len(conv_indices) // 2  # Conv2d and GroupNorm per stacked conv
        head_norm = "group_norm"
    else:
        num_convs = 4  # RetinaNetHead stacks four convs, always
    if batch_norm_eps is None:
        v1_published = kind == "retinanet" and head_norm is None and backbone["norm"] == "frozen_batch_norm"
        batch_norm_eps = 0.0 if v1_published else 1e-5
    backbone["norm_eps"] = float(batch_norm_eps)

    variant = "_v2" if kind == "retinanet" and head_norm == "group_norm" else ""
    architecture = {
        "family": f"torchvision-{kind}",
        "name": f"torchvision_{kind}_r{backbone['depth']}_fpn{variant}",
        "backbone": backbone,
        "fpn_channels": FPN_CHANNELS,
        "extra_levels_from": "p5" if p6_in == FPN_CHANNELS else "c5",
        "extra_levels_in_channels": p6_in,
        "num_classes": num_classes,
        "num_anchors": num_anchors,
        "num_head_convs": num_convs,
        "head_norm": head_norm,
        "strides": list(TORCHVISION_STRIDES),
        "point_offset": TORCHVISION_POINT_OFFSET,
    }
    model = build_torchvision_detector(architecture)
    load_torchvision_state(model, state)
    return architecture, model.state_dict(), classes


def load_torchvision_state(model: "TorchvisionDenseDetector", state: Mapping[str, Tensor]) -> None:
    """Load a state into a built model; BatchNorm counters may be absent, every other key must match."""
    family = model.architecture["family"]
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches
        detail = " ".join(line.strip() for line in str(error).strip().splitlines()[1:])
        raise TorchvisionImportError(f"A {family} state_dict expects the tensor shapes of the architecture inferred from it. Got: {detail}") from error
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_show(unexpected)}")
        raise TorchvisionImportError(f"A {family} state_dict expects exactly the keys of torchvision's model. Got {'; '.join(parts)}.")


def _check_architecture(architecture: Mapping[str, Any]) -> None:
    required = ("family", "backbone", "extra_levels_in_channels", "num_classes", "num_anchors", "num_head_convs", "head_norm", "strides")
    missing = [k for k in required if k not in architecture]
    if missing:
        raise TorchvisionImportError(f"build_torchvision_detector(architecture=) expects the keys {required}. Missing: {missing}.")
    if architecture["family"] not in ("torchvision-fcos", "torchvision-retinanet"):
        raise TorchvisionImportError(
            f"build_torchvision_detector(architecture=) expects family 'torchvision-fcos' or 'torchvision-retinanet'. Got {architecture['family']!r}."
        )
    if tuple(architecture["strides"]) != TORCHVISION_STRIDES:
        raise TorchvisionImportError(f"build_torchvision_detector(architecture=) expects strides {list(TORCHVISION_STRIDES)}. Got {architecture['strides']}.")


class TorchvisionDenseDetector(nn.Module):
    """torchvision's ResNet-FPN backbone and FCOS / RetinaNet head, without transform or post-processing.

    The submodules keep torchvision's names (``backbone`` = ``BackboneWithFPN``, ``head``), so
    the state_dict keys are those of torchvision's ``FCOS`` / ``RetinaNet``.
    """

    def __init__(self, architecture: Mapping[str, Any]) -> None:
        super().__init__()
        from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
        from torchvision.models.detection.fcos import FCOSHead
        from torchvision.models.detection.retinanet import RetinaNetHead
        from torchvision.ops.feature_pyramid_network import LastLevelP6P7
        from torchvision.ops.misc import FrozenBatchNorm2d

        _check_architecture(architecture)
        self.architecture = dict(architecture)
        backbone = architecture["backbone"]
        norm_class = FrozenBatchNorm2d if backbone["norm"] == "frozen_batch_norm" else nn.BatchNorm2d
        self.backbone = resnet_fpn_backbone(
            backbone_name=f"resnet{int(backbone['depth'])}",
            weights=None,
            norm_layer=partial(norm_class, eps=float(backbone["norm_eps"])),
            trainable_layers=5,
            returned_layers=[2, 3, 4],
            extra_blocks=LastLevelP6P7(int(architecture["extra_levels_in_channels"]), FPN_CHANNELS),
        )
        head_norm = partial(nn.GroupNorm, 32) if architecture["head_norm"] == "group_norm" else None
        num_classes = int(architecture["num_classes"])
        num_anchors = int(architecture["num_anchors"])
        if self.is_fcos:
            self.head = FCOSHead(FPN_CHANNELS, num_anchors, num_classes, num_convs=int(architecture["num_head_convs"]))
        else:
            self.head = RetinaNetHead(FPN_CHANNELS, num_anchors, num_classes, norm_layer=head_norm)
        self.eval()

    @property
    def is_fcos(self) -> bool:
        return self.architecture["family"] == "torchvision-fcos"

    @property
    def num_classes(self) -> int:
        return int(self.architecture["num_classes"])

    @property
    def strides(self) -> tuple[int, ...]:
        return TORCHVISION_STRIDES

    def features(self, images: Tensor) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """(backbone C3..C5, FPN P3..P7): ``BackboneWithFPN.forward`` with its stage outputs kept."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"{type(self).__name__}(images=) expects Tensor[B, 3, H, W]. Got shape {tuple(images.shape)}.")
        stages = self.backbone.body(images)
        pyramid = self.backbone.fpn(stages)
        return tuple(stages.values()), tuple(pyramid.values())

    def fcos_maps(self, fpn_features: Sequence[Tensor]) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...], tuple[Tensor, ...]]:
        """FCOS head per level: (cls_logits [B, K, H, W], distances [B, 4, H, W], centerness logits [B, 1, H, W])."""
        classification, regression = self.head.classification_head, self.head.regression_head
        cls_logits, distances, centerness = [], [], []
        for feature in fpn_features:
            cls_logits.append(classification.cls_logits(classification.conv(feature)))
            box_feature = regression.conv(feature)
            distances.append(nn.functional.relu(regression.bbox_reg(box_feature)))
            centerness.append(regression.bbox_ctrness(box_feature))
        return tuple(cls_logits), tuple(distances), tuple(centerness)

    def centerness(self, images: Tensor) -> tuple[Tensor, ...]:
        """FCOS centerness logits per level, Tensor[B, 1, H, W] (torchvision multiplies them into the score)."""
        if not self.is_fcos:
            raise ValueError(f"{type(self).__name__}.centerness() needs an FCOS model. Got {self.architecture['family']!r}.")
        return self.fcos_maps(self.features(images)[1])[2]

    def forward(self, images: Tensor, with_backbone: bool = False):
        """Raw per-level outputs of rendered views ``images`` Tensor[B, 3, H, W] as DenseOutputs."""
        from detcore.outputs import DenseOutputs

        stages, pyramid = self.features(images)
        cls_logits = distances = None
        if self.is_fcos:
            cls_logits, distances, _ = self.fcos_maps(pyramid)
        return DenseOutputs(
            cls_logits=cls_logits,
            box_logits=None,
            fpn_features=pyramid,
            strides=TORCHVISION_STRIDES,
            reg_max=None,
            backbone_features=stages if with_backbone else None,
            distances=distances,
            point_offset=TORCHVISION_POINT_OFFSET,
        )


def build_torchvision_detector(architecture: Mapping[str, Any]) -> TorchvisionDenseDetector:
    """The model described by `convert_torchvision_state`'s architecture dict, in eval mode, random weights."""
    return TorchvisionDenseDetector(architecture)
