"""Shared data of the precompute tests: a tiny dataset (8 images of 30-64 px, canvas 64), a random
gfl_tiny teacher, a config builder, the local Ray instance of a test module and one fp32 store.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from detcore.checkpoint import save_checkpoint
from detcore.coco import CocoDataset
from detcore.models.gfl import build_detector
from detcore.views import View
from teacher_service.precompute import PrecomputeConfig, run_precompute

CANVAS = (64, 64)
CLASSES = ("disc", "square")
IMAGE_SIZES = [(48, 64), (64, 48), (40, 40), (64, 64), (50, 70), (30, 60), (64, 32), (56, 56)]
FP32_CODECS = (("cls", "fp32"), ("box", "fp32"), ("fpn", "fp32"), ("backbone", "fp32"))
FP32_CODECS_NO_BACKBONE = FP32_CODECS[:3]


def _write_dataset(root: Path, sizes=IMAGE_SIZES) -> tuple[Path, Path]:
    from PIL import Image

    images_dir = root / "images"
    images_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for index, (h, w) in enumerate(sizes):
        image_id = 10 + index
        pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        name = f"{image_id:04d}.png"
        Image.fromarray(pixels).save(images_dir / name)
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
        annotations.append(
            {"id": index + 1, "image_id": image_id, "category_id": 1 + 2 * (index % 2),
             "bbox": [2.0, 3.0, w / 2, h / 3], "area": w * h / 6, "iscrowd": 0}
        )
    categories = [{"id": 1, "name": CLASSES[0]}, {"id": 3, "name": CLASSES[1]}]
    annotations_path = root / "annotations.json"
    annotations_path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return annotations_path, images_dir


def _write_teacher(path: Path, seed: int = 0, canvas_hw=CANVAS) -> Path:
    torch.manual_seed(seed)
    model = build_detector("gfl_tiny", num_classes=len(CLASSES))
    return save_checkpoint(path, model, classes=CLASSES, canvas_hw=canvas_hw)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("precompute-data")
    annotations, images = _write_dataset(root)
    teacher = _write_teacher(root / "teacher.pt")
    return {"root": root, "annotations": annotations, "images": images, "teacher": teacher}


@pytest.fixture(scope="module")
def teacher_model(data):
    from detcore.checkpoint import load_detector

    model = load_detector(data["teacher"], map_location="cpu")
    return model.eval()


def _config(data, store, **overrides) -> PrecomputeConfig:
    values = dict(
        annotations=str(data["annotations"]), images_dir=str(data["images"]), teacher=str(data["teacher"]),
        store=str(store), batch_size=3, views_per_part=4, cpus_per_actor=0.5, cpus_per_task=0.5,
        torch_threads=1, show_progress=False,
    )
    values.update(overrides)
    return PrecomputeConfig(**values)


def _direct_targets(model, pixels_chw: np.ndarray, with_backbone: bool) -> dict[str, np.ndarray]:
    with torch.inference_mode():
        out = model(torch.from_numpy(pixels_chw)[None], with_backbone=with_backbone)
    return {name: t[0].numpy() for name, t in out.to_targets(("cls", "box", "fpn") + (("backbone",) if with_backbone else ())).items()}


def _decode_batch(dataset: CocoDataset, views: list[View]) -> dict[str, np.ndarray]:
    return {
        "image_id": np.asarray([v.image_id for v in views]),
        "view_id": np.asarray([v.view_id for v in views]),
        "view": np.asarray(views, dtype=object),
        "path": np.asarray([str(dataset.image_path(v.image_id)) for v in views], dtype=object),
    }


def _cli(argv: list[str]) -> int:
    from teacher_service.cli import register

    parser = argparse.ArgumentParser(prog="distill")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def ray_cluster_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ray")


@pytest.fixture()
def local_ray(ray_cluster_dir):
    """One local 2-CPU Ray instance for the module (restarted if a test shut it down)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}})
    yield ray


@pytest.fixture(scope="module", autouse=True)
def _shutdown_ray_after_module():
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _store_contents(url: str) -> dict[tuple[int, int], tuple[dict, dict[str, np.ndarray]]]:
    from label_store.reader import open_store

    reader = open_store(url)
    out = {}
    for key in sorted(reader.keys()):
        record = reader.record(*key)
        out[key] = (record, reader.read(*key))
    return out


def _committed_rows(url: str) -> list[tuple[int, int]]:
    """Every committed manifest row's key, duplicates included (readers hide them), to check exactly-once."""
    from label_store._fs import Location
    from label_store._manifest import load_parts

    rows = []
    for entry in load_parts(Location(url)):
        rows += zip(entry.table.column("image_id").to_pylist(), entry.table.column("view_id").to_pylist())
    return rows


def _failures(url: str) -> list[dict]:
    from label_store.reader import open_store
    from label_store.writer import create_store

    reader = open_store(url)
    return create_store(url, reader.fingerprint, reader.targets).failures()


@pytest.fixture(scope="module")
def fp32_store(data, ray_cluster_dir, tmp_path_factory):
    """One complete fp32 store of all views (with backbone targets), the reference for several tests."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}})
    store = tmp_path_factory.mktemp("stores") / "fp32.zarr"
    summary = run_precompute(_config(data, store, codecs=FP32_CODECS, target_groups=("cls", "box", "fpn", "backbone")))
    return store, summary


def dataclasses_replace(config: PrecomputeConfig, **changes) -> PrecomputeConfig:
    import dataclasses

    return dataclasses.replace(config, **changes)


def _store_codecs(store) -> dict[str, str]:
    from label_store.reader import open_store

    return {spec.name: spec.codec for spec in open_store(str(store)).targets}
