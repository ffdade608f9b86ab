"""COCO-format detection data: any annotation file plus an image folder.

Legend: M GT boxes of one image, I crowd (ignore) regions of one image, K classes.
Boxes are ``(x1, y1, x2, y2)`` float32 in source-image pixels (the displayed, EXIF-
oriented image), the frame COCO's ``bbox = [x, y, w, h]`` is drawn in.

Label contract: COCO category ids, sorted ascending, map to contiguous labels 0..K-1
(COCO's 80 ids out of 1..90 map to 0..79); ``classes[label]`` is the category name and
``cat_ids[label]`` the category id. Crowd annotations (``iscrowd=1``) are not targets:
they become ignore regions. Images without annotations are kept as negatives.

Repair policy (``repair=True``, the default). Every repair is logged with
``logging.getLogger("detcore.coco").warning`` and appended, in words, to
``CocoDataset.repairs``; the repaired annotations are also what ``CocoDataset.coco``
holds, so evaluation sees the same ground truth as training.

- box with zero or negative width or height: dropped;
- box partly outside its image: clipped to the image;
- box entirely outside its image: dropped;
- annotation whose ``image_id`` is not in ``images``: dropped;
- annotation without ``area``: ``area`` set to the (clipped) box's ``w * h`` (one summary
  line for all of them, since many converters leave it out).

With ``repair=False`` each of these raises `AnnotationError` instead, naming the
annotation id and image id. Always an error, in both modes: an unknown category id; a
missing required key (``images``/``annotations``/``categories`` at top level, ``id``,
``file_name``, ``height``, ``width`` per image, ``id``, ``image_id``, ``category_id``,
``bbox`` per annotation, ``id``, ``name`` per category); a malformed or non-finite bbox;
duplicate image, annotation or category ids; an image with a non-positive size; a file
that is missing or not JSON.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from detcore.images import ImageDecodeError, load_image

logger = logging.getLogger("detcore.coco")

_IMAGE_KEYS = ("id", "file_name", "height", "width")
_ANNOTATION_KEYS = ("id", "image_id", "category_id", "bbox")
_CATEGORY_KEYS = ("id", "name")


class AnnotationError(ValueError):
    """An annotation file that cannot be used as it is (it names the annotation, image and key)."""


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """One entry of the annotation file's ``images`` list."""

    image_id: int
    """COCO image id."""
    file_name: str
    """Path of the image relative to the image folder."""
    height: int
    """Displayed (EXIF-oriented) height in pixels, as the annotation file states it."""
    width: int
    """Displayed (EXIF-oriented) width in pixels, as the annotation file states it."""


@dataclass(frozen=True, slots=True)
class ImageTargets:
    """Ground truth of one image after the repairs described in the module docstring."""

    gt_boxes: np.ndarray
    """float32 ``[M, 4]`` ``(x1, y1, x2, y2)`` in source-image pixels."""
    gt_labels: np.ndarray
    """int64 ``[M]`` contiguous labels in 0..K-1."""
    ignore_boxes: np.ndarray
    """float32 ``[I, 4]`` crowd regions ``(x1, y1, x2, y2)``; detections there are neither TP nor FP."""


def _require(entry: Any, keys: tuple[str, ...], what: str) -> None:
    if not isinstance(entry, dict):
        raise AnnotationError(f"CocoDataset expects each {what} to be a JSON object. Got {type(entry).__name__}: {entry!r}.")
    for key in keys:
        if key not in entry:
            ident = entry.get("id", "?")
            raise AnnotationError(f"CocoDataset expects key '{key}' in every {what}. Missing in {what} id={ident}.")


def _int(entry: dict[str, Any], key: str, what: str) -> int:
    value = entry[key]
    ok = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not ok:
        raise AnnotationError(
            f"CocoDataset expects an integer '{key}' in every {what}. Got {value!r} in {what} id={entry.get('id', '?')}."
        )
    return int(value)


def _silent():
    """pycocotools prints progress to stdout; keep it out of ours."""
    return contextlib.redirect_stdout(io.StringIO())


