"""detcore.datasets: batches of one canvas (aspect-ratio grouping) and mapping boxes back per view."""

from __future__ import annotations

import json

import numpy as np
import pytest

from detcore.datasets import CanvasBatchSampler, canvas_batches
from detcore.views import plan_views

# 13 landscape and 6 portrait images (ids 1..19).
SIZES = [(30, 50)] * 13 + [(50, 30)] * 6


def _views(scales=(1.0, 0.5)):
    return plan_views([(i + 1, h, w) for i, (h, w) in enumerate(SIZES)], canvas_hw=(48, 80), scales=scales, flip=True)


def _canvas(view):
    return (view.canvas_h, view.canvas_w)


@pytest.mark.parametrize("batch_size, replicas", [(2, 1), (4, 1), (3, 2), (8, 1)])
def test_no_batch_mixes_canvases_and_ranks_agree(batch_size, replicas):
    views = _views()
    samplers = [CanvasBatchSampler(views, batch_size, seed=3, num_replicas=replicas, rank=r) for r in range(replicas)]
    for epoch in range(3):
        per_rank = [s.batches(epoch) for s in samplers]
        assert len({len(b) for b in per_rank}) == 1 and all(len(b) == samplers[0].num_batches for b in per_rank)
        for batches in per_rank:
            for batch in batches:
                assert len({_canvas(views[i]) for i in batch}) == 1
                assert 2 <= len(batch) <= batch_size or batch_size < 2
        # Ranks take the same canvas at each step (DDP steps stay in lock-step shapes).
        for step in zip(*per_rank):
            assert len({_canvas(views[batch[0]]) for batch in step}) == 1
        seen_canvases = {_canvas(views[i]) for batches in per_rank for b in batches for i in b}
        assert seen_canvases == {(48, 80), (80, 48)}


def test_one_view_per_image_and_deterministic_resume():
    views = _views()
    sampler = CanvasBatchSampler(views, 4, seed=1)
    first = sampler.batches(0)
    assert first == CanvasBatchSampler(views, 4, seed=1).batches(0)
    flat = [i for b in first for i in b]
    assert len({views[i].image_id for i in flat}) == len(flat)  # one view per image per epoch
    # 13 landscape -> 3 batches of 4, 6 portrait -> 1 batch of 4; remainders dropped.
    assert sampler.num_batches == 4 and len(sampler) == 4
    sampler.set_epoch(2, start=3)
    assert list(sampler) == sampler.batches(2)[3:] and len(sampler) == 1
    assert sampler.batches(1) != first


def test_single_canvas_matches_plain_batching():
    views = plan_views([(i + 1, 30, 50) for i in range(10)], canvas_hw=(48, 80), flip=False)
    sampler = CanvasBatchSampler(views, 4, seed=0, shuffle=False)
    assert sampler.batches(0) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    small = CanvasBatchSampler(views[:3], 4, seed=0, shuffle=False)
    assert small.batches(0) == [[0, 1, 2]]


def test_canvas_batches_cover_every_view_once():
    views = _views(scales=(1.0,))
    batches = canvas_batches(views, 4)
    assert sorted(i for b in batches for i in b) == list(range(len(views)))
    assert all(len({_canvas(views[i]) for i in b}) == 1 and len(b) <= 4 for b in batches)


def test_gt_through_portrait_and_landscape_views_maps_back_to_ap_one(tmp_path):
    """GT boxes rendered through each view (both canvases, scales, flips) and mapped back score AP 1.0."""
    from detcore.coco import CocoDataset
    from detcore.evaluate import coco_evaluate, detections_to_image
    from detcore.views import image_to_view_boxes

    rng = np.random.default_rng(0)
    sizes = [(480, 640), (640, 480), (427, 640), (640, 427), (300, 1200), (24, 36)]
    images, anns, gt = [], [], {}
    for image_id, (h, w) in enumerate(sizes, start=1):
        images.append({"id": image_id, "file_name": f"{image_id}.png", "height": h, "width": w})
        boxes = []
        for _ in range(3):
            bw, bh = rng.uniform(0.2, 0.5) * w, rng.uniform(0.2, 0.5) * h
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            boxes.append([x, y, x + bw, y + bh])
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": 1 + len(anns) % 2,
                         "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0})
        gt[image_id] = np.asarray(boxes, np.float32)
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}))
    dataset = CocoDataset(path, tmp_path)
    views = plan_views([(i, h, w) for i, (h, w) in enumerate(sizes, start=1)], canvas_hw=(800, 1333), scales=(1.0, 0.6), flip=True)
    assert {(v.canvas_h, v.canvas_w) for v in views} == {(800, 1333), (1333, 800)}
    for canvas in ((800, 1333), (1333, 800)):
        for view_id in range(4):
            detections = []
            for view in views:
                if (view.canvas_h, view.canvas_w) != canvas or view.view_id != view_id:
                    continue
                labels = np.asarray([a["category_id"] - 1 for a in anns if a["image_id"] == view.image_id])
                on_canvas = image_to_view_boxes(gt[view.image_id], view)
                detections.append({"image_id": view.image_id, "boxes": detections_to_image(on_canvas, view),
                                   "scores": np.ones(len(labels), np.float32), "labels": labels})
            ids = [d["image_id"] for d in detections]
            metrics = coco_evaluate(dataset, detections, image_ids=ids)
            assert metrics["AP"] == pytest.approx(1.0), (canvas, view_id, metrics)
