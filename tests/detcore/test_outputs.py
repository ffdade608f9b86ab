"""DenseOutputs: point convention, edge distances, the label-store encoder/decoder."""

import dataclasses
import math

import pytest
import torch

from detcore.assign import atss_assign, vlr_region
from detcore.models.gfl import predict_detections
from detcore.outputs import TARGET_GROUPS, DenseOutputs, feature_hw, level_anchors, level_points
from label_store.schema import TARGET_GROUPS as STORE_GROUPS


def _outputs(canvas=64, num_classes=2, reg_max=4, strides=(8, 16, 32), backbone=False, point_offset=0.5):
    shapes = [feature_hw((canvas, canvas), s) for s in strides]
    cls = tuple(torch.full((1, num_classes, h, w), -10.0) for h, w in shapes)
    box = tuple(torch.zeros((1, 4 * (reg_max + 1), h, w)) for h, w in shapes)
    feats = tuple(torch.randn((1, 3, h, w)) for h, w in shapes)
    stages = tuple(torch.randn(1, c, canvas // s, canvas // s) for c, s in ((5, 8), (6, 16), (7, 32))) if backbone else None
    return DenseOutputs(cls, box, feats, strides, reg_max, backbone_features=stages, point_offset=point_offset)


def test_target_groups_are_defined_once():
    assert TARGET_GROUPS is STORE_GROUPS and TARGET_GROUPS == ("cls", "box", "edges", "fpn", "backbone")


def test_level_points_and_anchors_follow_the_point_offset():
    centre = level_points([8], [(2, 2)])[0]
    corner = level_points([8], [(2, 2)], point_offset=0.0)[0]
    assert centre.tolist() == [[4.0, 4.0], [12.0, 4.0], [4.0, 12.0], [12.0, 12.0]]
    assert corner.tolist() == [[0.0, 0.0], [8.0, 0.0], [0.0, 8.0], [8.0, 8.0]]
    # anchors: squares of side 8 * stride = 64 around the points
    assert level_anchors([8], [(1, 1)], point_offset=0.0)[0].tolist() == [[-32.0, -32.0, 32.0, 32.0]]
    assert level_anchors([8], [(1, 1)])[0].tolist() == [[-28.0, -28.0, 36.0, 36.0]]


def test_edge_distances_from_distributions_and_from_distances():
    out = _outputs(reg_max=4)
    # uniform logits: the expectation over bins 0..4 is 2
    for level in out.edge_distances():
        assert level.shape[1] == 4 and torch.allclose(level, torch.full_like(level, 2.0))
    # a peaked bin 3 on edge 1 (top) of p3 cell (y=1, x=2): expectation ~3 there
    out.box_logits[0][0, 1 * 5 + 3, 1, 2] = 60.0
    edges = out.edge_distances()[0]
    assert edges[0, 1, 1, 2].item() == pytest.approx(3.0, abs=1e-6)
    assert edges[0, 0, 1, 2].item() == pytest.approx(2.0, abs=1e-6)
    # given distances win, whatever box_logits say
    given = tuple(torch.full((1, 4, h, w), 1.5) for h, w in out.shapes_hw)
    fcos = dataclasses.replace(out, box_logits=None, reg_max=None, distances=given)
    assert fcos.edge_distances() is given
    assert fcos.available_groups == ("cls", "edges", "fpn")
    with pytest.raises(ValueError, match="edge_distances"):
        dataclasses.replace(fcos, distances=None).edge_distances()


def test_to_targets_and_from_targets_round_trip():
    out = _outputs(backbone=True, point_offset=0.0)
    groups = ("cls", "box", "edges", "fpn", "backbone")
    targets = out.to_targets(groups)
    assert list(targets)[:4] == ["cls/p3", "cls/p4", "cls/p5", "box/p3"]
    assert {"edges/p3", "fpn/p5", "backbone/c5"} <= set(targets) and targets["edges/p4"].shape == (1, 4, 4, 4)
    back = DenseOutputs.from_targets(targets, strides=out.strides, reg_max=out.reg_max, point_offset=out.point_offset)
    assert back.point_offset == 0.0 and back.reg_max == out.reg_max
    # Stored edges are kept beside box (a region store holds box only where LD reads it).
    assert all(torch.equal(d, targets[f"edges/{lv}"]) for d, lv in zip(back.distances, back.level_names))
    for a, b in zip(out.to_targets(groups).values(), back.to_targets(groups).values()):
        assert torch.equal(a, b)
    # a store with edges and no box decodes to distances
    edges_only = DenseOutputs.from_targets(out.to_targets(("cls", "edges", "fpn")), strides=out.strides, reg_max=4)
    assert edges_only.box_logits is None and edges_only.reg_max is None and edges_only.backbone_features is None
    assert all(torch.equal(a, b) for a, b in zip(edges_only.edge_distances(), out.edge_distances()))
    with pytest.raises(ValueError, match=r"asks for \['box'\]"):
        edges_only.to_targets(("box",))
    with pytest.raises(ValueError, match=r"missing \['cls/p5'\]"):
        DenseOutputs.from_targets({k: v for k, v in targets.items() if k != "cls/p5"}, strides=out.strides, reg_max=4)
    with pytest.raises(ValueError, match="outside"):
        DenseOutputs.from_targets({"logits/p3": targets["cls/p3"]}, strides=out.strides, reg_max=4)


@pytest.mark.parametrize("offset", [0.5, 0.0])
def test_decoding_uses_the_point_offset(offset):
    reg_max = 4
    out = _outputs(reg_max=reg_max, point_offset=offset)
    # p3 cell (x=3, y=2), edges (1, 2, 1, 3) strides
    out.cls_logits[0][0, 1, 2, 3] = 5.0
    for e, j in enumerate((1, 2, 1, 3)):
        out.box_logits[0][0, e * (reg_max + 1) + j, 2, 3] = 50.0
    (result,) = predict_detections(out, canvas_hw=(64, 64))
    px, py = (3 + offset) * 8, (2 + offset) * 8  # (28, 20) or (24, 16)
    expected = torch.tensor([px - 8, py - 16, px + 8, py + 24])
    torch.testing.assert_close(result["boxes"][0], expected, atol=1e-3, rtol=0)
    # the same from given distances (a distance-regressing teacher)
    given = dataclasses.replace(out, box_logits=None, reg_max=None, distances=out.edge_distances())
    (from_distances,) = predict_detections(given, canvas_hw=(64, 64))
    torch.testing.assert_close(from_distances["boxes"][0], expected, atol=1e-3, rtol=0)
    assert math.isclose(from_distances["scores"][0].item(), result["scores"][0].item())


def test_atss_and_vlr_use_the_point_offset():
    """One level of stride 8, 4 x 4 cells, GT (1, 1, 9, 9) centred at (5, 5), one candidate (topk=1).

    ATSS: offset 0.5 puts the nearest point at (4, 4) (cell 0), offset 0.0 at (8, 8) (cell 5);
    one candidate is its own threshold, so exactly that cell is positive.
    VLR: every 64 px anchor contains the GT, so IoU = 64 / 4096 = thr for all, and
    DIoU = thr - d^2 / 8192 lies in [thr / 4, thr) iff 0 < d^2 <= 96 (d: centre distance):
    offset 0.5, d^2 = (8i - 1)^2 + (8j - 1)^2 -> cells 0, 1, 4 (2, 50, 50; cell 5: 98);
    offset 0.0, d^2 = (8i - 5)^2 + (8j - 5)^2 -> cells 0, 1, 4, 5 (50, 34, 34, 18).
    """
    gt = torch.tensor([[1.0, 1.0, 9.0, 9.0]])
    for offset, cell, region_cells in ((0.5, 0, [0, 1, 4]), (0.0, 5, [0, 1, 4, 5])):
        anchors = level_anchors([8], [(4, 4)], point_offset=offset)[0]
        assigned = atss_assign(anchors, [16], gt, topk=1)
        assert assigned.nonzero().flatten().tolist() == [cell]
        region = vlr_region(anchors, [16], gt, topk=1, alpha=0.25)
        assert region.nonzero().flatten().tolist() == region_cells
        assert region[region_cells].tolist() == pytest.approx([1 / 64] * len(region_cells))
