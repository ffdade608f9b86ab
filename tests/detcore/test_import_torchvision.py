"""torchvision FCOS / RetinaNet import: converted models equal torchvision's own modules, exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models.detection import fcos_resnet50_fpn, retinanet_resnet50_fpn, retinanet_resnet50_fpn_v2
from torchvision.ops.misc import FrozenBatchNorm2d

from detcore.importers.torchvision_models import (
    TORCHVISION_STRIDES,
    TorchvisionImportError,
    build_torchvision_detector,
    convert_torchvision_state,
)

NUM_CLASSES = 3
CLASSES = ["cat", "dog", "bird"]
IMAGE_HW = (128, 128)


def _randomise_norms(model: nn.Module, seed: int) -> None:
    """BatchNorm statistics and norm affines away from their identity init, so a wrong norm shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)


def _freeze_batch_norms(module: nn.Module, eps: float) -> None:
    """Swap BatchNorm2d for FrozenBatchNorm2d, as torchvision's constructors do for trained weights."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=eps)
            frozen.load_state_dict(child.state_dict())
            setattr(module, name, frozen)
        else:
            _freeze_batch_norms(child, eps)


def _torchvision_model(constructor, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = constructor(weights=None, weights_backbone=None, num_classes=NUM_CLASSES)
    _randomise_norms(model, seed)
    return model.eval()


def _without_counters(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, *IMAGE_HW, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def fcos_model() -> nn.Module:
    return _torchvision_model(fcos_resnet50_fpn, 1)


@pytest.fixture(scope="module")
def retinanet_model() -> nn.Module:
    return _torchvision_model(retinanet_resnet50_fpn, 2)


@pytest.fixture(scope="module")
def retinanet_v2_model() -> nn.Module:
    return _torchvision_model(retinanet_resnet50_fpn_v2, 3)


def _reference_levels(model: nn.Module, images: torch.Tensor):
    """torchvision's own forward without its transform: backbone, then the head, split per level."""
    with torch.no_grad():
        stages = model.backbone.body(images)
        features = list(model.backbone(images).values())
        head = model.head(features)
    sizes = [f.shape[-2] * f.shape[-1] for f in features]
    per_level = {}
    for name, channels in (("cls_logits", NUM_CLASSES), ("bbox_regression", 4), ("bbox_ctrness", 1)):
        if name in head and model.head.classification_head.num_anchors == 1:
            chunks = head[name].split(sizes, dim=1)
            per_level[name] = [
                chunk.reshape(images.shape[0], f.shape[-2], f.shape[-1], channels).permute(0, 3, 1, 2) for chunk, f in zip(chunks, features)
            ]
    return list(stages.values()), features, per_level


def _converted(kind: str, state: dict):
    architecture, model_state, classes = convert_torchvision_state(kind, state, CLASSES)
    model = build_torchvision_detector(architecture)
    model.load_state_dict(model_state)
    return architecture, model.eval(), classes


@pytest.mark.parametrize("with_counters", [True, False])
def test_fcos_levels_equal_torchvision(fcos_model, images, with_counters):
    reference = fcos_model
    state = fcos_model.state_dict()
    if not with_counters:
        state = _without_counters(state)
        reference = _torchvision_model(fcos_resnet50_fpn, 1)
        _freeze_batch_norms(reference, eps=1e-5)
        reference.load_state_dict(state)
    architecture, model, classes = _converted("fcos", state)
    assert architecture["family"] == "torchvision-fcos"
    assert architecture["backbone"] == {"depth": 50, "norm": "batch_norm" if with_counters else "frozen_batch_norm", "norm_eps": 1e-5}
    assert architecture["num_classes"] == NUM_CLASSES and classes == CLASSES
    stages, features, head = _reference_levels(reference, images)
    with torch.no_grad():
        outputs = model(images, with_backbone=True)
        centerness = model.centerness(images)
    assert outputs.strides == TORCHVISION_STRIDES and outputs.point_offset == 0.0
    assert outputs.box_logits is None and outputs.reg_max is None
    assert len(outputs.cls_logits) == len(features) == 5
    for level, feature in enumerate(features):
        assert outputs.cls_logits[level].shape == (2, NUM_CLASSES, *feature.shape[-2:])
        assert torch.equal(outputs.fpn_features[level], feature)
        assert torch.equal(outputs.cls_logits[level], head["cls_logits"][level])
        assert torch.equal(outputs.distances[level], head["bbox_regression"][level])
        assert torch.equal(centerness[level], head["bbox_ctrness"][level])
    for mine, theirs in zip(outputs.backbone_features, stages, strict=True):
        assert torch.equal(mine, theirs)


