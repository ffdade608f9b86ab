"""GFL detector: output shapes per level, configuration, head initialisation, loss and decoding."""

import math

import pytest
import torch

from detcore.assign import atss_assign
from detcore.det_losses import distribution_focal_loss, giou_loss, quality_focal_loss
from detcore.models.backbones import BackboneWeightsError, TinyBackbone
from detcore.models.gfl import (
    DetectorConfig,
    GFLDetector,
    build_detector,
    build_detector_from_config,
    make_detector_config,
    predict_detections,
)
from detcore.models.head import group_norm_groups
from detcore.outputs import DenseOutputs, feature_hw


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_detector("gfl_tiny", num_classes=3).eval()


@pytest.mark.parametrize("canvas", [(64, 64), (64, 96), (72, 40)])
def test_tiny_output_shapes_per_level(tiny, canvas):
    with torch.no_grad():
        out = tiny(torch.randn(2, 3, *canvas), with_backbone=True)
    assert out.strides == (8, 16, 32, 64, 128)
    assert out.reg_max == 16
    for stride, cls, box, feat in zip(out.strides, out.cls_logits, out.box_logits, out.fpn_features):
        h, w = feature_hw(canvas, stride)
        assert tuple(cls.shape) == (2, 3, h, w)
        assert tuple(box.shape) == (2, 4 * 17, h, w)
        assert tuple(feat.shape) == (2, 32, h, w)
    for stride, channels, feat in zip((8, 16, 32), (64, 96, 128), out.backbone_features):
        assert tuple(feat.shape) == (2, channels, *feature_hw(canvas, stride))
    assert set(out.to_targets(("cls", "box", "fpn", "backbone"))) >= {"cls/p3", "box/p7", "fpn/p5", "backbone/c5"}
    assert tiny(torch.randn(1, 3, 64, 64)).backbone_features is None


def test_resnet18_shapes_and_options():
    torch.manual_seed(0)
    model = build_detector("gfl_r18", num_classes=5, fpn_channels=32, head_channels=48, reg_max=8, strides=(8, 16, 32))
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64), with_backbone=True)
    assert len(out.cls_logits) == 3 and out.strides == (8, 16, 32)
    assert tuple(out.box_logits[0].shape) == (1, 4 * 9, 8, 8)
    assert tuple(out.fpn_features[2].shape) == (1, 32, 2, 2)
    assert [f.shape[1] for f in out.backbone_features] == [128, 256, 512]
    assert model.head.cls_tower[0].out_channels == 48


def test_tiny_backbone_size_and_arch_defaults():
    params = sum(p.numel() for p in TinyBackbone().parameters())
    assert 400_000 < params < 600_000
    expected = {"gfl_tiny": (32, 32, 2), "gfl_r18": (64, 64, 4), "gfl_r34": (128, 128, 4), "gfl_r50": (256, 256, 4),
                "gfl_r101": (256, 256, 4)}
    for arch, (fpn, head, convs) in expected.items():
        config = make_detector_config(arch, 80)
        assert (config.fpn_channels, config.head_channels, config.num_convs) == (fpn, head, convs)
    assert make_detector_config("gfl_r34", 80, fpn_channels=96).head_channels == 96
    with pytest.raises(ValueError, match="gfl_r18"):
        make_detector_config("gfl_r152", 80)
    with pytest.raises(ValueError, match="strides"):
        make_detector_config("gfl_tiny", 3, strides=(8, 32))


def test_config_round_trip():
    config = make_detector_config("gfl_r18", 7, fpn_channels=48, reg_max=12)
    again = DetectorConfig.from_dict(config.to_dict())
    assert again == config
    with pytest.raises(ValueError, match="unknown"):
        DetectorConfig.from_dict({**config.to_dict(), "colour": "red"})


def test_head_initialisation(tiny):
    assert group_norm_groups(256) == 32 and group_norm_groups(64) == 16 and group_norm_groups(32) == 8
    assert group_norm_groups(24) == 6
    with torch.no_grad():
        out = tiny(torch.randn(1, 3, 64, 64))
    probs = out.cls_logits[0].sigmoid()
    # Prior bias -log(99): every initial probability close to 0.01.
    assert abs(probs.mean().item() - 0.01) < 0.005
    assert [s.scale.item() for s in tiny.head.scales] == [1.0] * 5


