"""Tiny worlds for the student-trainer tests: synthetic data, a gfl_tiny teacher, a store.

The store is written with `label_store` directly from a teacher forward over rendered
views (what precompute does), never through `teacher_service`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

CANVAS = (64, 64)
CLASSES = ("square", "disc")
TEACHER_FPN = 24
STUDENT_FPN = 16


@dataclass
class World:
    root: Path
    annotations: Path
    images: Path
    val_annotations: Path
    val_images: Path
    teacher: Path
    store: Path
    store_fp32: Path


def _draw(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, list[tuple[int, list[float]]]]:
    pixels = (rng.integers(60, 120, size=(1, 1, 3)) + rng.integers(0, 20, size=(height, width, 3))).astype(np.uint8)
    objects = []
    for _ in range(int(rng.integers(1, 3))):
        label = int(rng.integers(0, 2))
        size = int(rng.integers(12, max(13, min(height, width) // 2)))
        x, y = int(rng.integers(0, width - size)), int(rng.integers(0, height - size))
        colour = np.array([220, 40, 40] if label == 0 else [40, 40, 220], dtype=np.uint8)
        if label == 0:
            pixels[y : y + size, x : x + size] = colour
        else:
            yy, xx = np.mgrid[0:size, 0:size]
            inside = (yy - size / 2 + 0.5) ** 2 + (xx - size / 2 + 0.5) ** 2 <= (size / 2) ** 2
            pixels[y : y + size, x : x + size][inside] = colour
        objects.append((label, [float(x), float(y), float(size), float(size)]))
    return pixels, objects


def write_coco(folder: Path, num_images: int, seed: int, classes: Sequence[str] = CLASSES) -> Path:
    """PNG images 48-96 px a side with squares and discs, and their COCO annotation file."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(num_images):
        height, width = int(rng.integers(48, 97)), int(rng.integers(48, 97))
        pixels, objects = _draw(rng, height, width)
        name = f"{index:04d}.png"
        Image.fromarray(pixels).save(folder / name)
        image_id = index + 1
        images.append({"id": image_id, "file_name": name, "height": height, "width": width})
        for label, bbox in objects:
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image_id, "category_id": label + 1, "bbox": bbox,
                 "area": bbox[2] * bbox[3], "iscrowd": 0}
            )
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(classes)]
    path = folder.parent / f"{folder.name}.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def make_teacher(path: Path, classes: Sequence[str] = CLASSES, canvas=CANVAS, seed: int = 0, fpn: int = TEACHER_FPN) -> Path:
    from detcore.checkpoint import save_checkpoint
    from detcore.models.gfl import build_detector

    torch.manual_seed(seed)
    teacher = build_detector("gfl_tiny", len(classes), fpn_channels=fpn, head_channels=fpn)
    save_checkpoint(path, teacher, classes=list(classes), canvas_hw=canvas)
    return path


