"""Class mapping on the student side: masked classes leave class distillation; the in-process
teacher maps its classes to the dataset's as precompute does."""

from __future__ import annotations

import json

import pytest
import torch
from student_fixtures import CLASSES, make_teacher, run_config

from student_trainer.losses.recipes import bcd_recipe, ld_recipe

STRIDES = (8, 16)
REG_MAX = 4


def _dense(seed: int, num_classes: int):
    generator = torch.Generator().manual_seed(seed)
    cls = [torch.randn(2, num_classes, 8 // (s // 8), 8 // (s // 8), generator=generator) for s in STRIDES]
    box = [torch.randn(2, 4 * (REG_MAX + 1), c.shape[-2], c.shape[-1], generator=generator) for c in cls]
    return cls, box


@pytest.mark.parametrize("recipe, keys", [(ld_recipe, ("ld_kd",)), (bcd_recipe, ("bcd_cls", "bcd_iou"))])
def test_masked_class_is_left_out_of_class_distillation(recipe, keys):
    gt_boxes = [torch.tensor([[4.0, 6.0, 40.0, 50.0]]), torch.tensor([[10.0, 2.0, 30.0, 60.0], [0.0, 0.0, 20.0, 20.0]])]
    student_cls, student_box = _dense(0, 3)
    teacher_cls, teacher_box = _dense(1, 3)
    mask = torch.tensor([True, False, True])
    masked = recipe(student_cls, student_box, teacher_cls, teacher_box, gt_boxes, STRIDES, REG_MAX, class_mask=mask)
    # Whatever the teacher says for the masked class changes nothing ...
    other = [t.clone() for t in teacher_cls]
    for t in other:
        t[:, 1] = 25.0
    again = recipe(student_cls, student_box, other, teacher_box, gt_boxes, STRIDES, REG_MAX, class_mask=mask)
    # ... and the terms are those of the two known classes alone.
    keep = [0, 2]
    alone = recipe(
        [s[:, keep] for s in student_cls], student_box, [t[:, keep] for t in teacher_cls], teacher_box, gt_boxes, STRIDES, REG_MAX
    )
    unmasked = recipe(student_cls, student_box, other, teacher_box, gt_boxes, STRIDES, REG_MAX)
    for key in keys:
        assert torch.equal(masked[key], again[key]), key
        torch.testing.assert_close(masked[key], alone[key], msg=key)
        assert not torch.allclose(unmasked[key], masked[key]), key
    with pytest.raises(ValueError, match=r"class_mask expects a BoolTensor\[3\]"):
        recipe(student_cls, student_box, teacher_cls, teacher_box, gt_boxes, STRIDES, REG_MAX, class_mask=torch.tensor([True, False]))


def test_inprocess_source_maps_the_teacher_classes(world, tmp_path):
    from detcore.checkpoint import load_detector
    from detcore.classes import MissingClassesError
    from detcore.views import plan_views, render
    from student_trainer.sources import InProcessTeacherSource

    # The dataset's classes in another order and case, plus one the dataset lacks.
    teacher_path = make_teacher(tmp_path / "t.pt", classes=("Disc", "triangle", "square"), seed=3)
    names = ["cls/p3", "cls/p4"]
    source = InProcessTeacherSource(str(teacher_path), names, dataset_classes=CLASSES)
    assert source.fingerprint.classes == CLASSES
    assert source.fingerprint.class_mapping["teacher_index"] == [2, 0]
    assert [spec.shape[0] for spec in source.specs if spec.group == "cls"] == [2] * 5

    view = plan_views([(1, 64, 64)], canvas_hw=(64, 64), flip=False)[0]
    image = render(torch.randint(0, 255, (64, 64, 3), dtype=torch.uint8).numpy(), view).image[None]
    with torch.no_grad():
        direct = load_detector(teacher_path).eval()(image)
    targets = source.get([view], images=image)
    for level, name in enumerate(names):
        torch.testing.assert_close(targets[name], direct.cls_logits[level][:, [2, 0]])

    lacking = make_teacher(tmp_path / "lacking.pt", classes=("disc", "triangle"))
    with pytest.raises(MissingClassesError, match=r"\['square'\]"):
        InProcessTeacherSource(str(lacking), names, dataset_classes=CLASSES)
    masked = InProcessTeacherSource(str(lacking), names, dataset_classes=CLASSES, allow_missing_classes=True)
    assert masked.fingerprint.class_mask == (False, True)
    renamed = InProcessTeacherSource(str(lacking), names, dataset_classes=CLASSES, class_map={"triangle": "square"})
    assert renamed.fingerprint.class_mask == (True, True)


def test_train_inprocess_with_a_class_map_and_a_missing_class(world, tmp_path, capsys):
    from distillery.cli import main
    from student_trainer.train import train_student

    lacking = make_teacher(tmp_path / "lacking.pt", classes=("disc", "triangle"), fpn=24)
    config = run_config(world, tmp_path / "run", losses="ld,bcd", source="inprocess", teacher=str(lacking), iters=2,
                        store="", canvas="64x64", allow_missing_classes=True)
    summary = train_student(config, progress=False)
    assert summary["finished"]
    record = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert record["source"]["allow_missing_classes"] is True
    assert record["resolved"]["teacher_fingerprint"]["class_mapping"]["missing_dataset_classes"] == ["square"]

    argv = ["train", "--annotations", str(world.annotations), "--images", str(world.images), "--source", "inprocess",
            "--teacher", str(lacking), "--canvas", "64x64", "--iters", "1", "--batch-size", "2", "--device", "cpu",
            "--out", str(tmp_path / "cli"), "--losses", "ld", "--no-progress"]
    assert main(argv) == 2
    assert "['square']" in capsys.readouterr().err
    class_map = tmp_path / "map.json"
    class_map.write_text(json.dumps({"triangle": "square"}))
    assert main([*argv, "--class-map", str(class_map), "--set", "data.num_workers=0"]) == 0