def test_backbone_weights_loaded_from_file_and_frozen(tmp_path):
    import torchvision

    torch.manual_seed(1)
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(reference.state_dict(), path)
    model = build_detector("gfl_r18", num_classes=2, backbone_weights=str(path))
    assert model.config.frozen_backbone_bn and model.config.backbone_weights == str(path)
    torch.testing.assert_close(model.backbone.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)
    assert not model.backbone.stem[0].weight.requires_grad
    assert model.backbone.layer2[0].conv1.weight.requires_grad
    # mmdetection's norm_cfg requires_grad=True: BatchNorm's affine trains after the frozen stages, its statistics never.
    assert model.backbone.layer2[0].bn1.weight.requires_grad and not model.backbone.layer1[0].bn1.weight.requires_grad
    model.train()
    assert not model.backbone.layer2[0].bn1.training and model.head.training
    with pytest.raises(BackboneWeightsError, match="does not exist"):
        build_detector("gfl_r18", num_classes=2, backbone_weights=str(tmp_path / "missing.pth"))
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(BackboneWeightsError, match="shapes of ResNet"):
        build_detector("gfl_r18", num_classes=2, backbone_weights=str(tmp_path / "bad.pth"))
    torch.save({"conv1.weight": reference.conv1.weight}, tmp_path / "partial.pth")
    with pytest.raises(BackboneWeightsError, match="Missing"):
        build_detector("gfl_r18", num_classes=2, backbone_weights=str(tmp_path / "partial.pth"))
    # A checkpoint rebuild never reads the backbone file again.
    config = model.config
    (tmp_path / "r18.pth").unlink()
    assert isinstance(build_detector_from_config(config, load_backbone_weights=False), GFLDetector)


def test_assign_matches_atss_and_labels_background_as_k(tiny):
    with torch.no_grad():
        out = tiny(torch.randn(2, 3, 64, 64))
    gt_boxes = [torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 30.0, 60.0, 62.0]]), torch.zeros((0, 4))]
    gt_labels = [torch.tensor([2, 0]), torch.zeros((0,), dtype=torch.long)]
    targets = tiny.assign(out, gt_boxes, gt_labels)
    expected = atss_assign(targets.anchors, list(targets.num_level_anchors), gt_boxes[0])
    assert torch.equal(targets.gt_index[0] + 1, expected)
    assert torch.equal(targets.labels[0][expected == 1], torch.full(((expected == 1).sum(),), 2))
    assert torch.equal(targets.labels[0][expected == 0], torch.full(((expected == 0).sum(),), 3))
    assert torch.equal(targets.boxes[0][expected == 2], gt_boxes[0][1].expand((expected == 2).sum(), 4))
    assert targets.positive_mask[1].sum().item() == 0 and targets.num_positives == int((expected > 0).sum())
    with pytest.raises(ValueError, match=r"classes in \[0, 3\)"):
        tiny.assign(out, [gt_boxes[0], gt_boxes[1]], [torch.tensor([3, 0]), gt_labels[1]])
    with pytest.raises(ValueError, match="one gt_boxes"):
        tiny.assign(out, gt_boxes[:1], gt_labels[:1])


def test_loss_matches_the_mmdetection_formula(tiny):
    torch.manual_seed(3)
    out = tiny(torch.randn(2, 3, 64, 64))
    gt_boxes = [torch.tensor([[4.0, 6.0, 40.0, 50.0]]), torch.tensor([[10.0, 12.0, 30.0, 26.0]])]
    gt_labels = [torch.tensor([1]), torch.tensor([0])]
    targets = tiny.assign(out, gt_boxes, gt_labels)
    losses = tiny.loss(out, gt_boxes, gt_labels, targets=targets)

    # Independent composition from the pure functions, positive by positive.
    from detcore.outputs import flatten_levels, distribution_to_distance, distance_to_boxes, boxes_to_distance
    from detcore.boxes import box_iou_aligned

    cls = flatten_levels(out.cls_logits).detach()
    box = flatten_levels(out.box_logits).detach()
    quality = torch.zeros_like(cls)
    giou_sum = dfl_sum = weight_sum = 0.0
    num_pos = 0
    for b in range(2):
        for a in targets.positive_mask[b].nonzero().flatten().tolist():
            s = targets.point_strides[a].item()
            point = targets.points[a : a + 1] / s
            pred = distance_to_boxes(point, distribution_to_distance(box[b, a : a + 1], 16))
            target = targets.boxes[b, a : a + 1] / s
            quality[b, a, targets.labels[b, a]] = box_iou_aligned(pred, target)[0]
            w = cls[b, a].sigmoid().max().item()
            giou_sum += w * giou_loss(pred, target).item()
            edges = boxes_to_distance(point, target, 16).reshape(-1)
            dfl_sum += w * distribution_focal_loss(box[b, a].reshape(4, 17), edges).sum().item() / 4
            weight_sum += w
            num_pos += 1
    assert num_pos > 0
    qfl = quality_focal_loss(cls.reshape(-1, 3), quality.reshape(-1, 3)).sum().item() / num_pos
    norm = max(weight_sum, 1.0)
    assert losses["qfl"].item() == pytest.approx(qfl, rel=1e-4)
    assert losses["giou"].item() == pytest.approx(2.0 * giou_sum / norm, rel=1e-4)
    assert losses["dfl"].item() == pytest.approx(0.25 * dfl_sum / norm, rel=1e-4)
    sum(losses.values()).backward()
    assert tiny.head.box_conv.weight.grad.abs().sum().item() > 0
    tiny.zero_grad()


