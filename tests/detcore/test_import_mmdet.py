"""`distill teacher import`: mmdet-gfl shapes inferred, outputs equal to mmdetection's forward, clear errors; the torchvision formats through the same CLI."""

import hashlib

import pytest
import torch
import torch.nn.functional as F

from detcore.checkpoint import load_checkpoint, load_detector, load_detector_with_meta, teacher_fingerprint
from detcore.importers.mmdet_gfl import build_mmdet_gfl, convert_mmdet_gfl
from distillery.cli import main
from mmdet_layout import R18, R50_TINY, mmdet_gfl_state, mmdet_v2_file, mmdet_v3_file, reference_forward

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLASSES = ["cat", "dog", "bird", "car", "tree"]


def _import(tmp_path, source, *extra, name="teacher.pt"):
    src = tmp_path / "source.pth"
    torch.save(source, src)
    out = tmp_path / name
    code = main(["teacher", "import", "--format", "mmdet-gfl", "--checkpoint", str(src), "--out", str(out), *extra])
    return code, src, out


def _images(h=100, w=130, seed=1):
    return torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "backbone, make_file, fpn, feat, convs",
    [(R18, mmdet_v2_file, 64, 32, 2), (R50_TINY, mmdet_v3_file, 32, 32, 4)],
    ids=["r18-mmcv1-meta", "r50tiny-mmengine-meta"],
)
def test_imported_outputs_equal_mmdetection_forward_per_level(tmp_path, backbone, make_file, fpn, feat, convs):
    state = mmdet_gfl_state(backbone, fpn_channels=fpn, feat_channels=feat, stacked_convs=convs, num_classes=5, reg_max=7)
    code, src, out = _import(tmp_path, make_file(state, CLASSES))
    assert code == 0

    payload = torch.load(out, map_location="cpu", weights_only=True)
    assert payload["format_version"] == 2 and payload["architecture"]["family"] == "mmdet-gfl"
    assert payload["classes"] == CLASSES and payload["point_offset"] == 0.0 and payload["source_format"] == "mmdet-gfl"
    assert payload["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert payload["preprocessing"]["channel_order"] == "RGB"
    assert payload["preprocessing"]["pixel_mean"] == [123.675, 116.28, 103.53]
    assert payload["preprocessing"]["pixel_std"] == [58.395, 57.12, 57.375]
    arch = payload["architecture"]
    assert arch["backbone"]["depth"] == (18 if backbone is R18 else 50)
    assert arch["backbone"]["stage_planes"] == list(backbone["planes"])
    assert arch["neck"]["out_channels"] == fpn and arch["head"]["feat_channels"] == feat
    assert arch["head"]["stacked_convs"] == convs and arch["head"]["num_classes"] == 5 and arch["reg_max"] == 7
    assert arch["strides"] == [8, 16, 32, 64, 128]
    assert arch["name"] == (f"mmdet_gfl_r18_fpn{fpn}" if backbone is R18 else f"mmdet_gfl_r50_fpn{fpn}")

    model, meta = load_detector_with_meta(out)
    assert meta["classes"] == tuple(CLASSES) and meta["architecture"] == arch
    images = _images()
    with torch.no_grad():
        outputs = model(images, with_backbone=True)
        c_ref, p_ref, cls_ref, reg_ref = reference_forward(state, images)
    assert outputs.point_offset == 0.0 and outputs.reg_max == 7 and outputs.strides == (8, 16, 32, 64, 128)
    # The same torch kernels with the same arguments in the same order: bit-identical.
    for mine, ref in zip(outputs.backbone_features, c_ref):
        assert torch.equal(mine, ref)
    for level in range(5):
        assert torch.equal(outputs.fpn_features[level], p_ref[level])
        assert torch.equal(outputs.cls_logits[level], cls_ref[level])
        assert torch.equal(outputs.box_logits[level], reg_ref[level])
        assert outputs.box_logits[level].shape[1] == 4 * 8
        # Edges: the expectation of each edge's distribution over bins 0..R (mmdetection's Integral).
        probs = reg_ref[level].reshape(2, 4, 8, *reg_ref[level].shape[-2:]).softmax(dim=2)
        expected = (probs * torch.arange(8.0)[:, None, None]).sum(dim=2)
        torch.testing.assert_close(outputs.edge_distances()[level], expected, rtol=0, atol=1e-5)
    assert [tuple(t.shape[-2:]) for t in outputs.cls_logits] == [(13, 17), (7, 9), (4, 5), (2, 3), (1, 2)]


def test_no_relu_before_p7(tmp_path):
    state = mmdet_gfl_state(R18, fpn_channels=64, feat_channels=32, stacked_convs=1)
    architecture, model_state, _ = convert_mmdet_gfl(mmdet_v2_file(state, CLASSES), None)
    model = build_mmdet_gfl(architecture)
    model.load_state_dict(model_state)
    model.eval()
    images = _images(128, 128)
    with torch.no_grad():
        p6 = model(images).fpn_features[3]
        p7 = model(images).fpn_features[4]
        p7_on_output = F.conv2d(p6, state["neck.fpn_convs.4.conv.weight"], state["neck.fpn_convs.4.conv.bias"], stride=2, padding=1)
        p7_on_relu = F.conv2d(F.relu(p6), state["neck.fpn_convs.4.conv.weight"], state["neck.fpn_convs.4.conv.bias"], stride=2, padding=1)
    assert (p6 < 0).any()  # otherwise a ReLU would change nothing and the test could not fail
    assert torch.equal(p7, p7_on_output)
    assert not torch.allclose(p7, p7_on_relu)


def test_fingerprint_and_checkpoint_describe_the_imported_teacher(tmp_path):
    state = mmdet_gfl_state(R18, stacked_convs=1)
    code, _, out = _import(tmp_path, mmdet_v3_file(state, CLASSES), "--canvas", "320x480")
    assert code == 0
    fingerprint = teacher_fingerprint(out)
    assert fingerprint["architecture"] == "mmdet_gfl_r18_fpn64" and fingerprint["canvas_hw"] == [320, 480]
    assert fingerprint["reg_max"] == 7 and fingerprint["preprocessing"]["point_offset"] == 0.0
    assert fingerprint["classes"] == CLASSES
    assert load_checkpoint(out)["metadata"] == {"source_file": "source.pth"}


def test_class_names_file_overrides_and_is_required_without_meta(tmp_path, capsys):
    state = mmdet_gfl_state(R18, stacked_convs=1)
    names = tmp_path / "names.txt"
    names.write_text("a\nb\nc\nd\ne\n")
    code, _, out = _import(tmp_path, {"meta": {}, "state_dict": state}, "--class-names", str(names))
    assert code == 0 and load_checkpoint(out)["classes"] == ["a", "b", "c", "d", "e"]

    code, _, _ = _import(tmp_path, {"meta": {}, "state_dict": state}, name="no_names.pt")
    assert code == 2
    err = capsys.readouterr().err
    assert "--class-names" in err and "5 names" in err


def test_class_count_mismatch_exits_2_naming_the_counts(tmp_path, capsys):
    state = mmdet_gfl_state(R18, stacked_convs=1, num_classes=5)
    names = tmp_path / "names.txt"
    names.write_text("a\nb\nc\n")
    code, _, out = _import(tmp_path, mmdet_v2_file(state, CLASSES), "--class-names", str(names))
    err = capsys.readouterr().err
    assert code == 2 and not out.exists() and not list(tmp_path.glob(".teacher.pt.*"))
    assert "3 class names" in err and "5 output channels" in err and "bbox_head.gfl_cls.weight" in err
    # A file whose own meta disagrees with its classifier is refused too.
    code, _, _ = _import(tmp_path, mmdet_v2_file(state, CLASSES[:4]), name="b.pt")
    assert code == 2 and "4 class names" in capsys.readouterr().err


def test_missing_and_unknown_keys_exit_2_naming_them(tmp_path, capsys):
    state = mmdet_gfl_state(R18, stacked_convs=1)
    broken = dict(state)
    del broken["bbox_head.reg_convs.0.gn.weight"]
    broken["bbox_head.extra.weight"] = torch.zeros(1)
    code, _, out = _import(tmp_path, mmdet_v2_file(broken, CLASSES))
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert "missing keys: bbox_head.reg_convs.0.gn.weight" in err and "unknown keys: bbox_head.extra.weight" in err

    no_scale = {k: v for k, v in state.items() if k != "bbox_head.scales.4.scale"}
    code, _, _ = _import(tmp_path, mmdet_v2_file(no_scale, CLASSES), name="b.pt")
    assert code == 2 and "bbox_head.scales.i.scale" in capsys.readouterr().err


def test_optional_keys_num_batches_tracked_and_project(tmp_path):
    state = mmdet_gfl_state(R18, stacked_convs=1)
    lean = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked") and k != "bbox_head.integral.project"}
    code, _, out = _import(tmp_path, mmdet_v2_file(lean, CLASSES))
    assert code == 0
    model = load_detector(out)
    with torch.no_grad():
        assert torch.equal(model(_images()).cls_logits[0], reference_forward(state, _images())[2][0])


def test_files_of_another_format_exit_2(tmp_path, capsys):
    state = mmdet_gfl_state(R18, stacked_convs=1)
    # A bare state dict (torchvision style) is not an mmdetection file.
    code, _, _ = _import(tmp_path, dict(state), name="a.pt")
    assert code == 2 and "'meta' and 'state_dict'" in capsys.readouterr().err
    # Another detector in mmdetection's layout (no GFL head).
    retina = {k: v for k, v in state.items() if not k.startswith("bbox_head.gfl_")}
    retina["bbox_head.retina_cls.weight"] = torch.zeros(9, 32, 3, 3)
    code, _, _ = _import(tmp_path, mmdet_v2_file(retina, CLASSES), name="b.pt")
    assert code == 2 and "bbox_head.gfl_cls.weight" in capsys.readouterr().err
    # Not a torch file at all.
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    code = main(["teacher", "import", "--format", "mmdet-gfl", "--checkpoint", str(text), "--out", str(tmp_path / "c.pt")])
    assert code == 2 and "torch.save" in capsys.readouterr().err
    # A file with arbitrary pickled objects is refused unless --allow-pickle.
    code, _, _ = _import(tmp_path, {"meta": {"obj": _Opaque()}, "state_dict": state}, name="d.pt")
    assert code == 2 and "--allow-pickle" in capsys.readouterr().err
    # An already native checkpoint.
    code, _, first = _import(tmp_path, mmdet_v2_file(state, CLASSES), name="e.pt")
    assert code == 0
    code = main(["teacher", "import", "--format", "mmdet-gfl", "--checkpoint", str(first), "--out", str(tmp_path / "f.pt")])
    assert code == 2 and "already a distillery checkpoint" in capsys.readouterr().err


class _Opaque:
    pass


def test_missing_flag_exits_2_naming_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["teacher", "import", "--format", "mmdet-gfl", "--out", str(tmp_path / "t.pt")])
    assert exit_info.value.code == 2 and "--checkpoint" in capsys.readouterr().err
    code = main(["teacher", "import", "--format", "mmdet-gfl", "--checkpoint", str(tmp_path / "absent.pth"),
                 "--out", str(tmp_path / "t.pt")])
    assert code == 2 and "absent.pth" in capsys.readouterr().err


