"""Stores with the teacher's edge distances (``edges``) and without its distributions (``box``)."""

import pytest
import torch

from student_fixtures import run_config, write_store


@pytest.fixture(scope="module")
def stores(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("edges")
    fp32 = {g: "fp32" for g in ("cls", "box", "edges", "fpn")}
    edges = write_store(root / "edges.zarr", world.teacher, world.annotations, world.images,
                        groups=("cls", "edges", "fpn"), codecs=fp32)
    box = write_store(root / "box.zarr", world.teacher, world.annotations, world.images,
                      groups=("cls", "box", "fpn"), codecs=fp32)
    return edges, box


def _losses(world, store, losses):
    from detcore.coco import CocoDataset
    from detcore.models.gfl import build_detector
    from student_trainer.config import LossConfig, parse_losses
    from student_trainer.data import StoreViewDataset, collate_train
    from student_trainer.distill import DistillationModel, needed_target_names
    from student_trainer.sources import StoreSource

    torch.manual_seed(0)
    student = build_detector("gfl_tiny", 2, fpn_channels=16, head_channels=16)
    config = LossConfig(enabled=parse_losses(losses))
    available = {spec.group for spec in StoreSource(str(store), []).specs}
    names = needed_target_names(config, student.strides, available)
    source = StoreSource(str(store), names)
    model = DistillationModel(student, config, (64, 64), {s.name: s.shape[0] for s in source.specs})
    views = [v for v, _ in source.stored_views()]
    dataset = StoreViewDataset(CocoDataset(world.annotations, world.images), views, target_reader=source.worker_reader())
    batch = collate_train([dataset[i] for i in range(4)])
    with torch.no_grad():
        terms, _ = model(batch["images"], batch["gt_boxes"], batch["gt_labels"], source.complete(batch))
    return names, {k: float(v) for k, v in terms.items()}


def test_bcd_reads_edges_when_the_store_has_no_box(world, stores):
    edges, box = stores
    names, from_edges = _losses(world, edges, "bcd")
    assert "edges/p3" in names and not any(n.startswith("box/") for n in names)
    box_names, from_box = _losses(world, box, "bcd")
    assert "box/p3" in box_names and not any(n.startswith("edges/") for n in box_names)
    assert from_edges["bcd_iou"] > 0
    assert from_edges["bcd_iou"] == pytest.approx(from_box["bcd_iou"], rel=1e-5)
    assert from_edges["bcd_cls"] == from_box["bcd_cls"]


def test_stored_edges_are_the_teachers_edge_distances(world, stores):
    from detcore.checkpoint import load_detector
    from detcore.coco import CocoDataset
    from detcore.views import View, render
    from label_store import open_store

    edges, _ = stores
    reader = open_store(str(edges))
    assert [s.name for s in reader.targets if s.group == "edges"] == [f"edges/p{i}" for i in range(3, 8)]
    image_id, view_id = reader.keys()[0]
    record = reader.record(image_id, view_id)
    view = View.from_json(record["view"])
    pixels = CocoDataset(world.annotations, world.images).load(image_id)
    with torch.no_grad():
        outputs = load_detector(world.teacher)(render(pixels, view).image[None])
    stored = reader.read(image_id, view_id)
    for name, level in zip(outputs.level_names, outputs.edge_distances()):
        torch.testing.assert_close(torch.from_numpy(stored[f"edges/{name}"]), level[0], rtol=1e-4, atol=1e-4)


def test_ld_against_a_store_without_box_exits_2_naming_the_group(world, stores, tmp_path, capsys):
    from student_trainer.cli import run_config as run_cli_config
    from student_trainer.data import StoreFitError
    from student_trainer.train import train_student

    edges, _ = stores
    with pytest.raises(StoreFitError, match=r"missing target group\(s\) \['box'\] of the teacher 'gfl_tiny'"):
        train_student(run_config(world, tmp_path / "a", store=str(edges), losses="ld"), progress=False)
    assert run_cli_config(run_config(world, tmp_path / "b", store=str(edges), losses="ld"), progress=False) == 2
    assert "['box']" in capsys.readouterr().err


def test_training_with_bcd_and_fgd_on_an_edges_store(world, stores, tmp_path):
    from student_trainer.train import train_student

    edges, _ = stores
    summary = train_student(run_config(world, tmp_path / "run", store=str(edges), losses="bcd,fgd"), progress=False)
    assert (tmp_path / "run" / "final.pt").is_file()
    assert summary is not None
