"""The GFL head (mmdetection's ``GFLHead``): shared towers, classification and edge-distribution convs.

Legend: B images, C_in FPN channels, C head channels, K classes, R reg_max.
Per level input Tensor[B, C_in, H, W]; outputs per level
    cls_logits  Tensor[B, K, H, W]         (bias initialised to the prior 0.01)
    box_logits  Tensor[B, 4*(R+1), H, W]   (channel e*(R+1) + j: bin j of edge e in l, t, r, b)
The towers and output convs are shared across levels; each level has its own learnable
scalar that multiplies the box logits.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

PRIOR_PROBABILITY = 0.01


def group_norm_groups(channels: int, max_groups: int = 32, min_channels_per_group: int = 4) -> int:
    """GroupNorm groups: 32 for wide heads, fewer (at least 4 channels each) for narrow ones."""
    groups = max(1, min(max_groups, channels // min_channels_per_group))
    while channels % groups:
        groups -= 1
    return groups


class Scale(nn.Module):
    """A learnable scalar multiplier (mmcv's ``Scale``)."""

    def __init__(self, value: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


def _tower(in_channels: int, channels: int, num_convs: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for index in range(num_convs):
        layers += [
            nn.Conv2d(in_channels if index == 0 else channels, channels, 3, padding=1, bias=False),
            nn.GroupNorm(group_norm_groups(channels), channels),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers)


class GFLHead(nn.Module):
    """Args:
    in_channels: C_in, the FPN width.
    channels: C, the tower width.
    num_classes: K.
    num_convs: convs per tower (4 in GFL).
    reg_max: R.
    num_levels: levels, one Scale each.
    """

    def __init__(
        self, *, in_channels: int, channels: int, num_classes: int, num_convs: int, reg_max: int, num_levels: int
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"GFLHead(num_classes=) expects at least one class. Got {num_classes}.")
        if num_convs < 0:
            raise ValueError(f"GFLHead(num_convs=) expects a non-negative count. Got {num_convs}.")
        self.num_classes = int(num_classes)
        self.reg_max = int(reg_max)
        self.cls_tower = _tower(in_channels, channels, num_convs)
        self.reg_tower = _tower(in_channels, channels, num_convs)
        tower_out = channels if num_convs > 0 else in_channels
        self.cls_conv = nn.Conv2d(tower_out, num_classes, 3, padding=1)
        self.box_conv = nn.Conv2d(tower_out, 4 * (reg_max + 1), 3, padding=1)
        self.scales = nn.ModuleList(Scale(1.0) for _ in range(num_levels))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.constant_(self.cls_conv.bias, -math.log((1 - PRIOR_PROBABILITY) / PRIOR_PROBABILITY))

    def forward(self, features: Sequence[Tensor]) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        if len(features) != len(self.scales):
            raise ValueError(f"GFLHead expects {len(self.scales)} levels. Got {len(features)}.")
        cls_logits, box_logits = [], []
        for feature, scale in zip(features, self.scales):
            cls_logits.append(self.cls_conv(self.cls_tower(feature)))
            box_logits.append(scale(self.box_conv(self.reg_tower(feature))))
        return tuple(cls_logits), tuple(box_logits)
