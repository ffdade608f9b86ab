"""COCO box mAP with pycocotools, for detections in source-image pixels.

Legend: N detections of one image; boxes are ``(x1, y1, x2, y2)``.

Detections come from a detector that saw a *view* (a canvas); `detections_to_image`
maps them back to the source image (undoing placement, flip and scale) before they are
scored against the annotation file's ground truth, so AP is comparable across views,
canvases and models.

A metric whose area range holds no ground truth at all (e.g. APl on a set without large
objects) is NaN, where pycocotools prints -1: -1 averages silently into a wrong number.
"""

from __future__ import annotations

import contextlib
import io
import math
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from detcore.views import View, view_to_image_boxes

if TYPE_CHECKING:
    from detcore.coco import CocoDataset

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
"""Keys of `coco_evaluate`'s result, in COCOeval's ``stats`` order (indices 0..5)."""


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, possibly on a GPU
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def detections_to_image(boxes_canvas: Any, view: View) -> np.ndarray:
    """Map detector boxes from canvas to source-image pixels.

    Args:
        boxes_canvas: ``[N, 4]`` ``(x1, y1, x2, y2)`` in canvas pixels (array or tensor).
        view: the view the detector saw.

    Returns:
        float32 ``[N, 4]`` in source-image pixels, clipped to the image.
    """
    return view_to_image_boxes(_as_numpy(boxes_canvas), view, clip=True)


def _results(dataset: "CocoDataset", detections: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    known = set(dataset.image_ids)
    num_classes = len(dataset.cat_ids)
    results: list[dict[str, Any]] = []
    for index, det in enumerate(detections):
        for key in ("image_id", "boxes", "scores", "labels"):
            if key not in det:
                raise ValueError(f"coco_evaluate(detections=) expects key '{key}' in every entry. Missing in entry {index}.")
        image_id = int(det["image_id"])
        if image_id not in known:
            raise ValueError(
                f"coco_evaluate(detections=) expects image ids of the dataset. Got image_id={image_id} (entry {index})."
            )
        boxes = _as_numpy(det["boxes"]).astype(np.float64)
        scores = _as_numpy(det["scores"]).astype(np.float64).reshape(-1)
        labels = _as_numpy(det["labels"]).astype(np.int64).reshape(-1)
        if boxes.size == 0:
            boxes = boxes.reshape(0, 4)
        if boxes.ndim != 2 or boxes.shape[1] != 4 or not (len(boxes) == len(scores) == len(labels)):
            raise ValueError(
                "coco_evaluate(detections=) expects boxes [N, 4], scores [N] and labels [N]. "
                f"Got {tuple(boxes.shape)}, {tuple(scores.shape)}, {tuple(labels.shape)} for image_id={image_id}."
            )
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(
                f"coco_evaluate(detections=) expects contiguous labels in [0, {num_classes - 1}]. "
                f"Got {labels.min()}..{labels.max()} for image_id={image_id}."
            )
        widths = boxes[:, 2] - boxes[:, 0]
        heights = boxes[:, 3] - boxes[:, 1]
        for (x1, y1, _, _), w, h, score, label in zip(boxes, widths, heights, scores, labels):
            results.append(
                {
                    "image_id": image_id,
                    "category_id": dataset.cat_ids[int(label)],
                    "bbox": [float(x1), float(y1), float(w), float(h)],
                    "score": float(score),
                    "area": float(max(w, 0.0) * max(h, 0.0)),
                    "iscrowd": 0,
                    "id": len(results) + 1,
                }
            )
    return results


def coco_evaluate(
    dataset: "CocoDataset",
    detections: Sequence[dict[str, Any]],
    image_ids: Sequence[int] | None = None,
) -> dict[str, float]:
    """COCO bbox AP of detections against the dataset's (repaired) ground truth.

    Args:
        dataset: the ground truth.
        detections: one dict per image (an image may appear in several): ``image_id``,
            ``boxes`` ``[N, 4]`` xyxy in source-image pixels, ``scores`` ``[N]``,
            ``labels`` ``[N]`` contiguous labels (numpy arrays or tensors).
        image_ids: the images to score; None scores every image of the dataset, so an
            image without detections counts its GT as missed.

    Returns:
        ``{"AP", "AP50", "AP75", "APs", "APm", "APl"}`` in [0, 1] (NaN where no GT falls
        in the area range). No detections at all give 0.0 wherever GT exists.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    selected = sorted(set(dataset.image_ids if image_ids is None else (int(i) for i in image_ids)))
    unknown = sorted(set(selected) - set(dataset.image_ids))
    if unknown:
        raise ValueError(f"coco_evaluate(image_ids=) expects image ids of the dataset. Got unknown ids {unknown[:10]}.")
    results = _results(dataset, detections)
    gt = dataset.coco
    # Built by hand, not COCO.loadRes: loadRes fails on an empty list and prints.
    dt = COCO()
    dt.dataset = {"images": list(gt.dataset["images"]), "categories": list(gt.dataset["categories"]), "annotations": results}
    with contextlib.redirect_stdout(io.StringIO()):
        dt.createIndex()
        evaluator = COCOeval(gt, dt, iouType="bbox")
        evaluator.params.imgIds = selected
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats
    return {name: (float("nan") if stats[i] < 0 else float(stats[i])) for i, name in enumerate(METRIC_NAMES)}


def format_ap_table(rows: Sequence[tuple[str, dict[str, float]]]) -> str:
    """An aligned text table: one row per (name, metrics), AP x100 with one decimal.

    Columns ``AP AP50 AP75 APs APm APl``; a missing or NaN metric prints as ``-``.
    """
    name_width = max([len("model")] + [len(str(name)) for name, _ in rows])
    header = f"{'model':<{name_width}}" + "".join(f"{m:>7}" for m in METRIC_NAMES)
    lines = [header, "-" * len(header)]
    for name, metrics in rows:
        cells = []
        for metric in METRIC_NAMES:
            value = metrics.get(metric)
            cells.append(f"{'-':>7}" if value is None or math.isnan(value) else f"{100.0 * value:>7.1f}")
        lines.append(f"{str(name):<{name_width}}" + "".join(cells))
    return "\n".join(lines)