def test_loss_without_any_gt_is_finite_and_trains_classification_only(tiny):
    out = tiny(torch.randn(1, 3, 64, 64))
    losses = tiny.loss(out, [torch.zeros((0, 4))], [torch.zeros((0,), dtype=torch.long)])
    assert losses["dfl"].item() == 0.0 and losses["giou"].item() == 0.0
    assert math.isfinite(losses["qfl"].item()) and losses["qfl"].item() > 0
    sum(losses.values()).backward()
    assert tiny.head.cls_conv.weight.grad.abs().sum().item() > 0
    tiny.zero_grad()


def _hand_outputs(canvas=64, num_classes=2, reg_max=4, strides=(8, 16, 32)):
    shapes = [feature_hw((canvas, canvas), s) for s in strides]
    cls = tuple(torch.full((1, num_classes, h, w), -10.0) for h, w in shapes)
    box = tuple(torch.zeros((1, 4 * (reg_max + 1), h, w)) for h, w in shapes)
    feats = tuple(torch.zeros((1, 4, h, w)) for h, w in shapes)
    return DenseOutputs(cls, box, feats, strides, reg_max)


def _peak(box, level_map, y, x, edges, reg_max=4):
    for e, j in enumerate(edges):
        level_map[0, e * (reg_max + 1) + j, y, x] = 50.0


def test_predict_decodes_boxes_in_canvas_pixels():
    out = _hand_outputs()
    # Level p3 point (x=3, y=2) sits at (28, 20); edges (1, 2, 1, 3) strides -> (20, 4, 36, 44).
    out.cls_logits[0][0, 1, 2, 3] = 5.0
    _peak(out, out.box_logits[0], 2, 3, (1, 2, 1, 3))
    # Level p4 point (x=3, y=3) at (56, 56), edges of 4 strides reach past the canvas: clipped.
    out.cls_logits[1][0, 0, 3, 3] = 2.0
    _peak(out, out.box_logits[1], 3, 3, (1, 1, 4, 4))
    (result,) = predict_detections(out, canvas_hw=(64, 64))
    assert result["labels"].tolist() == [1, 0]
    assert result["scores"].tolist() == pytest.approx([1 / (1 + math.exp(-5)), 1 / (1 + math.exp(-2))], rel=1e-5)
    torch.testing.assert_close(result["boxes"][0], torch.tensor([20.0, 4.0, 36.0, 44.0]), atol=1e-3, rtol=0)
    torch.testing.assert_close(result["boxes"][1], torch.tensor([40.0, 40.0, 64.0, 64.0]), atol=1e-3, rtol=0)


def test_predict_nms_threshold_and_max_per_image():
    out = _hand_outputs()
    for x, score in ((3, 4.0), (4, 3.0)):  # two p3 neighbours, same class, 8 px apart, 32 px wide boxes
        out.cls_logits[0][0, 0, 3, x] = score
        _peak(out, out.box_logits[0], 3, x, (2, 2, 2, 2))
    out.cls_logits[0][0, 1, 3, 4] = 1.0  # the second box also scores class 1
    # The class-0 boxes (12, 12, 44, 44) and (20, 12, 52, 44) overlap with IoU 768 / 1280 = 0.6.
    (result,) = predict_detections(out, nms_iou=0.7)
    assert sorted(result["labels"].tolist()) == [0, 0, 1]
    (strict,) = predict_detections(out, nms_iou=0.5)
    assert strict["labels"].tolist() == [0, 1] and strict["scores"][0].item() > 0.98
    (capped,) = predict_detections(out, nms_iou=0.5, max_per_image=1)
    assert capped["labels"].tolist() == [0]
    (none,) = predict_detections(out, score_thr=0.99)
    assert none["boxes"].shape == (0, 4)
