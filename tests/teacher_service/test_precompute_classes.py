"""Precompute maps the teacher's classes to the dataset's categories by name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from detcore.checkpoint import save_checkpoint
from detcore.coco import CocoDataset
from detcore.models.gfl import build_detector
from detcore.views import plan_views, render_array
from teacher_service.precompute import PrecomputeConfig, PrecomputeInputError, run_precompute

CANVAS = (64, 64)
DATASET_CLASSES = ("disc", "square")
# The dataset's categories in another order and spelling, plus one the dataset lacks.
TEACHER_CLASSES = ("Square", "triangle", "DISC")
IMAGE_SIZES = [(48, 64), (64, 48), (40, 40)]


def _write_dataset(root: Path) -> tuple[Path, Path]:
    from PIL import Image

    images_dir = root / "images"
    images_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for index, (h, w) in enumerate(IMAGE_SIZES):
        image_id = 10 + index
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(images_dir / f"{image_id}.png")
        images.append({"id": image_id, "file_name": f"{image_id}.png", "height": h, "width": w})
        annotations.append({"id": index + 1, "image_id": image_id, "category_id": 1 + index % 2, "bbox": [2.0, 3.0, w / 2, h / 3],
                            "area": w * h / 6, "iscrowd": 0})
    categories = [{"id": 1, "name": DATASET_CLASSES[0]}, {"id": 2, "name": DATASET_CLASSES[1]}]
    path = root / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path, images_dir


def _write_teacher(path: Path, classes: tuple[str, ...]) -> Path:
    torch.manual_seed(0)
    model = build_detector("gfl_tiny", num_classes=len(classes))
    return save_checkpoint(path, model, classes=classes, canvas_hw=CANVAS)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("classes-data")
    annotations, images = _write_dataset(root)
    return {
        "root": root, "annotations": annotations, "images": images,
        "teacher": _write_teacher(root / "teacher.pt", TEACHER_CLASSES),
        "lacking": _write_teacher(root / "lacking.pt", ("disc", "circle")),
    }


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}})
    yield ray
    ray.shutdown()


def _config(data, store, teacher="teacher", **overrides) -> PrecomputeConfig:
    values = dict(
        annotations=str(data["annotations"]), images_dir=str(data["images"]), teacher=str(data[teacher]), store=str(store),
        target_groups=("cls", "fpn"), codecs=(("cls", "fp32"), ("fpn", "fp32")), flip=False,
        batch_size=3, views_per_part=4, cpus_per_actor=0.5, cpus_per_task=0.5, torch_threads=1, show_progress=False,
    )
    values.update(overrides)
    return PrecomputeConfig(**values)


def _cli(argv: list[str]) -> int:
    from distillery.cli import build_parser

    args = build_parser().parse_args(argv)
    return args.func(args)


def _teacher_cls(path: Path, pixels: np.ndarray) -> list[np.ndarray]:
    from detcore.checkpoint import load_detector

    model = load_detector(path, map_location="cpu").eval()
    with torch.no_grad():
        outputs = model(torch.from_numpy(pixels)[None])
    return [t[0].numpy() for t in outputs.cls_logits]


def test_store_holds_the_dataset_classes_in_the_dataset_order(data, local_ray, tmp_path, capsys):
    from label_store.reader import open_store

    store = tmp_path / "mapped.zarr"
    summary = run_precompute(_config(data, store))
    assert (summary.views_stored, summary.views_failed) == (3, 0)

    reader = open_store(str(store))
    fingerprint = reader.fingerprint
    assert fingerprint.classes == DATASET_CLASSES
    assert fingerprint.class_mapping["teacher_classes"] == list(TEACHER_CLASSES)
    assert fingerprint.class_mapping["teacher_index"] == [2, 0]
    assert fingerprint.class_mapping["dropped_teacher_classes"] == ["triangle"]
    assert fingerprint.class_mask == (True, True)
    assert {spec.name: spec.shape[0] for spec in reader.targets if spec.group == "cls"} == {f"cls/p{i}": 2 for i in range(3, 8)}

    dataset = CocoDataset(data["annotations"], data["images"])
    for view in plan_views([(i, dataset.record(i).height, dataset.record(i).width) for i in dataset.image_ids], canvas_hw=CANVAS, flip=False):
        teacher = _teacher_cls(data["teacher"], render_array(dataset.load(view.image_id), view))
        stored = reader.read(*view.key)
        for level, logits in enumerate(teacher):
            np.testing.assert_allclose(stored[f"cls/p{level + 3}"], logits[[2, 0]], rtol=1e-5, atol=1e-6)

    assert _cli(["store", "inspect", str(store)]) == 0
    out = capsys.readouterr().out
    assert "2 dataset categories from the teacher's 3 classes" in out
    assert "dropped     triangle" in out
    assert "DISC -> disc" in out

    # distill serve with the store's annotations serves the store's classes: same fingerprint, same digest.
    from label_store.wire import fingerprint_digest
    from teacher_service.api.settings import ServeSettings
    from teacher_service.app import load_teacher

    settings = ServeSettings(teacher=data["teacher"], auth_disabled=True, device="cpu", canvas_hw=CANVAS, annotations=data["annotations"])
    online = load_teacher(settings)
    assert online.fingerprint == fingerprint.to_dict()
    assert online.digest == fingerprint_digest(fingerprint.to_dict())
    assert [spec.shape for spec in online.specs if spec.name.startswith("cls/")][0][0] == 2


def test_missing_dataset_class_exits_2_naming_it(data, tmp_path, capsys):
    with pytest.raises(PrecomputeInputError, match=r"\['square'\]"):
        run_precompute(_config(data, tmp_path / "s.zarr", teacher="lacking"))
    argv = ["precompute", "--annotations", str(data["annotations"]), "--images", str(data["images"]),
            "--teacher", str(data["lacking"]), "--store", str(tmp_path / "s.zarr"), "--targets", "cls"]
    assert _cli(argv) == 2
    assert "['square']" in capsys.readouterr().err
    class_map = tmp_path / "map.json"
    class_map.write_text(json.dumps({"circle": "squares"}))
    assert _cli([*argv, "--class-map", str(class_map)]) == 2
    assert "'squares', which is not a dataset category" in capsys.readouterr().err
    class_map.write_text("[]")
    assert _cli([*argv, "--class-map", str(class_map)]) == 2
    assert "--class-map expects a JSON object" in capsys.readouterr().err

    # distill serve refuses the same mapping before it starts serving.
    serve = ["serve", "--teacher", str(data["lacking"]), "--no-auth", "--device", "cpu"]
    assert _cli([*serve, "--annotations", str(data["annotations"])]) == 2
    assert "['square']" in capsys.readouterr().err
    assert _cli([*serve, "--allow-missing-classes"]) == 2
    assert "pass --annotations FILE" in capsys.readouterr().err


def test_missing_dataset_class_allowed_and_renamed(data, local_ray, tmp_path):
    from label_store.reader import open_store

    allowed = tmp_path / "allowed.zarr"
    run_precompute(_config(data, allowed, teacher="lacking", allow_missing_classes=True, image_ids=(10,)))
    fingerprint = open_store(str(allowed)).fingerprint
    assert fingerprint.class_mask == (True, False)
    assert fingerprint.class_mapping["missing_dataset_classes"] == ["square"]
    assert fingerprint.class_mapping["dropped_teacher_classes"] == ["circle"]

    renamed = tmp_path / "renamed.zarr"
    run_precompute(_config(data, renamed, teacher="lacking", class_map=(("circle", "square"),), image_ids=(10,)))
    fingerprint = open_store(str(renamed)).fingerprint
    assert fingerprint.class_mask == (True, True)
    assert fingerprint.class_mapping["teacher_index"] == [0, 1]
    assert fingerprint.class_mapping["class_map"] == {"circle": "square"}
