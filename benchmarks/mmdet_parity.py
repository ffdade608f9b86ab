"""The mmdet-gfl import against mmdetection's own ResNet, FPN and GFLHead: exactness on random weights.

Builds mmdetection 3.x's modules as configs/gfl/gfl_r50_fpn_1x_coco.py does (ResNet style
"pytorch", FPN start_level 1 with add_extra_convs="on_output", GFLHead with GroupNorm(32)),
fills every tensor with random values (BatchNorm statistics, GroupNorm affine and the
per-level Scales included), saves them as an mmengine checkpoint, imports it with
`detcore.importers.import_teacher`, and compares every per-level output (C3-C5, P3-P7,
class logits, box logits after the Scale) with ``torch.equal``; and checks that
mmdetection's GFL anchors are centred at (x * s, y * s), the checkpoint's point_offset 0.0.

mmdetection is not a dependency; install it aside, without its compiled ops (the modules
compared use none), and put it on PYTHONPATH:

    pip install --target mmref --no-deps mmengine==0.10.7 mmcv-lite==2.1.0 mmdet==3.3.0 addict yapf termcolor
    PYTHONPATH=mmref:. python benchmarks/mmdet_parity.py

Packages that mmdetection imports but these modules never call (cv2, mmcv.ops, scipy ...)
are replaced by empty stand-ins. Exit code 0 when every tensor is equal.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import tempfile
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STAND_IN_ROOTS = ("cv2", "rich", "mmcv.ops", "mmcv._ext", "pycocotools", "terminaltables", "shapely", "matplotlib", "scipy")


class _AnyAttribute(type):
    def __getattr__(cls, name):
        return _stand_in(name)


def _stand_in(name: str):
    return _AnyAttribute(name, (object,), {"__init__": lambda self, *a, **k: None})


class _StandInModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = _stand_in(name)
        setattr(self, name, value)
        return value


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports of the stand-in roots succeed with modules whose every attribute is an empty class."""

    def find_spec(self, fullname, path, target=None):
        if any(fullname == root or fullname.startswith(root + ".") for root in STAND_IN_ROOTS):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StandInModule(spec.name)
        module.__path__ = []
        module.__version__ = "4.8.0"
        return module

    def exec_module(self, module):
        pass


def compare(depth, stage_channels, fpn_channels, feat_channels, stacked_convs, num_classes, reg_max, image_hw, seed) -> bool:
    import torch
    from mmdet.models.backbones.resnet import ResNet
    from mmdet.models.dense_heads.gfl_head import GFLHead
    from mmdet.models.necks.fpn import FPN

    from detcore.checkpoint import load_detector
    from detcore.importers import import_teacher

    torch.manual_seed(seed)
    backbone = ResNet(depth=depth, num_stages=4, out_indices=(0, 1, 2, 3), frozen_stages=1,
                      norm_cfg=dict(type="BN", requires_grad=True), norm_eval=True, style="pytorch")
    neck = FPN(in_channels=stage_channels, out_channels=fpn_channels, start_level=1, add_extra_convs="on_output", num_outs=5)
    head = GFLHead(
        num_classes=num_classes, in_channels=fpn_channels, stacked_convs=stacked_convs, feat_channels=feat_channels,
        anchor_generator=dict(type="AnchorGenerator", ratios=[1.0], octave_base_scale=8, scales_per_octave=1,
                              strides=[8, 16, 32, 64, 128]),
        loss_cls=dict(type="QualityFocalLoss", use_sigmoid=True, beta=2.0, loss_weight=1.0),
        loss_dfl=dict(type="DistributionFocalLoss", loss_weight=0.25), reg_max=reg_max,
        loss_bbox=dict(type="GIoULoss", loss_weight=2.0), norm_cfg=dict(type="GN", num_groups=32, requires_grad=True),
    )
    gen = torch.Generator().manual_seed(seed + 1)
    state = {}
    with torch.no_grad():
        for prefix, module in (("backbone", backbone), ("neck", neck), ("bbox_head", head)):
            module.eval()
            for name, tensor in module.state_dict().items():
                if tensor.is_floating_point() and not name.endswith("integral.project"):
                    scale = 0.5 / max(1, tensor[0].numel()) ** 0.5 if tensor.ndim > 1 else 0.2
                    value = torch.randn(tensor.shape, generator=gen) * scale
                    if name.endswith(("running_var", "scale")) or (name.endswith("weight") and tensor.ndim == 1):
                        value = 0.5 + value.abs()  # positive variances, norm gains and Scales
                    tensor.copy_(value)
                state[f"{prefix}.{name}"] = tensor.clone()
    classes = tuple(f"class{i}" for i in range(num_classes))
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "mmdet_gfl.pth")
        torch.save({"meta": {"dataset_meta": {"classes": classes}}, "state_dict": state}, source)
        import_teacher("mmdet-gfl", source, os.path.join(tmp, "teacher.pt"))
        model = load_detector(os.path.join(tmp, "teacher.pt"))
    images = torch.randn(2, 3, *image_hw, generator=gen)
    with torch.no_grad():
        stages = backbone(images)
        pyramid = neck(stages)
        cls_scores, bbox_preds = head(pyramid)
        outputs = model(images, with_backbone=True)
    pairs = list(zip(outputs.backbone_features, stages[1:])) + list(zip(outputs.fpn_features, pyramid))
    pairs += list(zip(outputs.cls_logits, cls_scores)) + list(zip(outputs.box_logits, bbox_preds))
    equal = sum(torch.equal(a, b) for a, b in pairs)
    worst = max(float((a - b).abs().max()) for a, b in pairs)
    sizes = [tuple(t.shape[-2:]) for t in pyramid]
    priors = head.prior_generator.grid_priors(sizes, device="cpu")
    centres_ok = True
    for (h, w), stride, level_priors in zip(sizes, (8, 16, 32, 64, 128), priors):
        centres = (level_priors[:, :2] + level_priors[:, 2:]) / 2
        ys, xs = torch.meshgrid(torch.arange(h) * stride, torch.arange(w) * stride, indexing="ij")
        centres_ok &= torch.equal(centres, torch.stack([xs.reshape(-1), ys.reshape(-1)], 1).float())
    print(f"| ResNet-{depth} | {fpn_channels} | {feat_channels} x {stacked_convs} | {num_classes} | {reg_max} | "
          f"{image_hw[0]}x{image_hw[1]} | {equal} / {len(pairs)} | {worst:g} | {'yes' if centres_ok else 'NO'} |")
    return equal == len(pairs) and centres_ok


def main() -> int:
    sys.meta_path.insert(0, _StandInFinder())
    import torch
    from mmdet import __version__ as mmdet_version
    from mmdet.utils import register_all_modules

    register_all_modules()
    torch.set_num_threads(1)
    print(f"# mmdetection {mmdet_version}, torch {torch.__version__}")
    print("| backbone | FPN ch | head ch x convs | K | reg_max | input | tensors torch.equal | max abs diff | anchors at (x*s, y*s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    ok = compare(18, [64, 128, 256, 512], 64, 32, 2, 7, 7, (100, 130), seed=0)
    ok &= compare(50, [256, 512, 1024, 2048], 256, 256, 4, 80, 16, (96, 128), seed=1)
    ok &= compare(101, [256, 512, 1024, 2048], 64, 64, 1, 3, 16, (64, 96), seed=2)
    print("all equal" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