def test_torchvision_formats_require_class_names(tmp_path, capsys):
    src = tmp_path / "tv.pth"
    torch.save({"backbone.body.conv1.weight": torch.zeros(1)}, src)
    code = main(["teacher", "import", "--format", "torchvision-fcos", "--checkpoint", str(src), "--out", str(tmp_path / "o.pt")])
    assert code == 2 and "--class-names" in capsys.readouterr().err


def test_help_explains_formats():
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-m", "distillery.cli", "teacher", "import", "--help"], cwd=repo,
                            capture_output=True, text=True, timeout=120)
    text = result.stdout
    assert result.returncode == 0
    for word in ("mmdet-gfl", "torchvision-fcos", "torchvision-retinanet", "--class-names", "meta['CLASSES']"):
        assert word in text


def test_imported_teacher_through_the_teacher_api(tmp_path):
    from detcore.teacher import load_teacher

    state = mmdet_gfl_state(R18, fpn_channels=64, feat_channels=64, stacked_convs=1, reg_max=7)
    code, _, out = _import(tmp_path, mmdet_v2_file(state, CLASSES), "--canvas", "96x128")
    assert code == 0
    teacher = load_teacher(out, device="cpu", precision="fp32")
    assert teacher.classes == tuple(CLASSES) and teacher.canvas_hw == (96, 128) and teacher.point_offset == 0.0
    assert teacher.strides == (8, 16, 32, 64, 128) and teacher.reg_max == 7
    assert set(teacher.available_groups) == {"cls", "box", "edges", "fpn", "backbone"}
    images = _images(96, 128)
    outputs = teacher.forward(images, backbone=True)
    with torch.no_grad():
        c_ref, p_ref, cls_ref, reg_ref = reference_forward(state, images)
    targets = outputs.to_targets(("cls", "box", "edges", "fpn", "backbone"))
    assert torch.equal(targets["cls/p3"], cls_ref[0]) and torch.equal(targets["box/p7"], reg_ref[4])
    assert torch.equal(targets["fpn/p5"], p_ref[2]) and torch.equal(targets["backbone/c5"], c_ref[2])
    assert targets["edges/p3"].shape == (2, 4, 12, 16)
    assert teacher.fingerprint()["architecture"] == "mmdet_gfl_r18_fpn64"


