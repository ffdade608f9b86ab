"""Backbones returning stage features C3, C4, C5 (strides 8, 16, 32).

Legend: B images, C_s channels of stage s. Input Tensor[B, 3, H, W] normalised; output
a tuple of three Tensor[B, C_s, ceil(H / s), ceil(W / s)].

Weights are never downloaded: a ResNet starts from scratch (trainable BatchNorm) or from
a state_dict file the user points to (torchvision's ImageNet files work as they are).
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import Tensor, nn

RESNET_DEPTHS = (18, 34, 50, 101)
# torchvision's ResNets by (block type, blocks per stage): how importers tell the depth from a state dict.
RESNET_DEPTH_BY_LAYOUT = {
    ("basic", (2, 2, 2, 2)): 18,
    ("basic", (3, 4, 6, 3)): 34,
    ("bottleneck", (3, 4, 6, 3)): 50,
    ("bottleneck", (3, 4, 23, 3)): 101,
    ("bottleneck", (3, 8, 36, 3)): 152,
}
TINY_WIDTHS = (16, 32, 64, 96, 128)


class BackboneWeightsError(ValueError):
    """A backbone weights file that is missing or does not fit the architecture."""


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class TinyBackbone(nn.Module):
    """A plain conv-BN-ReLU CNN for students: about 0.47M parameters with the default widths.

    Stage i (stride 2^i) is a stride-2 3x3 conv followed, from stage 2 on, by a stride-1
    3x3 conv; C3, C4, C5 are the outputs of stages 3, 4, 5.
    """

    def __init__(self, widths: Sequence[int] = TINY_WIDTHS) -> None:
        super().__init__()
        if len(widths) != 5 or any(int(w) <= 0 for w in widths):
            raise ValueError(f"TinyBackbone(widths=) expects five positive stage widths. Got {list(widths)}.")
        stages = []
        in_channels = 3
        for index, width in enumerate(widths):
            layers = [_conv_bn_relu(in_channels, width, 2)]
            if index > 0:
                layers.append(_conv_bn_relu(width, width, 1))
            stages.append(nn.Sequential(*layers))
            in_channels = width
        self.stages = nn.ModuleList(stages)
        self.out_channels = tuple(int(w) for w in widths[2:])
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = images
        features = []
        for index, stage in enumerate(self.stages):
            x = stage(x)
            if index >= 2:
                features.append(x)
        return tuple(features)


class ResNetBackbone(nn.Module):
    """torchvision ResNet-{18,34,50,101} truncated after ``layer4``; returns layer2..layer4.

    Args:
        depth: 18, 34, 50 or 101.
        weights_path: optional state_dict file (torchvision's ImageNet checkpoints, or
            any dict with the ResNet's keys; ``fc.*`` is ignored). Never downloaded.
        frozen_bn: keep every BatchNorm in eval mode (running statistics never update) and
            freeze the stem and ``layer1`` entirely (mmdetection's ``norm_eval=True,
            frozen_stages=1`` for pretrained backbones; BatchNorm's affine parameters of
            layer2-4 still train, as with its ``norm_cfg=dict(type="BN", requires_grad=True)``).
            Use False when training from scratch.
    """

    def __init__(self, depth: int, weights_path: str | None = None, frozen_bn: bool = False) -> None:
        super().__init__()
        import torchvision

        if depth not in RESNET_DEPTHS:
            raise ValueError(f"ResNetBackbone(depth=) expects one of {RESNET_DEPTHS}. Got {depth}.")
        resnet = getattr(torchvision.models, f"resnet{depth}")(weights=None)
        if weights_path is not None:
            load_resnet_weights(resnet, weights_path)
        self.stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4
        expansion = 4 if depth >= 50 else 1
        self.out_channels = (128 * expansion, 256 * expansion, 512 * expansion)
        self.frozen_bn = bool(frozen_bn)
        if self.frozen_bn:
            for module in (self.stem, self.layer1):
                for parameter in module.parameters():
                    parameter.requires_grad_(False)

    def train(self, mode: bool = True) -> "ResNetBackbone":
        super().train(mode)
        if self.frozen_bn:
            for module in self.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.eval()
        return self

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = self.layer1(self.stem(images))
        c3 = self.layer2(x)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return (c3, c4, c5)


def load_resnet_weights(resnet: nn.Module, path: str) -> None:
    """Load a state_dict file into a torchvision ResNet; ``fc.*`` keys are optional and ignored."""
    if not os.path.isfile(path):
        raise BackboneWeightsError(
            f"load_resnet_weights(path=) expects an existing state_dict file. Got {path!r}, which does not exist."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and runtime errors all mean "not a state_dict file"
        raise BackboneWeightsError(
            f"load_resnet_weights(path=) expects a torch.save'd state_dict. Could not read {path!r}: {type(error).__name__}."
        ) from error
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BackboneWeightsError(f"load_resnet_weights(path=) expects a state_dict. Got {type(state).__name__} in {path!r}.")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        missing, unexpected = resnet.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches
        detail = str(error).strip().splitlines()[-1].strip()
        raise BackboneWeightsError(
            f"load_resnet_weights(path={path!r}) expects the tensor shapes of {type(resnet).__name__}. Got {detail}"
        ) from error
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise BackboneWeightsError(
            f"load_resnet_weights(path={path!r}) expects the keys of {type(resnet).__name__}. "
            f"Missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {list(unexpected)[:5]}{'...' if len(unexpected) > 5 else ''}."
        )


def build_backbone(name: str, weights_path: str | None = None, frozen_bn: bool = False) -> nn.Module:
    """``"tiny"`` or ``"resnet18"`` / ``"resnet34"`` / ``"resnet50"`` / ``"resnet101"``."""
    if name == "tiny":
        if weights_path is not None:
            raise BackboneWeightsError(f"build_backbone(weights_path=) is only for ResNets. Got {weights_path!r} for 'tiny'.")
        return TinyBackbone()
    if name.startswith("resnet") and name[6:].isdigit() and int(name[6:]) in RESNET_DEPTHS:
        return ResNetBackbone(int(name[6:]), weights_path=weights_path, frozen_bn=frozen_bn)
    names = ["tiny"] + [f"resnet{d}" for d in RESNET_DEPTHS]
    raise ValueError(f"build_backbone(name=) expects one of {names}. Got {name!r}.")
