"""The one teacher API (`detcore.teacher`) as the precompute job uses it: groups, edges, refusals."""

import dataclasses

import numpy as np
import pytest
import torch

from precompute_fixtures import _cli, _decode_batch, _write_dataset, _write_teacher  # noqa: F401  (shared fixtures' helpers)


class DistanceTeacher(torch.nn.Module):
    """A teacher that regresses distances (no edge distributions), mmdetection's point convention."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, images, with_backbone=False):
        out = self.inner(images, with_backbone=with_backbone)
        return dataclasses.replace(out, box_logits=None, reg_max=None, distances=out.edge_distances(), point_offset=0.0)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher-api")
    annotations, images = _write_dataset(root)
    return {"annotations": annotations, "images": images, "teacher": _write_teacher(root / "teacher.pt")}


def _distance_teacher(path):
    from detcore.checkpoint import load_detector_with_meta, teacher_fingerprint
    from detcore.teacher import Teacher

    model, meta = load_detector_with_meta(path)
    return Teacher(DistanceTeacher(model), {**meta, "fingerprint": teacher_fingerprint(path)}, device="cpu")


def test_load_teacher_describes_a_native_checkpoint(files):
    from detcore.checkpoint import teacher_fingerprint
    from detcore.teacher import load_teacher

    teacher = load_teacher(files["teacher"])
    assert teacher.available_groups == ("cls", "box", "edges", "fpn", "backbone")
    assert (teacher.strides, teacher.reg_max, teacher.point_offset) == ((8, 16, 32, 64, 128), 16, 0.5)
    assert teacher.classes == ("disc", "square") and teacher.architecture == {"family": "gfl"}
    assert teacher.fingerprint() == teacher_fingerprint(files["teacher"])
    out = teacher.forward(torch.zeros(2, 3, 64, 64), backbone=True)
    assert not out.cls_logits[0].requires_grad and out.backbone_features is not None
    specs = teacher.target_specs(("cls", "edges"), (64, 64))
    assert [(s.name, tuple(s.shape)) for s in specs][5:7] == [("edges/p3", (4, 8, 8)), ("edges/p4", (4, 4, 4))]


def test_a_teacher_without_distributions_gives_edges_and_refuses_box(files):
    from detcore.teacher import TeacherGroupError

    teacher = _distance_teacher(files["teacher"])
    assert teacher.available_groups == ("cls", "edges", "fpn", "backbone") and teacher.point_offset == 0.0
    with pytest.raises(TeacherGroupError, match=r"cannot give the target group\(s\) \['box'\]: box: it has no edge distributions"):
        teacher.target_specs(("cls", "box"))


def test_precompute_with_box_for_a_teacher_without_distributions_exits_2(files, tmp_path, monkeypatch, capsys):
    import ray

    from detcore import teacher as teacher_module

    monkeypatch.setattr(teacher_module, "load_teacher", lambda path, **_: _distance_teacher(path))
    argv = ["precompute", "--annotations", str(files["annotations"]), "--images", str(files["images"]),
            "--teacher", str(files["teacher"]), "--store", str(tmp_path / "s.zarr")]
    assert _cli([*argv, "--targets", "cls,box"]) == 2
    err = capsys.readouterr().err
    assert "--targets" in err and "['box']" in err and "edge distributions" in err
    assert not ray.is_initialized()


def test_predictor_produces_edges(files):
    from detcore.checkpoint import load_detector
    from detcore.coco import CocoDataset
    from detcore.views import plan_views
    from teacher_service.pipeline_stages import TeacherPredictor, decode_and_render

    dataset = CocoDataset(files["annotations"], files["images"])
    views = plan_views([(i, dataset.record(i).height, dataset.record(i).width) for i in dataset.image_ids[:2]],
                       canvas_hw=(64, 64))
    batch = decode_and_render(_decode_batch(dataset, views))
    shapes = {"cls/p3": (2, 8, 8), "edges/p3": (4, 8, 8), "edges/p4": (4, 4, 4)}
    out = TeacherPredictor(str(files["teacher"]), shapes, batch_size=2, device="cpu", torch_threads=1)(batch)
    model = load_detector(files["teacher"])
    with torch.no_grad():
        expected = model(torch.from_numpy(np.asarray(batch["pixels"]))).edge_distances()
    np.testing.assert_allclose(np.stack(out["edges/p3"]), expected[0].numpy(), rtol=1e-5, atol=1e-5)