@pytest.mark.parametrize("fmt, builder", [("torchvision-fcos", "fcos_resnet50_fpn"), ("torchvision-retinanet", "retinanet_resnet50_fpn")])
def test_torchvision_formats_through_the_cli(tmp_path, capsys, fmt, builder):
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models.detection, builder)(weights=None, weights_backbone=None, num_classes=3).eval()
    src = tmp_path / "tv.pth"
    torch.save(model.state_dict(), src)
    names = tmp_path / "names.txt"
    names.write_text("a\nb\nc\n")
    out = tmp_path / "tv.pt"
    assert main(["teacher", "import", "--format", fmt, "--checkpoint", str(src), "--out", str(out),
                 "--class-names", str(names)]) == 0
    payload = torch.load(out, map_location="cpu", weights_only=True)
    assert payload["architecture"]["family"] == fmt and payload["classes"] == ["a", "b", "c"]
    assert payload["point_offset"] == 0.0 and payload["source_format"] == fmt and payload["format_version"] == 2
    loaded = load_detector(out)
    with torch.no_grad():
        outputs = loaded(_images(128, 128))
    assert outputs.point_offset == 0.0 and len(outputs.fpn_features) == 5
    # Two class names for three output channels, and an mmdetection file given as torchvision: exit 2.
    names.write_text("a\nb\n")
    assert main(["teacher", "import", "--format", fmt, "--checkpoint", str(src), "--out", str(tmp_path / "x.pt"),
                 "--class-names", str(names)]) == 2
    err = capsys.readouterr().err
    assert "2" in err and "3" in err
    mmdet = tmp_path / "mmdet.pth"
    torch.save(mmdet_v2_file(mmdet_gfl_state(R18, stacked_convs=1), CLASSES), mmdet)
    assert main(["teacher", "import", "--format", fmt, "--checkpoint", str(mmdet), "--out", str(tmp_path / "y.pt"),
                 "--class-names", str(names)]) == 2
    assert "state_dict" in capsys.readouterr().err