class CocoDataset:
    """A COCO detection annotation file and the folder its images live in.

    Args:
        annotations: the annotation JSON file.
        images_dir: the folder that ``file_name`` is relative to.
        repair: repair fixable annotation problems with a logged note (True) or raise
            `AnnotationError` on them (False); see the module docstring.

    Attributes:
        classes: category names by contiguous label (ordered by category id).
        cat_ids: COCO category id of each label.
        image_ids: all image ids, sorted; images without annotations are included.
        coco: the pycocotools ``COCO`` object over the repaired annotations.
        repairs: one line per repair made, in words.
    """

    def __init__(self, annotations: str | Path, images_dir: str | Path, *, repair: bool = True) -> None:
        from pycocotools.coco import COCO

        self.annotations_path = Path(annotations)
        self.images_dir = Path(images_dir)
        self.repair = bool(repair)
        self.repairs: list[str] = []

        data = self._read_json(self.annotations_path)
        for key in ("images", "annotations", "categories"):
            if key not in data:
                raise AnnotationError(
                    f"CocoDataset(annotations=) expects top-level key '{key}'. Missing in {self.annotations_path}."
                )
            if not isinstance(data[key], list):
                raise AnnotationError(
                    f"CocoDataset(annotations=) expects '{key}' to be a list. Got {type(data[key]).__name__} "
                    f"in {self.annotations_path}."
                )

        categories = self._parse_categories(data["categories"])
        self.cat_ids: tuple[int, ...] = tuple(sorted(categories))
        self.classes: tuple[str, ...] = tuple(str(categories[c]) for c in self.cat_ids)
        self._label_by_cat = {cat_id: label for label, cat_id in enumerate(self.cat_ids)}

        self._records = self._parse_images(data["images"])
        self.image_ids: list[int] = sorted(self._records)
        kept = self._parse_annotations(data["annotations"])

        repaired = dict(data)
        repaired["annotations"] = kept
        self.coco = COCO()
        self.coco.dataset = repaired
        with _silent():
            self.coco.createIndex()
        self._targets = self._build_targets(kept)

    # -- parsing -------------------------------------------------------------------------

    def _read_json(self, path: Path) -> dict[str, Any]:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as error:
            raise AnnotationError(f"CocoDataset(annotations=) expects a readable JSON file. Got {path}: {error}.") from error
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise AnnotationError(f"CocoDataset(annotations=) expects valid JSON. Got {path}: {error}.") from error
        if not isinstance(data, dict):
            raise AnnotationError(
                f"CocoDataset(annotations=) expects a JSON object at top level. Got {type(data).__name__} in {path}."
            )
        return data

    def _parse_categories(self, entries: list[Any]) -> dict[int, str]:
        categories: dict[int, str] = {}
        for entry in entries:
            _require(entry, _CATEGORY_KEYS, "category")
            cat_id = _int(entry, "id", "category")
            if cat_id in categories:
                raise AnnotationError(f"CocoDataset expects unique category ids. Got category id={cat_id} twice.")
            categories[cat_id] = str(entry["name"])
        if not categories:
            raise AnnotationError(f"CocoDataset expects at least one category. Got none in {self.annotations_path}.")
        return categories

    def _parse_images(self, entries: list[Any]) -> dict[int, ImageRecord]:
        records: dict[int, ImageRecord] = {}
        for entry in entries:
            _require(entry, _IMAGE_KEYS, "image")
            image_id = _int(entry, "id", "image")
            if image_id in records:
                raise AnnotationError(f"CocoDataset expects unique image ids. Got image id={image_id} twice.")
            height, width = _int(entry, "height", "image"), _int(entry, "width", "image")
            if height <= 0 or width <= 0:
                raise AnnotationError(
                    f"CocoDataset expects a positive image size. Got height={height} width={width} for image id={image_id}."
                )
            records[image_id] = ImageRecord(image_id, str(entry["file_name"]), height, width)
        return records

    def _problem(self, problem: str, action: str) -> None:
        """A repairable problem: log the repair and keep going, or raise in strict mode."""
        if not self.repair:
            raise AnnotationError(
                f"CocoDataset(repair=False) found {problem} in {self.annotations_path}. "
                f"Fix the file, or pass repair=True to have it {action} with a logged note."
            )
        message = f"{problem}; {action}"
        logger.warning("%s", message)
        self.repairs.append(message)

    def _parse_annotations(self, entries: list[Any]) -> list[dict[str, Any]]:
        kept: list[dict[str, Any]] = []
        seen: set[int] = set()
        missing_area = 0
        for entry in entries:
            _require(entry, _ANNOTATION_KEYS, "annotation")
            ann_id = _int(entry, "id", "annotation")
            image_id = _int(entry, "image_id", "annotation")
            cat_id = _int(entry, "category_id", "annotation")
            where = f"annotation id={ann_id} (image_id={image_id})"
            if ann_id in seen:
                raise AnnotationError(f"CocoDataset expects unique annotation ids. Got {where} twice.")
            seen.add(ann_id)
            if cat_id not in self._label_by_cat:
                raise AnnotationError(
                    f"CocoDataset expects category ids from 'categories' {list(self.cat_ids)}. "
                    f"Got category_id={cat_id} in {where}; add the category or remove the annotation."
                )
            bbox = entry["bbox"]
            if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
                raise AnnotationError(f"CocoDataset expects bbox [x, y, w, h]. Got {bbox!r} in {where}.")
            try:
                x, y, w, h = (float(v) for v in bbox)
            except (TypeError, ValueError) as error:
                raise AnnotationError(f"CocoDataset expects numeric bbox [x, y, w, h]. Got {bbox!r} in {where}.") from error
            if not all(math.isfinite(v) for v in (x, y, w, h)):
                raise AnnotationError(f"CocoDataset expects finite bbox values. Got {bbox!r} in {where}.")
            record = self._records.get(image_id)
            if record is None:
                self._problem(f"{where}: image_id is not in 'images'", "dropped")
                continue
            if w <= 0 or h <= 0:
                self._problem(f"{where}: bbox {bbox} has non-positive width or height", "dropped")
                continue
            x1, y1, x2, y2 = x, y, x + w, y + h
            if x1 >= record.width or y1 >= record.height or x2 <= 0 or y2 <= 0:
                self._problem(
                    f"{where}: bbox {bbox} lies entirely outside the {record.width}x{record.height} (WxH) image", "dropped"
                )
                continue
            cx1, cy1 = max(x1, 0.0), max(y1, 0.0)
            cx2, cy2 = min(x2, float(record.width)), min(y2, float(record.height))
            ann = dict(entry)
            if (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2):
                clipped = [cx1, cy1, cx2 - cx1, cy2 - cy1]
                self._problem(
                    f"{where}: bbox {bbox} extends outside the {record.width}x{record.height} (WxH) image",
                    f"clipped to {[round(v, 3) for v in clipped]}",
                )
                ann["bbox"] = clipped
            if "area" not in ann:
                missing_area += 1
                ann["area"] = (cx2 - cx1) * (cy2 - cy1)
            ann.setdefault("iscrowd", 0)
            kept.append(ann)
        if missing_area:
            self._problem(f"{missing_area} annotation(s) without 'area'", "set to the box's w*h")
        return kept

    def _build_targets(self, annotations: list[dict[str, Any]]) -> dict[int, ImageTargets]:
        boxes: dict[int, list[list[float]]] = {i: [] for i in self.image_ids}
        labels: dict[int, list[int]] = {i: [] for i in self.image_ids}
        ignore: dict[int, list[list[float]]] = {i: [] for i in self.image_ids}
        for ann in annotations:
            x, y, w, h = (float(v) for v in ann["bbox"])
            image_id = int(ann["image_id"])
            if ann.get("iscrowd", 0):
                ignore[image_id].append([x, y, x + w, y + h])
            else:
                boxes[image_id].append([x, y, x + w, y + h])
                labels[image_id].append(self._label_by_cat[int(ann["category_id"])])
        return {
            i: ImageTargets(
                gt_boxes=np.asarray(boxes[i], dtype=np.float32).reshape(-1, 4),
                gt_labels=np.asarray(labels[i], dtype=np.int64).reshape(-1),
                ignore_boxes=np.asarray(ignore[i], dtype=np.float32).reshape(-1, 4),
            )
            for i in self.image_ids
        }

    # -- access --------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def num_classes(self) -> int:
        """K, the number of categories."""
        return len(self.cat_ids)

    def record(self, image_id: int) -> ImageRecord:
        """The ``images`` entry of one image."""
        try:
            return self._records[int(image_id)]
        except KeyError:
            raise KeyError(f"CocoDataset.record(image_id=) expects an id from the annotation file. Got {image_id}.") from None

    def targets(self, image_id: int) -> ImageTargets:
        """GT boxes, contiguous labels and crowd regions of one image (empty arrays for negatives)."""
        try:
            return self._targets[int(image_id)]
        except KeyError:
            raise KeyError(f"CocoDataset.targets(image_id=) expects an id from the annotation file. Got {image_id}.") from None

    def image_path(self, image_id: int) -> Path:
        """``images_dir / file_name`` of one image."""
        return self.images_dir / self.record(image_id).file_name

    def load(self, image_id: int) -> np.ndarray:
        """Decode one image: uint8 ``[H, W, 3]`` RGB, EXIF-oriented.

        Raises:
            ImageDecodeError: the file cannot be decoded, or its decoded size differs
                from the ``height``/``width`` in the annotation file.
        """
        record = self.record(image_id)
        path = self.images_dir / record.file_name
        pixels = load_image(path, record.image_id)
        if pixels.shape[:2] != (record.height, record.width):
            raise ImageDecodeError(
                record.image_id,
                path,
                f"decoded size {pixels.shape[0]}x{pixels.shape[1]} (HxW, EXIF orientation applied) differs from "
                f"the annotation file's {record.height}x{record.width}; the file or its EXIF orientation changed "
                f"after annotation",
            )
        return pixels

    def label_of(self, cat_id: int) -> int:
        """Contiguous label of a COCO category id."""
        try:
            return self._label_by_cat[int(cat_id)]
        except KeyError:
            raise AnnotationError(
                f"CocoDataset.label_of(cat_id=) expects one of the category ids {list(self.cat_ids)}. Got {cat_id}."
            ) from None

    def __repr__(self) -> str:
        return (
            f"CocoDataset(annotations={str(self.annotations_path)!r}, images={len(self.image_ids)}, "
            f"classes={len(self.classes)}, repairs={len(self.repairs)})"
        )
