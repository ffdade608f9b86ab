"""Random-weight checkpoints in mmdetection's GFL key layout, and an independent functional forward.

Both are written from mmdetection's sources (ResNet style "pytorch", FPN with
``add_extra_convs="on_output"`` and no ReLU before the extra convs, GFLHead with
GroupNorm(32) towers and a per-level Scale on the regression conv), not from
`detcore.importers.mmdet_gfl`, so that the import is checked against them.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F

R18 = dict(block="basic", blocks=(2, 2, 2, 2), planes=(64, 128, 256, 512), stem=64)
R50_TINY = dict(block="bottleneck", blocks=(3, 4, 6, 3), planes=(8, 16, 32, 64), stem=8)


def _bn(state, prefix, channels, gen):
    state[f"{prefix}.weight"] = 1.0 + 0.1 * torch.randn(channels, generator=gen)
    state[f"{prefix}.bias"] = 0.1 * torch.randn(channels, generator=gen)
    state[f"{prefix}.running_mean"] = 0.1 * torch.randn(channels, generator=gen)
    state[f"{prefix}.running_var"] = 0.5 + torch.rand(channels, generator=gen)
    state[f"{prefix}.num_batches_tracked"] = torch.tensor(100)


def _conv(state, key, out_c, in_c, k, gen, bias=False):
    state[f"{key}.weight"] = torch.randn(out_c, in_c, k, k, generator=gen) * (2.0 / (in_c * k * k)) ** 0.5
    if bias:
        state[f"{key}.bias"] = 0.1 * torch.randn(out_c, generator=gen)


def mmdet_gfl_state(
    backbone=R18, *, fpn_channels=64, feat_channels=32, stacked_convs=2, num_classes=5, reg_max=7, seed=0
) -> "OrderedDict[str, torch.Tensor]":
    """A GFL state dict with mmdetection's keys: ResNet, FPN (start_level 1, 5 outputs), GFL head."""
    gen = torch.Generator().manual_seed(seed)
    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    stem = backbone["stem"]
    expansion = 4 if backbone["block"] == "bottleneck" else 1
    _conv(state, "backbone.conv1", stem, 3, 7, gen)
    _bn(state, "backbone.bn1", stem, gen)
    in_c = stem
    stage_out = []
    for s, (blocks, planes) in enumerate(zip(backbone["blocks"], backbone["planes"]), start=1):
        out_c = planes * expansion
        for b in range(blocks):
            p = f"backbone.layer{s}.{b}"
            if backbone["block"] == "bottleneck":
                _conv(state, f"{p}.conv1", planes, in_c, 1, gen)
                _bn(state, f"{p}.bn1", planes, gen)
                _conv(state, f"{p}.conv2", planes, planes, 3, gen)
                _bn(state, f"{p}.bn2", planes, gen)
                _conv(state, f"{p}.conv3", out_c, planes, 1, gen)
                _bn(state, f"{p}.bn3", out_c, gen)
            else:
                _conv(state, f"{p}.conv1", planes, in_c, 3, gen)
                _bn(state, f"{p}.bn1", planes, gen)
                _conv(state, f"{p}.conv2", planes, planes, 3, gen)
                _bn(state, f"{p}.bn2", planes, gen)
            if b == 0 and (s > 1 or in_c != out_c):
                _conv(state, f"{p}.downsample.0", out_c, in_c, 1, gen)
                _bn(state, f"{p}.downsample.1", out_c, gen)
            in_c = out_c
        stage_out.append(out_c)
    for i, c in enumerate(stage_out[1:]):
        _conv(state, f"neck.lateral_convs.{i}.conv", fpn_channels, c, 1, gen, bias=True)
    for i in range(5):
        _conv(state, f"neck.fpn_convs.{i}.conv", fpn_channels, fpn_channels, 3, gen, bias=True)
    for tower in ("cls_convs", "reg_convs"):
        for i in range(stacked_convs):
            _conv(state, f"bbox_head.{tower}.{i}.conv", feat_channels, fpn_channels if i == 0 else feat_channels, 3, gen)
            state[f"bbox_head.{tower}.{i}.gn.weight"] = 1.0 + 0.1 * torch.randn(feat_channels, generator=gen)
            state[f"bbox_head.{tower}.{i}.gn.bias"] = 0.1 * torch.randn(feat_channels, generator=gen)
    _conv(state, "bbox_head.gfl_cls", num_classes, feat_channels, 3, gen, bias=True)
    _conv(state, "bbox_head.gfl_reg", 4 * (reg_max + 1), feat_channels, 3, gen, bias=True)
    for i in range(5):
        state[f"bbox_head.scales.{i}.scale"] = torch.tensor(0.5 + float(i) * 0.25)
    state["bbox_head.integral.project"] = torch.linspace(0, reg_max, reg_max + 1)
    return state


