"""Imported teachers end to end on the CPU: `distill teacher import` -> precompute -> train, serve, in-process.

The dataset is `distill data synth` (3 train images, 12 classes). The teachers are random-weight
files as users bring them: an mmdetection GFL checkpoint in the ResNet-50 key layout (bottleneck
blocks 3-4-6-3, narrow widths so the test stays fast) whose classes are the dataset's in reverse
order, one renamed in capitals with spaces, plus one class the dataset lacks; and the state_dict
of torchvision's full-width ``fcos_resnet50_fpn`` with the same 13 names in a --class-names file.
Every command runs through `distillery.cli.main`, the precompute jobs on one local Ray cluster.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.usefixtures("one_torch_thread")]

CANVAS = (256, 256)
EXTRA_CLASS = "extra_thing"


def _cli(argv: list[str]) -> int:
    from distillery.cli import main

    return main(argv)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    sys.path.insert(0, str(Path(__file__).resolve().parent / "detcore"))
    try:
        from mmdet_layout import R50_TINY, mmdet_gfl_state, mmdet_v2_file
    finally:
        sys.path.pop(0)
    from torchvision.models.detection import fcos_resnet50_fpn

    root = tmp_path_factory.mktemp("imported-e2e")
    assert _cli(["data", "synth", "--out", str(root / "synth"), "--num-train", "3", "--num-val", "1", "--no-progress"]) == 0
    annotations = root / "synth" / "annotations" / "train.json"
    dataset_classes = [c["name"] for c in json.loads(annotations.read_text())["categories"]]
    teacher_classes = list(reversed(dataset_classes)) + [EXTRA_CLASS]
    teacher_classes[0] = teacher_classes[0].upper().replace("_", " ")  # matched case- and '_'/space-insensitively

    torch.save(mmdet_v2_file(mmdet_gfl_state(R50_TINY, num_classes=len(teacher_classes), seed=3), teacher_classes), root / "gfl.pth")
    torch.manual_seed(0)
    fcos = fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=len(teacher_classes))
    torch.save(fcos.state_dict(), root / "fcos.pth")
    del fcos
    names = root / "names.txt"
    names.write_text("\n".join(teacher_classes) + "\n")

    assert _cli(["teacher", "import", "--format", "mmdet-gfl", "--checkpoint", str(root / "gfl.pth"), "--out", str(root / "gfl.pt")]) == 0
    assert _cli(["teacher", "import", "--format", "torchvision-fcos", "--checkpoint", str(root / "fcos.pth"),
                 "--class-names", str(names), "--out", str(root / "fcos.pt")]) == 0
    return {
        "root": root, "annotations": annotations, "images": root / "synth" / "train",
        "dataset_classes": dataset_classes, "teacher_classes": teacher_classes,
        "gfl": root / "gfl.pt", "fcos": root / "fcos.pt",
    }


@pytest.fixture(scope="module")
def local_ray():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}})
    yield ray
    ray.shutdown()


def _precompute(world, teacher: str, store: Path, targets: str, *extra: str) -> int:
    return _cli([
        "precompute", "--annotations", str(world["annotations"]), "--images", str(world["images"]),
        "--teacher", str(world[teacher]), "--store", str(store), "--canvas", "x".join(map(str, CANVAS)),
        "--targets", targets, "--no-flip", "--batch-size", "3", "--views-per-part", "3",
        "--cpus-per-actor", "0.5", "--cpus-per-task", "0.5", "--torch-threads", "1", "--no-progress", *extra,
    ])


def _train(world, out: Path, losses: str, *extra: str) -> int:
    return _cli([
        "train", "--annotations", str(world["annotations"]), "--images", str(world["images"]),
        "--losses", losses, "--iters", "2", "--batch-size", "2", "--num-workers", "0", "--device", "cpu",
        "--threads", "1", "--log-every", "1", "--no-progress", "--out", str(out), *extra,
    ])


def _finished_steps(out: Path) -> int:
    assert (out / "final.pt").is_file()
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [row["loss"] for row in steps if "loss" in row]
    assert losses and all(np.isfinite(losses)), steps
    return max(row.get("step", 0) for row in steps)


def _teacher_cls(path: Path, pixels_chw: np.ndarray) -> list[np.ndarray]:
    from detcore.checkpoint import load_detector

    model = load_detector(path, map_location="cpu").eval()
    with torch.inference_mode():
        outputs = model(torch.from_numpy(pixels_chw)[None])
    return [t[0].numpy() for t in outputs.cls_logits]


def _first_views(world, count: int):
    from detcore.coco import CocoDataset
    from detcore.views import plan_views

    dataset = CocoDataset(world["annotations"], world["images"])
    sizes = [(i, dataset.record(i).height, dataset.record(i).width) for i in dataset.image_ids]
    return dataset, plan_views(sizes, canvas_hw=CANVAS, flip=False)[:count]


def test_mmdet_gfl_teacher_precompute_and_train_ld_bcd_fgd(world, local_ray, tmp_path, capsys):
    from detcore.views import render_array
    from label_store.reader import open_store

    store = tmp_path / "gfl.zarr"
    assert _precompute(world, "gfl", store, "cls,box,edges,fpn", "--codec", "cls=fp32") == 0

    reader = open_store(str(store))
    classes = world["dataset_classes"]
    assert reader.fingerprint.classes == tuple(classes)
    mapping = reader.fingerprint.class_mapping
    teacher_index = [len(classes) - 1 - j for j in range(len(classes))]  # reversed; the extra class is last
    assert mapping["teacher_index"] == teacher_index
    assert mapping["dropped_teacher_classes"] == [EXTRA_CLASS]
    groups = {spec.name.split("/")[0] for spec in reader.targets}
    assert groups == {"cls", "box", "edges", "fpn"}
    shapes = {spec.name: spec.shape for spec in reader.targets}
    assert shapes["cls/p3"] == (len(classes), 32, 32) and shapes["edges/p3"] == (4, 32, 32) and shapes["box/p3"][0] == 4 * 8

    # One view: the stored cls targets are the teacher's channels in the dataset's order.
    dataset, (view,) = _first_views(world, 1)
    teacher = _teacher_cls(world["gfl"], render_array(dataset.load(view.image_id), view))
    stored = reader.read(*view.key)
    for level, logits in enumerate(teacher):
        assert logits.shape[0] == len(classes) + 1
        np.testing.assert_allclose(stored[f"cls/p{level + 3}"], logits[teacher_index], rtol=1e-5, atol=1e-5)

    assert _cli(["store", "inspect", str(store)]) == 0
    out = capsys.readouterr().out
    assert f"dropped     {EXTRA_CLASS}" in out
    assert f"{world['teacher_classes'][0]} -> {classes[-1]}" in out

    # The imported GFL has reg_max 7 (mmdetection's default); LD needs the student's to match, and says how.
    assert _train(world, tmp_path / "r16", "ld", "--store", str(store)) == 2
    assert "reg_max: store has 7, the student has 16 (--set student.reg_max=7)" in capsys.readouterr().err
    run = tmp_path / "run"
    assert _train(world, run, "ld,bcd,fgd", "--store", str(store), "--set", "student.reg_max=7") == 0
    assert _finished_steps(run) == 2
    metrics = (run / "metrics.jsonl").read_text()
    for term in ("ld_main", "bcd_cls", "bcd_iou", "fgd"):
        assert f'"{term}"' in metrics, term


def test_torchvision_fcos_teacher_precompute_and_train_bcd_fgd_but_not_ld(world, local_ray, tmp_path, capsys):
    from label_store.reader import open_store

    # No edge distributions: asking for `box` is refused before any work.
    assert _precompute(world, "fcos", tmp_path / "box.zarr", "box") == 2
    err = capsys.readouterr().err
    assert "--targets" in err and "['box']" in err and "torchvision-fcos" in err
    assert not (tmp_path / "box.zarr").exists()

    store = tmp_path / "fcos.zarr"
    assert _precompute(world, "fcos", store, "cls,edges,fpn") == 0
    reader = open_store(str(store))
    assert reader.fingerprint.classes == tuple(world["dataset_classes"])
    assert {spec.name.split("/")[0] for spec in reader.targets} == {"cls", "edges", "fpn"}
    assert {spec.name: spec.shape for spec in reader.targets}["fpn/p3"] == (256, 32, 32)

    run = tmp_path / "run"
    assert _train(world, run, "bcd,fgd", "--store", str(store)) == 0
    assert _finished_steps(run) == 2
    assert '"bcd_iou"' in (run / "metrics.jsonl").read_text()  # BCD's localization term from `edges`

    capsys.readouterr()
    assert _train(world, tmp_path / "ld", "ld", "--store", str(store)) == 2
    err = capsys.readouterr().err
    assert "missing target group(s) ['box']" in err and "torchvision_fcos" in err
    assert not (tmp_path / "ld" / "final.pt").exists()


def test_serve_answers_targets_for_an_imported_teacher(world):
    """The torchvision FCOS teacher behind `distill serve`: dataset-ordered cls, and `edges` (it has no distributions)."""
    import httpx

    from detcore.views import render_array
    from label_store.wire import unpack_targets
    from teacher_service.api.testing import ServerProcess, encode_image, targets_request

    dataset, views = _first_views(world, 2)
    classes = world["dataset_classes"]
    options = ["--annotations", str(world["annotations"]), "--canvas", "x".join(map(str, CANVAS)),
               "--torch-threads", "1", "--max-batch", "2", "--codec", "cls=fp32"]
    with ServerProcess(world["fcos"], options=options, log_path=world["root"] / "serve.log") as server:
        images = [encode_image(dataset.load(v.image_id)) for v in views]
        data, files = targets_request(views, images, targets="cls,edges")
        with httpx.Client(base_url=server.url, headers=server.headers, timeout=120) as client:
            response = client.post("/v1/targets", data=data, files=files)
        assert response.status_code == 200, response.text + server.log()
        assert server.alive(), server.log()
    fingerprint, specs, entries = unpack_targets(response.content)
    assert fingerprint["classes"] == classes
    assert {spec.name.split("/")[0] for spec in specs} == {"cls", "edges"}
    assert [(e["image_id"], e["view_id"]) for e in entries] == [v.key for v in views]
    teacher_index = [len(classes) - 1 - j for j in range(len(classes))]
    for entry, view in zip(entries, views):
        teacher = _teacher_cls(world["fcos"], render_array(dataset.load(view.image_id), view))
        for level, logits in enumerate(teacher):
            np.testing.assert_allclose(entry["targets"][f"cls/p{level + 3}"], logits[teacher_index], rtol=1e-4, atol=1e-4)
        assert entry["targets"]["edges/p3"].shape == (4, 32, 32)


def test_inprocess_source_trains_with_an_imported_teacher(world, tmp_path):
    """The GFL teacher imported at the default 800x1333 canvas runs in-process on the run's 256x256 canvas."""
    run = tmp_path / "run"
    assert _train(world, run, "ld,bcd,fgd", "--source", "inprocess", "--teacher", str(world["gfl"]),
                  "--canvas", "x".join(map(str, CANVAS)), "--set", "student.reg_max=7") == 0
    assert _finished_steps(run) == 2
    assert json.loads((run / "run_config.json").read_text())["source"]["kind"] == "inprocess"
    metrics = (run / "metrics.jsonl").read_text()
    for term in ("ld_main", "bcd_cls", "fgd"):
        assert f'"{term}"' in metrics, term