@pytest.mark.parametrize("variant", ["v1", "v2"])
@pytest.mark.parametrize("with_counters", [True, False])
def test_retinanet_levels_equal_torchvision(retinanet_model, retinanet_v2_model, images, variant, with_counters):
    constructor, source = (retinanet_resnet50_fpn, retinanet_model) if variant == "v1" else (retinanet_resnet50_fpn_v2, retinanet_v2_model)
    reference = source
    state = source.state_dict()
    # torchvision loads its published v1 COCO weights with FrozenBatchNorm2d of eps 0 (overwrite_eps).
    frozen_eps = 0.0 if variant == "v1" else 1e-5
    if not with_counters:
        state = _without_counters(state)
        reference = _torchvision_model(constructor, 2 if variant == "v1" else 3)
        _freeze_batch_norms(reference, eps=frozen_eps)
        reference.load_state_dict(state)
    architecture, model, _ = _converted("retinanet", state)
    assert architecture["family"] == "torchvision-retinanet"
    assert architecture["num_anchors"] == 9 and architecture["num_classes"] == NUM_CLASSES
    assert architecture["head_norm"] == (None if variant == "v1" else "group_norm")
    assert architecture["extra_levels_from"] == ("p5" if variant == "v1" else "c5")
    assert architecture["backbone"]["norm_eps"] == (1e-5 if with_counters else frozen_eps)
    stages, features, _ = _reference_levels(reference, images)
    with torch.no_grad():
        outputs = model(images, with_backbone=True)
    assert outputs.cls_logits is None and outputs.box_logits is None and outputs.distances is None
    assert outputs.point_offset == 0.0
    for mine, theirs in zip(outputs.fpn_features, features, strict=True):
        assert torch.equal(mine, theirs)
    for mine, theirs in zip(outputs.backbone_features, stages, strict=True):
        assert torch.equal(mine, theirs)
    # The head's weights travel too (the model state is the whole model's).
    assert torch.equal(model.state_dict()["head.classification_head.cls_logits.weight"], state["head.classification_head.cls_logits.weight"])


