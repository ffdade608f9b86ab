"""detcore.coco: category mapping, crowd regions, negatives, and each repair / strict-mode error."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from PIL import Image

from detcore.coco import AnnotationError, CocoDataset, ImageRecord
from detcore.images import ImageDecodeError


def _write(tmp_path, data, name="ann.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def _base(annotations, images=None, categories=None):
    return {
        "images": images
        if images is not None
        else [
            {"id": 1, "file_name": "a.png", "height": 40, "width": 60},
            {"id": 2, "file_name": "b.png", "height": 50, "width": 30},
            {"id": 3, "file_name": "c.png", "height": 20, "width": 20},
        ],
        "annotations": annotations,
        "categories": categories
        if categories is not None
        else [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 18, "name": "dog"}],
    }


def _ann(ann_id, image_id, cat_id, bbox, **extra):
    return {"id": ann_id, "image_id": image_id, "category_id": cat_id, "bbox": bbox, "area": bbox[2] * bbox[3], **extra}


def test_contiguous_labels_crowd_and_negatives(tmp_path):
    anns = [
        _ann(10, 1, 90, [1, 2, 10, 20]),
        _ann(11, 1, 18, [5, 5, 4, 4]),
        _ann(12, 1, 1, [0, 0, 30, 30], iscrowd=1),
        _ann(13, 2, 1, [2, 3, 5, 6]),
    ]
    ds = CocoDataset(_write(tmp_path, _base(anns)), tmp_path)
    assert ds.cat_ids == (1, 18, 90)
    assert ds.classes == ("person", "dog", "toothbrush")
    assert [ds.label_of(c) for c in (1, 18, 90)] == [0, 1, 2]
    assert ds.image_ids == [1, 2, 3] and len(ds) == 3
    t1 = ds.targets(1)
    assert t1.gt_boxes.dtype == np.float32 and t1.gt_labels.dtype == np.int64
    np.testing.assert_array_equal(t1.gt_boxes, [[1, 2, 11, 22], [5, 5, 9, 9]])
    np.testing.assert_array_equal(t1.gt_labels, [2, 1])
    np.testing.assert_array_equal(t1.ignore_boxes, [[0, 0, 30, 30]])
    t3 = ds.targets(3)  # negative image: kept, empty arrays of the right shape
    assert t3.gt_boxes.shape == (0, 4) and t3.gt_labels.shape == (0,) and t3.ignore_boxes.shape == (0, 4)
    assert ds.record(2) == ImageRecord(2, "b.png", 50, 30)
    assert ds.image_path(2) == tmp_path / "b.png"
    assert ds.repairs == []
    with pytest.raises(AnnotationError):
        ds.label_of(2)
    with pytest.raises(KeyError):
        ds.targets(99)


def test_coco_80_of_91_ids_map_to_0_79(tmp_path):
    missing = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91}
    cats = [{"id": i, "name": f"c{i}"} for i in range(1, 92) if i not in missing]
    assert len(cats) == 80
    ds = CocoDataset(_write(tmp_path, _base([_ann(1, 1, 90, [0, 0, 5, 5])], categories=cats)), tmp_path)
    assert len(ds.classes) == 80 and ds.num_classes == 80
    assert ds.label_of(1) == 0 and ds.label_of(13) == 11 and ds.label_of(90) == 79
    assert ds.targets(1).gt_labels.tolist() == [79]


def test_unknown_category_always_an_error(tmp_path):
    path = _write(tmp_path, _base([_ann(77, 2, 5, [0, 0, 5, 5])]))
    for repair in (True, False):
        with pytest.raises(AnnotationError, match="category_id=5") as caught:
            CocoDataset(path, tmp_path, repair=repair)
        assert "annotation id=77" in str(caught.value) and "image_id=2" in str(caught.value)


@pytest.mark.parametrize(
    "bbox, kept, expected, words",
    [
        ([3, 3, 0, 5], False, None, "non-positive width or height"),
        ([3, 3, 5, -2], False, None, "non-positive width or height"),
        ([-10, 5, 20, 10], True, [0, 5, 10, 15], "clipped"),
        ([50, 30, 20, 20], True, [50, 30, 60, 40], "clipped"),
        ([70, 5, 10, 10], False, None, "entirely outside"),
        ([-20, -20, 10, 10], False, None, "entirely outside"),
    ],
)
def test_repairs_logged_and_strict_errors(tmp_path, caplog, bbox, kept, expected, words):
    path = _write(tmp_path, _base([_ann(5, 1, 1, bbox), _ann(6, 1, 18, [1, 1, 2, 2])]))
    with caplog.at_level(logging.WARNING, logger="detcore.coco"):
        ds = CocoDataset(path, tmp_path, repair=True)
    assert len(ds.repairs) == 1
    assert words in ds.repairs[0] and "annotation id=5" in ds.repairs[0] and "image_id=1" in ds.repairs[0]
    assert sum(words in r.getMessage() for r in caplog.records if r.name == "detcore.coco") == 1
    boxes = ds.targets(1).gt_boxes
    assert boxes.shape == ((2, 4) if kept else (1, 4))
    if kept:
        np.testing.assert_allclose(boxes[0], expected)
        coco_box = ds.coco.anns[5]["bbox"]  # evaluation sees the same repaired box
        np.testing.assert_allclose([coco_box[0], coco_box[1], coco_box[0] + coco_box[2], coco_box[1] + coco_box[3]], expected)
    else:
        assert 5 not in ds.coco.anns
    with pytest.raises(AnnotationError, match="annotation id=5") as caught:
        CocoDataset(path, tmp_path, repair=False)
    assert "image_id=1" in str(caught.value) and words in str(caught.value)


def test_annotation_for_unknown_image(tmp_path):
    path = _write(tmp_path, _base([_ann(8, 99, 1, [0, 0, 3, 3])]))
    ds = CocoDataset(path, tmp_path)
    assert len(ds.repairs) == 1 and "image_id=99" in ds.repairs[0]
    assert sum(len(ds.targets(i).gt_boxes) for i in ds.image_ids) == 0
    with pytest.raises(AnnotationError, match="image_id=99"):
        CocoDataset(path, tmp_path, repair=False)


def test_missing_area_filled_with_one_logged_repair(tmp_path):
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 4, 5]}]
    ds = CocoDataset(_write(tmp_path, _base(anns)), tmp_path)
    assert ds.coco.anns[1]["area"] == 20.0 and ds.coco.anns[1]["iscrowd"] == 0
    assert len(ds.repairs) == 1 and "area" in ds.repairs[0]


@pytest.mark.parametrize(
    "mutate, key",
    [
        (lambda d: d.pop("categories"), "categories"),
        (lambda d: d["images"][0].pop("height"), "height"),
        (lambda d: d["images"][1].pop("file_name"), "file_name"),
        (lambda d: d["annotations"][0].pop("bbox"), "bbox"),
        (lambda d: d["annotations"][0].pop("category_id"), "category_id"),
        (lambda d: d["annotations"][0].pop("image_id"), "image_id"),
        (lambda d: d["categories"][0].pop("name"), "name"),
    ],
)
def test_missing_keys_name_the_key(tmp_path, mutate, key):
    data = _base([_ann(1, 1, 1, [0, 0, 3, 3])])
    mutate(data)
    with pytest.raises(AnnotationError, match=f"'{key}'"):
        CocoDataset(_write(tmp_path, data), tmp_path)


def test_malformed_inputs(tmp_path):
    with pytest.raises(AnnotationError, match="valid JSON"):
        CocoDataset(_write_text(tmp_path, "{not json"), tmp_path)
    with pytest.raises(AnnotationError, match="readable"):
        CocoDataset(tmp_path / "missing.json", tmp_path)
    dup = _base([_ann(1, 1, 1, [0, 0, 3, 3]), _ann(1, 2, 1, [0, 0, 3, 3])])
    with pytest.raises(AnnotationError, match="unique annotation ids"):
        CocoDataset(_write(tmp_path, dup), tmp_path)
    bad_box = _base([{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 3]}])
    with pytest.raises(AnnotationError, match=r"bbox \[x, y, w, h\]"):
        CocoDataset(_write(tmp_path, bad_box), tmp_path)
    nan_box = _base([{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, float("nan"), 3, 3]}])
    with pytest.raises(AnnotationError, match="finite"):
        CocoDataset(_write(tmp_path, nan_box), tmp_path)


def _write_text(tmp_path, text):
    path = tmp_path / "bad.json"
    path.write_text(text)
    return path


def test_load_checks_decoded_size(tmp_path):
    Image.fromarray(np.full((40, 60, 3), 7, np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.full((30, 50, 3), 7, np.uint8)).save(tmp_path / "b.png")  # annotation says 50x30 (HxW)
    ds = CocoDataset(_write(tmp_path, _base([])), tmp_path)
    pixels = ds.load(1)
    assert pixels.shape == (40, 60, 3) and int(pixels[0, 0, 0]) == 7
    with pytest.raises(ImageDecodeError) as caught:
        ds.load(2)
    message = str(caught.value)
    assert "image_id=2" in message and "30x50" in message and "50x30" in message
    with pytest.raises(ImageDecodeError, match="file not found"):
        ds.load(3)


def test_pycocotools_prints_nothing(tmp_path, capsys):
    CocoDataset(_write(tmp_path, _base([_ann(1, 1, 1, [0, 0, 3, 3])])), tmp_path)
    assert capsys.readouterr().out == ""
