"""Teacher classes to dataset categories by name."""

from __future__ import annotations

import json

import pytest
import torch

from detcore.classes import MISSING_CLASS_LOGIT, ClassMapping, ClassMappingError, MissingClassesError, map_classes, read_class_map

DATASET = ["person", "traffic light", "dog"]


def _levels(num_classes: int) -> tuple[torch.Tensor, ...]:
    # Channel c holds the value c everywhere, so the mapped channel order is visible in the values.
    return tuple(torch.arange(num_classes, dtype=torch.float32).view(1, -1, 1, 1).expand(2, num_classes, h, h).clone() for h in (4, 2))


def test_identity_returns_the_logits_unchanged():
    mapping = map_classes(DATASET, DATASET)
    levels = _levels(3)
    assert mapping.is_identity and mapping.class_mask == (True, True, True)
    assert all(a is b for a, b in zip(mapping.apply(levels), levels))


def test_reordered_names_with_other_spelling_and_an_extra_teacher_class():
    teacher = ["Dog", "car", "Traffic_Light", "PERSON"]
    mapping = map_classes(teacher, DATASET)
    assert mapping.teacher_index == (3, 2, 0)
    assert mapping.dropped_teacher_classes == ("car",)
    assert mapping.missing_dataset_classes == ()
    for mapped in mapping.apply(_levels(4)):
        assert mapped.shape[1] == 3
        assert torch.equal(mapped[:, :, 0, 0], torch.tensor([[3.0, 2.0, 0.0]] * 2))


def test_missing_dataset_class_raises_naming_it():
    with pytest.raises(MissingClassesError, match=r"\['traffic light'\]") as error:
        map_classes(["person", "dog", "cat"], DATASET)
    assert error.value.missing == ("traffic light",)
    assert isinstance(error.value, ValueError)


def test_missing_dataset_class_allowed_is_masked_and_filled():
    mapping = map_classes(["dog", "person", "cat"], DATASET, allow_missing=True)
    assert mapping.teacher_index == (1, -1, 0)
    assert mapping.class_mask == (True, False, True)
    assert mapping.missing_dataset_classes == ("traffic light",)
    assert mapping.dropped_teacher_classes == ("cat",)
    mapped = mapping.apply(_levels(3))[0]
    # The filler is the lowest known logit at the point (here teacher channel 0, "dog").
    assert torch.equal(mapped[0, :, 1, 1], torch.tensor([1.0, 0.0, 0.0]))
    levels = _levels(3)
    levels[0][1, :, 2, 3] = torch.tensor([-3.0, 5.0, 7.0])
    assert torch.equal(mapping.apply(levels)[0][1, :, 2, 3], torch.tensor([5.0, -3.0, -3.0]))
    nothing_known = map_classes(["cat"], DATASET, allow_missing=True)
    assert nothing_known.class_mask == (False, False, False)
    assert torch.equal(nothing_known.apply(_levels(1))[1], torch.full((2, 3, 2, 2), MISSING_CLASS_LOGIT))


def test_read_class_map(tmp_path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"motorbike": "motorcycle"}))
    assert read_class_map(path) == {"motorbike": "motorcycle"}
    path.write_text("[1, 2]")
    with pytest.raises(ClassMappingError, match="--class-map expects a JSON object"):
        read_class_map(path)
    path.write_text("{nope")
    with pytest.raises(ClassMappingError, match="is not JSON"):
        read_class_map(path)
    with pytest.raises(ClassMappingError, match="readable JSON file"):
        read_class_map(tmp_path / "absent.json")


def test_renames_via_class_map():
    teacher = ["pedestrian", "dog", "signal"]
    mapping = map_classes(teacher, DATASET, class_map={"Pedestrian": "person", "signal": "Traffic_Light"})
    assert mapping.teacher_index == (0, 2, 1)
    assert "pedestrian -> person" in mapping.describe()
    # Only the renamed class moves; the others still match by name, the unmatched one is dropped.
    mapping = map_classes(["person", "dog", "lamp", "pedestrian"], DATASET, class_map={"lamp": "traffic light"})
    assert mapping.teacher_index == (0, 2, 1)


def test_bad_class_maps_are_named():
    with pytest.raises(ClassMappingError, match="'zebra', which is not a teacher class"):
        map_classes(DATASET, DATASET, class_map={"zebra": "dog"})
    with pytest.raises(ClassMappingError, match="'horse', which is not a dataset category"):
        map_classes(DATASET, DATASET, class_map={"dog": "horse"})
    with pytest.raises(ClassMappingError, match="'person' and 'human' both to dataset category 'person'"):
        map_classes(["person", "human", "dog", "traffic light"], DATASET, class_map={"human": "person"})
    with pytest.raises(ClassMappingError, match="distinct names"):
        map_classes(DATASET, ["dog", "Dog"])


def test_duplicate_teacher_names_are_fine_when_dropped():
    # torchvision's COCO label list repeats "N/A" for unused ids.
    mapping = map_classes(["__background__", "person", "N/A", "traffic light", "N/A", "dog"], DATASET)
    assert mapping.teacher_index == (1, 3, 5)
    assert mapping.dropped_teacher_classes == ("__background__", "N/A", "N/A")


def test_apply_checks_the_channel_count():
    mapping = map_classes(["dog", "person", "traffic light", "car"], DATASET)
    with pytest.raises(ClassMappingError, match=r"Tensor\[B, 4, H, W\].*\(2, 3, 4, 4\) at level 0"):
        mapping.apply(_levels(3))


def test_dict_round_trip_through_json():
    mapping = map_classes(["pedestrian", "dog", "cat"], DATASET, class_map={"pedestrian": "person"}, allow_missing=True)
    data = json.loads(json.dumps(mapping.to_dict()))
    assert ClassMapping.from_dict(data) == mapping
    data["teacher_index"] = [1, -1, 0]
    with pytest.raises(ClassMappingError, match="teacher_index"):
        ClassMapping.from_dict(data)
