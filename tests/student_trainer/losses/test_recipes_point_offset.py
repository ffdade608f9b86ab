"""The recipes with the teacher's edge distances (``edges``) and either point convention."""

import numpy as np
import pytest
import torch

from detcore.outputs import DenseOutputs
from student_trainer.losses import LossInputError, assign_points, bcd_recipe, iou_ld_loss, ld_recipe
from test_recipes import GT, R, SHAPES, STRIDES, B, dense, flat


def _edges(box):
    """Per level Tensor[B, 4, H, W] expected edges, through `DenseOutputs.edge_distances`."""
    return DenseOutputs(None, tuple(box), (), STRIDES, R).edge_distances()


def _boxes(edges, stride, h, w, offset):
    """Independent decoding of Tensor[B, 4, h, w] stride-unit edges -> [B*h*w, 4] canvas pixels."""
    dist = edges.detach().permute(0, 2, 3, 1).reshape(-1, 4).double().numpy() * stride
    ys, xs = np.meshgrid((np.arange(h) + offset) * stride, (np.arange(w) + offset) * stride, indexing="ij")
    px, py = np.tile(xs.reshape(-1), B), np.tile(ys.reshape(-1), B)
    return torch.tensor(np.stack([px - dist[:, 0], py - dist[:, 1], px + dist[:, 2], py + dist[:, 3]], axis=1),
                        dtype=torch.float32)


def test_bcd_reads_edges_instead_of_distributions():
    student_cls, student_box = dense(7)
    teacher_cls, teacher_box = dense(8)
    from_box = bcd_recipe(student_cls, student_box, teacher_cls, teacher_box, GT, STRIDES, R)
    from_edges = bcd_recipe(student_cls, student_box, teacher_cls, None, GT, STRIDES, R, teacher_edges=_edges(teacher_box))
    assert from_edges["bcd_cls"].item() == from_box["bcd_cls"].item()
    assert from_edges["bcd_iou"].item() == pytest.approx(from_box["bcd_iou"].item(), rel=1e-6)
    with pytest.raises(LossInputError, match=r"teacher_edges=\) expects the shape \[2, 4, 8, 8\]"):
        bcd_recipe(student_cls, student_box, teacher_cls, None, GT, STRIDES, R, teacher_edges=teacher_box)
    with pytest.raises(LossInputError, match="one of them"):
        bcd_recipe(student_cls, student_box, teacher_cls, None, GT, STRIDES, R)


@pytest.mark.parametrize("student_offset, teacher_offset", [(0.5, 0.0), (0.0, 0.0), (0.0, 0.5)])
def test_bcd_decodes_each_side_at_its_own_points(student_offset, teacher_offset):
    student_cls, student_box = dense(7)
    teacher_cls, teacher_box = dense(8)
    edges = _edges(teacher_box)
    out = bcd_recipe(student_cls, student_box, teacher_cls, None, GT, STRIDES, R, teacher_edges=edges,
                     point_offset=student_offset, teacher_point_offset=teacher_offset)
    assignment = assign_points(GT, STRIDES, SHAPES, point_offset=student_offset)
    num_pos = int((assignment.assigned_gt > 0).sum())
    expected = 0.0
    start = 0
    for level, ((h, w), stride) in enumerate(zip(SHAPES, STRIDES)):
        count = h * w
        positive = assignment.assigned_gt[:, start : start + count] > 0
        start += count
        if not positive.any():
            continue
        p_s, p_t = flat(student_cls[level]).sigmoid(), flat(teacher_cls[level]).sigmoid()
        gap = (p_t - p_s).abs().max(dim=1).values
        s_boxes = _boxes(_edges(student_box)[level], stride, h, w, student_offset)
        t_boxes = _boxes(edges[level], stride, h, w, teacher_offset)
        expected += 4.0 * iou_ld_loss(s_boxes, t_boxes, gap, num_pos).item()
    assert out["bcd_iou"].item() == pytest.approx(expected, rel=1e-4)


def test_ld_assigns_at_the_students_points():
    student_cls, student_box = dense(3)
    teacher_cls, teacher_box = dense(4)
    for offset in (0.5, 0.0):
        given = assign_points(GT, STRIDES, SHAPES, point_offset=offset)
        out = ld_recipe(student_cls, student_box, teacher_cls, teacher_box, GT, STRIDES, R, point_offset=offset)
        same = ld_recipe(student_cls, student_box, teacher_cls, teacher_box, GT, STRIDES, R, assignment=given)
        assert {k: v.item() for k, v in out.items()} == {k: v.item() for k, v in same.items()}
    shifted = assign_points(GT, STRIDES, SHAPES, point_offset=0.0)
    centred = assign_points(GT, STRIDES, SHAPES, point_offset=0.5)
    assert not torch.equal(shifted.assigned_gt, centred.assigned_gt) or not torch.equal(shifted.vlr, centred.vlr)