def write_store(
    url: Path,
    teacher_path: Path,
    annotations: Path,
    images: Path,
    *,
    codecs: dict[str, str] | None = None,
    canvas=None,
    groups=("cls", "box", "fpn", "backbone"),
    image_ids: Sequence[int] | None = None,
    fingerprint_overrides: dict | None = None,
    flip: bool = True,
    orient: bool = True,
    region=None,
) -> Path:
    """Teacher forward over {original, flip} views of every image (original only without ``flip``) -> a committed store.

    ``orient=False`` plans every view on ``canvas`` as stores of schema 1 did (one canvas).
    ``region``: a `label_store.StoreRegion`; each view's mask is `detcore.assign.stored_region` of its GT."""
    from detcore.checkpoint import load_detector_with_meta, teacher_fingerprint
    from detcore.coco import CocoDataset
    from detcore.views import content_hash, plan_views, render
    from label_store import TeacherFingerprint, create_store, default_target_specs, fit_target_bases

    teacher, meta = load_detector_with_meta(teacher_path)
    canvas = tuple(canvas or meta["canvas_hw"])
    coco = CocoDataset(annotations, images)
    fp = dict(teacher_fingerprint(teacher_path))
    fp["canvas_hw"] = list(canvas)
    fp.update(fingerprint_overrides or {})
    fingerprint = TeacherFingerprint.from_dict(fp)
    config = teacher.config
    specs = default_target_specs(
        config.num_classes, config.reg_max, canvas, list(config.strides), config.fpn_channels,
        backbone_channels=list(teacher.backbone.out_channels), groups=groups, codecs=codecs,
    )
    ids = list(image_ids) if image_ids is not None else coco.image_ids
    views = plan_views([(i, coco.record(i).height, coco.record(i).width) for i in ids], canvas_hw=canvas, flip=flip, orient=orient)
    pixels = {i: coco.load(i) for i in ids}
    rendered = [render(pixels[view.image_id], view) for view in views]
    with torch.no_grad():
        targets = [{k: v[0].numpy() for k, v in teacher(item.image[None], with_backbone=True).to_targets(groups).items()} for item in rendered]
    # Transform codecs (pca-std<k>) get their bases from the first views on the store's canvas.
    specs = fit_target_bases(specs, [t for t, view in zip(targets, views) if (view.canvas_h, view.canvas_w) == canvas][:4])
    store = create_store(str(url), fingerprint, specs, canvases=None if orient else [canvas], region=region)
    part = store.open_part("part-0")
    for view, item, outputs in zip(views, rendered, targets):
        part.append(
            {"image_id": view.image_id, "view_id": view.view_id, "view": view.to_json(),
             "content_hash": content_hash(pixels[view.image_id]), "valid_region": list(item.valid_region)},
            {spec.name: outputs[spec.name] for spec in specs},
            region=None if region is None else _view_region(coco, view, list(config.strides), region),
        )
    part.commit()
    return url


def _view_region(coco, view, strides, region):
    from detcore.assign import stored_region
    from detcore.views import image_to_view_boxes

    boxes = image_to_view_boxes(coco.targets(view.image_id).gt_boxes, view)
    return stored_region(
        boxes, (view.canvas_h, view.canvas_w), strides, topk=region.topk, vlr_alpha=region.vlr_alpha,
        vlr_diou=region.vlr_diou, point_offset=region.point_offset,
    ).numpy()


def build_world(root: Path, num_train: int = 4, num_val: int = 2) -> World:
    annotations = write_coco(root / "train", num_train, seed=1)
    val_annotations = write_coco(root / "val", num_val, seed=2)
    teacher = make_teacher(root / "teacher.pt")
    store = write_store(root / "store.zarr", teacher, annotations, root / "train")
    fp32 = {g: "fp32" for g in ("cls", "box", "fpn", "backbone")}
    store_fp32 = write_store(root / "store_fp32.zarr", teacher, annotations, root / "train", codecs=fp32)
    return World(root, annotations, root / "train", val_annotations, root / "val", teacher, store, store_fp32)


def run_config(world: World, out: Path, *, losses: str = "ld", source: str = "store", store: Path | None = None, **extra):
    """A tiny run config: 2-image batches, a few steps, no DataLoader workers."""
    from student_trainer.config import build_run_config

    overrides = {
        "store": str(world.store if store is None else store), "annotations": str(world.annotations), "images": str(world.images),
        "student": "gfl_tiny", "out": str(out), "losses": losses, "source": source, "iters": 3, "batch_size": 2,
        "num_workers": 0, "seed": 0, "lr": 1e-3, "device": "cpu", "log_every": 1, "checkpoint_every": 2,
        "threads": 1,
    }
    overrides.update(extra)
    sets = [f"student.fpn_channels={STUDENT_FPN}", f"student.head_channels={STUDENT_FPN}", "schedule.tensorboard=true"]
    return build_run_config(None, overrides, sets)