def mmdet_v2_file(state, classes):
    """mmcv 1.x checkpoint: class names in meta['CLASSES']."""
    return {"meta": {"mmdet_version": "2.28.2", "CLASSES": tuple(classes), "epoch": 24}, "state_dict": state}


def mmdet_v3_file(state, classes):
    """mmengine checkpoint: class names in meta['dataset_meta']['classes']."""
    palette = [(i, 2 * i, 3 * i) for i in range(len(classes))]
    meta = {"mmengine_version": "0.10.3", "dataset_meta": {"classes": tuple(classes), "palette": palette}, "epoch": 24}
    return {"meta": meta, "state_dict": state}


# ---------------------------------------------------------------------------------------------
# Independent forward from the raw state dict
# ---------------------------------------------------------------------------------------------


def _bn_f(x, s, p):
    return F.batch_norm(x, s[f"{p}.running_mean"], s[f"{p}.running_var"], s[f"{p}.weight"], s[f"{p}.bias"], False, 0.0, 1e-5)


def _block_f(x, s, p, bottleneck, stride):
    if bottleneck:
        out = F.relu(_bn_f(F.conv2d(x, s[f"{p}.conv1.weight"]), s, f"{p}.bn1"))
        out = F.relu(_bn_f(F.conv2d(out, s[f"{p}.conv2.weight"], stride=stride, padding=1), s, f"{p}.bn2"))
        out = _bn_f(F.conv2d(out, s[f"{p}.conv3.weight"]), s, f"{p}.bn3")
    else:
        out = F.relu(_bn_f(F.conv2d(x, s[f"{p}.conv1.weight"], stride=stride, padding=1), s, f"{p}.bn1"))
        out = _bn_f(F.conv2d(out, s[f"{p}.conv2.weight"], padding=1), s, f"{p}.bn2")
    identity = x
    if f"{p}.downsample.0.weight" in s:
        identity = _bn_f(F.conv2d(x, s[f"{p}.downsample.0.weight"], stride=stride), s, f"{p}.downsample.1")
    return F.relu(out + identity)


def reference_forward(state, images, relu_before_p7=False):
    """mmdetection's GFL forward from the state dict: (C3..C5, P3..P7, cls per level, reg per level after Scale)."""
    s = state
    bottleneck = "backbone.layer1.0.conv3.weight" in s
    x = F.max_pool2d(F.relu(_bn_f(F.conv2d(images, s["backbone.conv1.weight"], stride=2, padding=3), s, "backbone.bn1")), 3, 2, 1)
    stages = []
    for stage in range(1, 5):
        b = 0
        while f"backbone.layer{stage}.{b}.conv1.weight" in s:
            x = _block_f(x, s, f"backbone.layer{stage}.{b}", bottleneck, 2 if (stage > 1 and b == 0) else 1)
            b += 1
        stages.append(x)
    c = stages[1:]
    lat = [F.conv2d(f, s[f"neck.lateral_convs.{i}.conv.weight"], s[f"neck.lateral_convs.{i}.conv.bias"]) for i, f in enumerate(c)]
    for i in (2, 1):
        lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[2:], mode="nearest")
    outs = [F.conv2d(lat[i], s[f"neck.fpn_convs.{i}.conv.weight"], s[f"neck.fpn_convs.{i}.conv.bias"], padding=1) for i in range(3)]
    outs.append(F.conv2d(outs[2], s["neck.fpn_convs.3.conv.weight"], s["neck.fpn_convs.3.conv.bias"], stride=2, padding=1))
    p7_in = F.relu(outs[3]) if relu_before_p7 else outs[3]
    outs.append(F.conv2d(p7_in, s["neck.fpn_convs.4.conv.weight"], s["neck.fpn_convs.4.conv.bias"], stride=2, padding=1))
    cls_out, reg_out = [], []
    for level, feat in enumerate(outs):
        towers = {}
        for tower in ("cls_convs", "reg_convs"):
            y, i = feat, 0
            while f"bbox_head.{tower}.{i}.conv.weight" in s:
                y = F.conv2d(y, s[f"bbox_head.{tower}.{i}.conv.weight"], padding=1)
                y = F.relu(F.group_norm(y, 32, s[f"bbox_head.{tower}.{i}.gn.weight"], s[f"bbox_head.{tower}.{i}.gn.bias"], 1e-5))
                i += 1
            towers[tower] = y
        cls_out.append(F.conv2d(towers["cls_convs"], s["bbox_head.gfl_cls.weight"], s["bbox_head.gfl_cls.bias"], padding=1))
        reg = F.conv2d(towers["reg_convs"], s["bbox_head.gfl_reg.weight"], s["bbox_head.gfl_reg.bias"], padding=1)
        reg_out.append(reg * s[f"bbox_head.scales.{level}.scale"])
    return tuple(stages[1:]), tuple(outs), tuple(cls_out), tuple(reg_out)
