"""Feature pyramid P3-P7 over backbone stages C3-C5 (mmdetection's FPN as GFL uses it).

Legend: B images, C FPN channels. Inputs: C3, C4, C5 (Tensor[B, C_s, H_s, W_s]);
outputs: P3..P7, Tensor[B, C, ceil(H / s), ceil(W / s)] for s = 8..128.

P3-P5: 1x1 lateral convs, nearest top-down upsampling to the lateral's size, 3x3 output
convs. P6 is a stride-2 3x3 conv on the P5 *output* (mmdetection's
``add_extra_convs="on_output"``) and P7 a stride-2 3x3 conv on relu(P6). No norm layers.
"""

from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn


class FPN(nn.Module):
    """P3-P7 from three backbone stages.

    Args:
        in_channels: channels of C3, C4, C5.
        out_channels: C, the width of every level.
        num_levels: 5 for P3-P7 (3 to 5 allowed: extra levels beyond P5 come from convs).
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int, num_levels: int = 5) -> None:
        super().__init__()
        if len(in_channels) != 3:
            raise ValueError(f"FPN(in_channels=) expects the channels of C3, C4, C5. Got {list(in_channels)}.")
        if not 3 <= num_levels <= 5:
            raise ValueError(f"FPN(num_levels=) expects 3 to 5 levels (P3..P7). Got {num_levels}.")
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.output_convs = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels)
        self.extra_convs = nn.ModuleList(
            nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1) for _ in range(num_levels - 3)
        )
        self.out_channels = int(out_channels)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, features: Sequence[Tensor]) -> tuple[Tensor, ...]:
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest")
        outputs = [conv(x) for conv, x in zip(self.output_convs, laterals)]
        for index, conv in enumerate(self.extra_convs):
            outputs.append(conv(outputs[-1] if index == 0 else F.relu(outputs[-1])))
        return tuple(outputs)
