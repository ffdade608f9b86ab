"""detcore.evaluate: COCO AP on cases whose value is known by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from detcore.coco import CocoDataset
from detcore.evaluate import coco_evaluate, detections_to_image, format_ap_table
from detcore.views import View, image_to_view_boxes

# GT boxes xyxy per image, with labels; areas cover small (< 32^2), medium and large (> 96^2).
GT = {
    1: ([[10, 10, 30, 30], [50, 40, 110, 100]], [0, 1]),  # 400 (small), 3600 (medium)
    2: ([[20, 20, 140, 140]], [2]),  # 14400 (large)
    3: ([], []),  # negative image
}


@pytest.fixture
def dataset(tmp_path):
    images = [{"id": i, "file_name": f"{i}.png", "height": 160, "width": 160} for i in GT]
    anns = []
    for image_id, (boxes, labels) in GT.items():
        for (x1, y1, x2, y2), label in zip(boxes, labels):
            anns.append(
                {"id": len(anns) + 1, "image_id": image_id, "category_id": (3, 8, 20)[label], "bbox": [x1, y1, x2 - x1, y2 - y1],
                 "area": (x2 - x1) * (y2 - y1), "iscrowd": 0}
            )
    cats = [{"id": 3, "name": "a"}, {"id": 8, "name": "b"}, {"id": 20, "name": "c"}]
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return CocoDataset(path, tmp_path)


def _perfect(shift_x: float = 0.0):
    dets = []
    for image_id, (boxes, labels) in GT.items():
        b = np.asarray(boxes, np.float32).reshape(-1, 4) + np.float32([shift_x, 0, shift_x, 0])
        scores = np.full(len(b), 0.9, np.float32)
        dets.append({"image_id": image_id, "boxes": b, "scores": scores, "labels": np.asarray(labels, np.int64)})
    return dets


def test_perfect_detections_give_one(dataset, capsys):
    result = coco_evaluate(dataset, _perfect())
    assert set(result) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    for name, value in result.items():
        assert value == pytest.approx(1.0), name
    assert capsys.readouterr().out == ""  # pycocotools' prints are swallowed


def test_shifted_detections_hand_computed(dataset):
    # Shift 3 px: IoU = (s - 3) * s / (2 s^2 - (s - 3) s). Side 20: 0.739, a hit at thresholds
    # 0.50..0.70 (5 of 10) -> AP 0.5. Side 60: 0.905, 9 of 10 -> 0.9. Side 120: 0.951, 10 of 10 -> 1.0.
    result = coco_evaluate(dataset, _perfect(shift_x=3.0))
    assert result["APs"] == pytest.approx(0.5, abs=1e-6)
    assert result["APm"] == pytest.approx(0.9, abs=1e-6)
    assert result["APl"] == pytest.approx(1.0, abs=1e-6)
    assert result["AP"] == pytest.approx((0.5 + 0.9 + 1.0) / 3, abs=1e-6)  # one class per box
    assert result["AP50"] == pytest.approx(1.0)
    assert result["AP75"] == pytest.approx(2.0 / 3.0, abs=1e-6)


def test_no_detections_give_zero(dataset):
    for detections in ([], [{"image_id": 1, "boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, np.int64)}]):
        result = coco_evaluate(dataset, detections)
        assert all(value == 0.0 for value in result.values()), result


def test_wrong_labels_and_false_positives_lower_ap(dataset):
    dets = _perfect()
    dets[1] = dict(dets[1], labels=np.array([0]))  # the large box with the wrong class
    result = coco_evaluate(dataset, dets)
    assert result["APl"] == 0.0 and result["APs"] == pytest.approx(1.0)
    assert result["AP"] == pytest.approx(2.0 / 3.0, abs=1e-6)


def test_image_subset_and_missing_area_range(dataset):
    result = coco_evaluate(dataset, _perfect()[:1], image_ids=[1, 1])
    assert result["AP"] == pytest.approx(1.0)
    assert math.isnan(result["APl"])  # no large GT in image 1: undefined, not -1


def test_canvas_detections_mapped_back(dataset):
    dets = []
    for image_id, (boxes, labels) in GT.items():
        view = View(image_id, 1, 256, 256, 160, 160, 1.3, True, offset_x=20, offset_y=10)
        canvas_boxes = image_to_view_boxes(np.asarray(boxes, np.float32).reshape(-1, 4), view)
        boxes = detections_to_image(canvas_boxes, view)
        dets.append({"image_id": image_id, "boxes": boxes, "scores": np.ones(len(labels)), "labels": np.asarray(labels)})
    assert coco_evaluate(dataset, dets)["AP"] == pytest.approx(1.0)


def test_bad_detections_raise(dataset):
    with pytest.raises(ValueError, match="labels"):
        coco_evaluate(dataset, [{"image_id": 1, "boxes": np.zeros((1, 4)), "scores": np.ones(1), "labels": np.array([3])}])
    with pytest.raises(ValueError, match="image_id=99"):
        coco_evaluate(dataset, [{"image_id": 99, "boxes": np.zeros((1, 4)), "scores": np.ones(1), "labels": np.array([0])}])
    with pytest.raises(ValueError, match="unknown ids"):
        coco_evaluate(dataset, [], image_ids=[1, 42])
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        coco_evaluate(dataset, [{"image_id": 1, "boxes": np.zeros((2, 4)), "scores": np.ones(1), "labels": np.array([0])}])


def test_format_ap_table():
    teacher = {"AP": 0.5, "AP50": 0.75, "AP75": 0.4, "APs": 0.1, "APm": 0.55, "APl": float("nan")}
    text = format_ap_table([("teacher", teacher), ("student-small", {"AP": 0.123})])
    lines = text.splitlines()
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1
    assert lines[0].split() == ["model", "AP", "AP50", "AP75", "APs", "APm", "APl"]
    assert lines[2].split() == ["teacher", "50.0", "75.0", "40.0", "10.0", "55.0", "-"]
    assert lines[3].split()[:2] == ["student-small", "12.3"] and lines[3].split()[2:] == ["-"] * 5