@pytest.mark.parametrize("kind", ["fcos", "retinanet_v2"])
def test_model_state_round_trips_through_a_file(fcos_model, retinanet_v2_model, images, kind, tmp_path):
    source = fcos_model if kind == "fcos" else retinanet_v2_model
    architecture, model_state, _ = convert_torchvision_state(kind.split("_")[0], _without_counters(source.state_dict()), CLASSES)
    assert architecture["name"] == ("torchvision_fcos_r50_fpn" if kind == "fcos" else "torchvision_retinanet_r50_fpn_v2")
    # A plain dict (no state_dict metadata), as a checkpoint file holds it.
    torch.save({"architecture": architecture, "model_state": dict(model_state)}, tmp_path / "t.pt")
    loaded = torch.load(tmp_path / "t.pt", weights_only=True)
    model = build_torchvision_detector(loaded["architecture"])
    model.load_state_dict(loaded["model_state"])
    direct = build_torchvision_detector(architecture)
    direct.load_state_dict(model_state)
    with torch.no_grad():
        mine, theirs = model(images), direct(images)
    for a, b in zip(mine.fpn_features, theirs.fpn_features, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(model.head.classification_head.cls_logits.weight, source.head.classification_head.cls_logits.weight)


def test_wrong_kind_is_named(fcos_model, retinanet_model):
    with pytest.raises(TorchvisionImportError, match="bbox_ctrness.*kind='retinanet'"):
        convert_torchvision_state("fcos", retinanet_model.state_dict(), CLASSES)
    with pytest.raises(TorchvisionImportError, match="kind='fcos'"):
        convert_torchvision_state("retinanet", fcos_model.state_dict(), CLASSES)
    with pytest.raises(TorchvisionImportError, match="kind=.*'yolo'"):
        convert_torchvision_state("yolo", fcos_model.state_dict(), CLASSES)


def test_class_count_mismatch_is_named(fcos_model):
    with pytest.raises(TorchvisionImportError, match="expects 3 names.*Got 2"):
        convert_torchvision_state("fcos", fcos_model.state_dict(), CLASSES[:2])


def test_missing_and_unexpected_keys_are_named(fcos_model):
    state = dict(fcos_model.state_dict())
    del state["backbone.fpn.layer_blocks.1.0.weight"]
    state["head.extra.weight"] = torch.zeros(1)
    with pytest.raises(TorchvisionImportError, match=r"missing keys: backbone\.fpn\.layer_blocks\.1\.0\.weight.*unexpected keys: head\.extra\.weight"):
        convert_torchvision_state("fcos", state, CLASSES)
    state = dict(fcos_model.state_dict())
    del state["head.classification_head.cls_logits.weight"]
    with pytest.raises(TorchvisionImportError, match=r"Missing keys: head\.classification_head\.cls_logits\.weight"):
        convert_torchvision_state("fcos", state, CLASSES)


def test_wrong_shape_is_named(fcos_model):
    state = dict(fcos_model.state_dict())
    state["backbone.fpn.layer_blocks.0.0.weight"] = torch.zeros(256, 256, 1, 1)
    with pytest.raises(TorchvisionImportError, match=r"backbone\.fpn\.layer_blocks\.0\.0\.weight"):
        convert_torchvision_state("fcos", state, CLASSES)


def test_not_a_state_dict():
    with pytest.raises(TorchvisionImportError, match="mapping of tensors"):
        convert_torchvision_state("fcos", [1, 2], CLASSES)
    with pytest.raises(TorchvisionImportError, match="non-tensor values at keys: epoch"):
        convert_torchvision_state("fcos", {"epoch": 3}, CLASSES)


def _write_imported(path, kind: str, state: dict, classes) -> None:
    """A format-version-2 checkpoint as `distill teacher import` writes one."""
    from detcore.checkpoint import CHECKPOINT_FORMAT, IMPORTED_FORMAT_VERSIONS, preprocessing_spec

    architecture, model_state, classes = convert_torchvision_state(kind, state, classes)
    torch.save(
        {
            "format": CHECKPOINT_FORMAT, "format_version": IMPORTED_FORMAT_VERSIONS[-1], "architecture": architecture,
            "classes": list(classes), "canvas_hw": list(IMAGE_HW), "preprocessing": preprocessing_spec(), "point_offset": 0.0,
            "source_format": f"torchvision-{kind}", "source_sha256": "0" * 64, "model_state": dict(model_state),
            "training": None, "metadata": {},
        },
        path,
    )


def test_imported_teachers_through_the_teacher_api_with_a_class_mapping(fcos_model, retinanet_model, images, tmp_path):
    from detcore.classes import map_classes
    from detcore.teacher import TeacherGroupError, load_teacher

    _write_imported(tmp_path / "fcos.pt", "fcos", fcos_model.state_dict(), ["Bird", "cat", "zebra"])
    dataset = ("cat", "bird")
    teacher = load_teacher(tmp_path / "fcos.pt")
    teacher.use_class_mapping(map_classes(teacher.teacher_classes, dataset))
    assert teacher.available_groups == ("cls", "edges", "fpn", "backbone")
    assert teacher.point_offset == 0.0 and teacher.reg_max is None
    assert teacher.fingerprint()["classes"] == list(dataset)
    assert teacher.fingerprint()["architecture"] == "torchvision_fcos_r50_fpn"
    assert [s.shape[0] for s in teacher.target_specs(("cls",), IMAGE_HW)] == [2] * 5
    outputs = teacher.forward(images)
    _, features, head = _reference_levels(fcos_model, images)
    for level in range(5):
        assert torch.equal(outputs.cls_logits[level], head["cls_logits"][level][:, [1, 0]])
        assert torch.equal(outputs.edge_distances()[level], head["bbox_regression"][level])
    with pytest.raises(TeacherGroupError, match="box"):
        teacher.check_groups(("box",))

    _write_imported(tmp_path / "retina.pt", "retinanet", retinanet_model.state_dict(), CLASSES)
    retina = load_teacher(tmp_path / "retina.pt")
    assert retina.available_groups == ("fpn", "backbone")
    with pytest.raises(TeacherGroupError, match="cls"):
        retina.check_groups(("cls", "fpn"))
