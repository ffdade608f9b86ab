"""Teacher fingerprints, target specs and the default target set."""

from __future__ import annotations

import dataclasses

import pytest

from label_store import BASIS_FREE_CODECS, DEFAULT_CODECS, TargetSpec, TeacherFingerprint, default_target_specs
from label_store.codecs import parse_codec


def test_fingerprint_round_trip_and_hash(fingerprint):
    again = TeacherFingerprint.from_dict(fingerprint.to_dict())
    assert again == fingerprint
    assert hash(again) == hash(fingerprint)
    assert again.num_classes == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        fingerprint.reg_max = 3


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("checkpoint_sha256", "xyz", "64 lowercase hex"),
        ("classes", (), "non-empty"),
        ("canvas_hw", (64, 0), "two positive ints"),
        ("strides", (8, 12), "powers of two"),
        ("strides", (16, 8), "increasing"),
        ("reg_max", 0, "positive int"),
        ("preprocessing", {"f": object()}, "JSON types"),
        ("architecture", "", "non-empty string"),
    ],
)
def test_fingerprint_validation(fingerprint, field, value, match):
    data = fingerprint.to_dict()
    data[field] = value
    with pytest.raises(ValueError, match=match):
        TeacherFingerprint.from_dict(data)


def test_fingerprint_from_dict_requires_exact_keys(fingerprint):
    data = fingerprint.to_dict()
    del data["reg_max"]
    with pytest.raises(ValueError, match="exactly the keys"):
        TeacherFingerprint.from_dict(data)


def test_diff_names_both_values(fingerprint):
    other = dataclasses.replace(fingerprint, canvas_hw=(320, 320), reg_max=16, classes=("person", "bus", "dog"))
    lines = fingerprint.diff(other)
    assert "canvas_hw: store has (64, 48), caller expects (320, 320)" in lines
    assert "reg_max: store has 7, caller expects 16" in lines
    (classes,) = [line for line in lines if line.startswith("classes")]
    assert "'car'" in classes and "'bus'" in classes
    assert fingerprint.diff(fingerprint) == []


def test_class_mapping_round_trips_and_masks(fingerprint):
    assert "class_mapping" not in fingerprint.to_dict()
    assert fingerprint.class_mask == (True, True, True)
    mapping = {
        "teacher_classes": ["dog", "truck", "person"],
        "dataset_classes": ["person", "car", "dog"],
        "teacher_index": [2, -1, 0],
        "dropped_teacher_classes": ["truck"],
        "missing_dataset_classes": ["car"],
        "class_map": {},
    }
    mapped = dataclasses.replace(fingerprint, class_mapping=mapping)
    assert TeacherFingerprint.from_dict(mapped.to_dict()) == mapped
    assert mapped.class_mask == (True, False, True)
    assert any(line.startswith("class_mapping: store has") for line in mapped.diff(fingerprint))
    with pytest.raises(ValueError, match="dataset_classes are the fingerprint's classes"):
        dataclasses.replace(fingerprint, class_mapping=dict(mapping, dataset_classes=["car", "person", "dog"]))
    with pytest.raises(ValueError, match="teacher_index per class"):
        dataclasses.replace(fingerprint, class_mapping=dict(mapping, teacher_index=[2, 0]))


def test_preprocessing_is_canonical_json(fingerprint):
    fp = dataclasses.replace(fingerprint, preprocessing={"mean": (1, 2, 3)})
    assert fp.preprocessing == {"mean": [1, 2, 3]}


@pytest.mark.parametrize(
    "name, shape, codec, match",
    [
        ("cls", (3, 2, 2), "fp32", "<group>/<level>"),
        ("logits/p3", (3, 2, 2), "fp32", "<group>/<level>"),
        ("cls/p3", (3, 2), "fp32", r"\(C, H, W\)"),
        ("cls/p3", (3, 2, 0), "fp32", r"\(C, H, W\)"),
        ("cls/p3", (3, 2, 2), "int9-view", "codec name"),
        ("box/p3", (30, 2, 2), "fp32", r"4 \* \(R \+ 1\)"),
    ],
)
def test_target_spec_validation(name, shape, codec, match):
    with pytest.raises(ValueError, match=match):
        TargetSpec(name, shape, codec)


def test_target_spec_properties_and_dict():
    spec = TargetSpec("box/p4", [68, 10, 13], "int5-view+zstd5")
    assert spec.shape == (68, 10, 13) and spec.group == "box" and spec.level == "p4"
    assert spec.fp32_nbytes == 4 * 68 * 10 * 13
    assert TargetSpec.from_dict(spec.to_dict()) == spec


def test_default_target_specs_shapes_and_codecs():
    specs = default_target_specs(80, 16, (333, 500), (8, 16, 32, 64, 128), 256, backbone_channels=(512, 1024, 2048), groups=("cls", "box", "fpn", "backbone"))
    by_name = {s.name: s for s in specs}
    assert len(specs) == 18
    assert by_name["cls/p3"].shape == (80, 42, 63)  # ceil(333 / 8), ceil(500 / 8)
    assert by_name["box/p7"].shape == (68, 3, 4)
    assert by_name["fpn/p5"].shape == (256, 11, 16)
    assert by_name["backbone/c5"].shape == (2048, 11, 16)
    # Without data to fit a basis on, a transform-coded default gives way to its basis-free codec.
    assert parse_codec(DEFAULT_CODECS["cls"]).needs_basis and parse_codec(DEFAULT_CODECS["fpn"]).needs_basis
    assert by_name["cls/p3"].codec == BASIS_FREE_CODECS["cls"] and by_name["fpn/p3"].codec == BASIS_FREE_CODECS["fpn"]
    assert by_name["backbone/c3"].codec == DEFAULT_CODECS["backbone"]


def test_default_target_specs_overrides_and_errors():
    specs = default_target_specs(3, 7, (64, 64), (8, 16), 8, groups=("box",), codecs={"box": "fp16"})
    assert [s.name for s in specs] == ["box/p3", "box/p4"] and {s.codec for s in specs} == {"fp16"}
    with pytest.raises(ValueError, match="backbone_channels"):
        default_target_specs(3, 7, (64, 64), (8,), 8, groups=("backbone",))
    with pytest.raises(ValueError, match="groups"):
        default_target_specs(3, 7, (64, 64), (8,), 8, groups=("scores",))
    with pytest.raises(ValueError, match="power of two"):
        default_target_specs(3, 7, (64, 64), (12,), 8)
