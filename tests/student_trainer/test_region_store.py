"""Training against a store that holds ``box`` and / or ``cls`` only where LD reads them (`label_store.StoreRegion`)."""

import pytest
import torch

from student_fixtures import run_config, write_store

GROUPS = ("cls", "box", "edges", "fpn")


@pytest.fixture(scope="module")
def stores(world, tmp_path_factory):
    from label_store import StoreRegion

    root = tmp_path_factory.mktemp("region")
    region = StoreRegion(("box",), topk=9, vlr_alpha=0.25)
    args = (world.teacher, world.annotations, world.images)
    return {
        "dense": write_store(root / "dense.zarr", *args, groups=GROUPS),
        "region": write_store(root / "region.zarr", *args, groups=GROUPS, region=region),
        "edges": write_store(root / "edges.zarr", *args, groups=("cls", "edges", "fpn")),
        "region_no_edges": write_store(root / "region_no_edges.zarr", *args, groups=("cls", "box", "fpn"), region=region),
        "cls_region": write_store(root / "cls_region.zarr", *args, groups=GROUPS, region=StoreRegion(("cls",), 9, 0.25)),
        "cls_box_region": write_store(root / "cls_box_region.zarr", *args, groups=GROUPS, region=StoreRegion(("cls", "box"), 9, 0.25)),
    }


def _terms(world, store, losses):
    """The distillation terms of one batch of 4 views, as the trainer computes them from ``store``."""
    from detcore.coco import CocoDataset
    from detcore.models.gfl import build_detector
    from label_store import open_store
    from student_trainer.config import LossConfig, parse_losses
    from student_trainer.data import StoreViewDataset, collate_train
    from student_trainer.distill import DistillationModel, needed_target_names
    from student_trainer.sources import StoreSource

    torch.manual_seed(0)
    student = build_detector("gfl_tiny", 2, fpn_channels=16, head_channels=16)
    config = LossConfig(enabled=parse_losses(losses))
    reader = open_store(str(store))
    region_groups = reader.region.groups if reader.region is not None else ()
    available = {spec.group for spec in reader.targets}
    names = needed_target_names(config, student.strides, available, region_groups)
    source = StoreSource(str(store), names)
    model = DistillationModel(
        student, config, (64, 64), {s.name: s.shape[0] for s in source.specs}, region_groups=region_groups
    )
    views = sorted((v for v, _ in source.stored_views()), key=lambda v: v.key)
    dataset = StoreViewDataset(CocoDataset(world.annotations, world.images), views, target_reader=source.worker_reader())
    batch = collate_train([dataset[i] for i in range(4)])
    with torch.no_grad():
        terms, _ = model(batch["images"], batch["gt_boxes"], batch["gt_labels"], source.complete(batch))
    return names, {k: float(v) for k, v in terms.items()}


@pytest.mark.parametrize("name", ["region", "cls_region", "cls_box_region"])
def test_region_store_reads_back_the_dense_targets_inside_its_region(world, stores, name):
    import numpy as np

    from label_store import open_store

    dense, region = open_store(str(stores["dense"])), open_store(str(stores[name]))
    assert region.region is not None and dense.region is None
    share = region.region_share()
    assert 0 < share < 0.9
    for key in region.keys():
        mask = region.read_regions([key])[0]
        got, expected = region.read(*key), dense.read(*key)
        starts = {}
        for spec in region.targets:
            if spec.group not in region.region.groups:
                np.testing.assert_array_equal(got[spec.name], expected[spec.name])
                continue
            _, h, w = spec.shape
            start = starts.get(spec.group, 0)
            keep = mask[start : start + h * w].reshape(h, w)
            starts[spec.group] = start + h * w
            np.testing.assert_array_equal(got[spec.name][:, keep], expected[spec.name][:, keep])
            assert np.isnan(got[spec.name][:, ~keep]).all()


def test_ld_and_bcd_from_a_region_store_equal_those_from_dense_stores(world, stores):
    names, from_region = _terms(world, stores["region"], "ld,bcd")
    assert "box/p3" in names and "edges/p3" in names  # LD reads box in the region, BCD dense edges
    _, from_dense = _terms(world, stores["dense"], "ld")
    _, from_edges = _terms(world, stores["edges"], "bcd")
    assert from_region["ld_main"] > 0 and from_region["ld_vlr"] > 0
    for key in ("ld_main", "ld_vlr", "ld_kd"):
        assert from_region[key] == from_dense[key]
    for key in ("bcd_cls", "bcd_iou"):
        assert from_region[key] == from_edges[key]


@pytest.mark.parametrize("name", ["cls_region", "cls_box_region"])
def test_ld_from_a_cls_region_store_equals_ld_from_a_dense_store(world, stores, name):
    names, from_region = _terms(world, stores[name], "ld")
    _, from_dense = _terms(world, stores["dense"], "ld")
    assert "cls/p3" in names and from_region["ld_kd"] > 0
    for key in ("ld_main", "ld_vlr", "ld_kd"):
        assert from_region[key] == from_dense[key]


def _cli(world, out, store, losses, sets=()):
    from student_trainer.cli import run_config as run_cli_config
    from student_trainer.config import build_run_config

    config = run_config(world, out, store=store, losses=losses)
    if sets:
        overrides = {"store": str(store), "annotations": str(world.annotations), "images": str(world.images),
                     "student": "gfl_tiny", "out": str(out), "losses": losses, "iters": 3, "batch_size": 2,
                     "num_workers": 0, "seed": 0, "device": "cpu", "threads": 1}
        config = build_run_config(None, overrides, ["student.fpn_channels=16", "student.head_channels=16", *sets])
    return run_cli_config(config, progress=False)


@pytest.mark.parametrize(
    ("sets", "expected"),
    [
        (["losses.ld.alpha=0.2"], "losses.ld.alpha=0.2, the store's region serves alpha >= 0.25"),
        (["losses.ld.topk=5"], "losses.ld.topk=5, the store's region serves topk 9"),
        (["losses.ld.vlr_diou=released"], "losses.ld.vlr_diou='released', the store's region serves 'standard'"),
    ],
)
def test_ld_settings_outside_the_region_exit_2_naming_them(world, stores, tmp_path, capsys, sets, expected):
    assert _cli(world, tmp_path / "run", stores["region"], "ld", sets) == 2
    err = capsys.readouterr().err
    assert expected in err and "box at ATSS positives (topk 9) and VLR (alpha >= 0.25" in err


@pytest.mark.parametrize("name", ["cls_region", "cls_box_region"])
def test_ld_topk_outside_a_cls_region_exits_2_naming_it(world, stores, tmp_path, capsys, name):
    assert _cli(world, tmp_path / "run", stores[name], "ld", ["losses.ld.topk=5"]) == 2
    err = capsys.readouterr().err
    assert "losses.ld.topk=5, the store's region serves topk 9" in err and "cls" in err.split("holds", 1)[1]


def test_cls_region_serves_every_vlr_setting_and_checks_the_point_offset(world, stores):
    from label_store import open_store
    from student_trainer.config import LDConfig, LossConfig, parse_losses
    from student_trainer.data import StoreFitError, check_store_region

    region = open_store(str(stores["cls_region"])).region
    names = ("cls/p3", "box/p3")
    losses = LossConfig(enabled=parse_losses("ld"), ld=LDConfig(alpha=0.1, vlr_diou="released"))
    check_store_region(region, losses, store="s", point_offset=0.5, needed=names)  # box is dense: any VLR
    with pytest.raises(StoreFitError, match="point offset: the student's points sit at 0, the store's region used 0.5"):
        check_store_region(region, losses, store="s", point_offset=0.0, needed=names)
    # ld_main alone still runs the recipe, which reads cls at the positives
    with pytest.raises(StoreFitError, match="losses.ld.topk=5"):
        check_store_region(region, LossConfig(enabled=("ld_main",), ld=LDConfig(topk=5)), store="s", point_offset=0.5, needed=names)


@pytest.mark.parametrize("name", ["cls_region", "cls_box_region"])
def test_bcd_against_a_cls_region_store_exits_2(world, stores, tmp_path, capsys, name):
    assert _cli(world, tmp_path / "run", stores[name], "ld,bcd") == 2
    err = capsys.readouterr().err
    assert "BCD reads the teacher's class logits at every point; the store holds cls only in its region" in err
    assert "--cls-region dense" in err


def test_bcd_against_a_region_store_without_edges_exits_2(world, stores, tmp_path, capsys):
    assert _cli(world, tmp_path / "run", stores["region_no_edges"], "bcd") == 2
    assert "BCD reads the teacher's boxes at every point" in capsys.readouterr().err


def test_training_from_a_region_store_and_from_an_old_dense_store(world, stores, tmp_path):
    from label_store import open_store
    from student_trainer.train import train_student

    assert open_store(str(world.store)).schema_version == 2  # written as before region storage
    runs = (("region", stores["region"], "ld,bcd"), ("cls_region", stores["cls_region"], "ld"), ("dense", world.store, "ld"))
    for name, store, losses in runs:
        train_student(run_config(world, tmp_path / name, store=store, losses=losses), progress=False)
        assert (tmp_path / name / "final.pt").is_file()
    # A larger alpha reads a subset of the region: allowed.
    assert _cli(world, tmp_path / "alpha", stores["region"], "ld", ["losses.ld.alpha=0.5"]) == 0


def test_ld_recipe_refuses_teacher_values_a_region_store_did_not_store():
    from detcore.outputs import level_anchors
    from student_trainer.losses import LossInputError
    from student_trainer.losses.recipes import ld_recipe

    torch.manual_seed(0)
    shapes, strides, reg_max = [(8, 8)], [8], 7
    student_cls, teacher_cls = torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8)
    student_box, teacher_box = torch.randn(1, 32, 8, 8), torch.randn(1, 32, 8, 8)
    gt = [torch.tensor([[10.0, 12.0, 40.0, 44.0]])]
    assert len(level_anchors(strides, shapes)[0]) == 64
    ld_recipe([student_cls], [student_box], [teacher_cls], [teacher_box], gt, strides, reg_max)
    teacher_box[:, :, 3, 3] = float("nan")  # a point inside the GT: positive or in the VLR
    with pytest.raises(LossInputError, match="did not store them"):
        ld_recipe([student_cls], [student_box], [teacher_cls], [teacher_box], gt, strides, reg_max)


def test_ld_recipe_refuses_teacher_class_logits_a_region_store_did_not_store():
    from student_trainer.losses import LossInputError
    from student_trainer.losses.recipes import assign_points, ld_recipe

    torch.manual_seed(0)
    strides, reg_max = [8], 7
    student_cls, teacher_cls = torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8)
    student_box, teacher_box = torch.randn(1, 32, 8, 8), torch.randn(1, 32, 8, 8)
    gt = [torch.tensor([[10.0, 12.0, 40.0, 44.0]])]
    positive = assign_points(gt, strides, [(8, 8)]).assigned_gt[0].reshape(8, 8) > 0
    unread = teacher_cls.clone()
    unread[:, :, ~positive] = float("nan")  # what a cls region store decodes outside: LD does not read it
    args = ([student_cls], [student_box])
    expected = ld_recipe(*args, [teacher_cls], [teacher_box], gt, strides, reg_max)
    assert float(ld_recipe(*args, [unread], [teacher_box], gt, strides, reg_max)["ld_kd"]) == float(expected["ld_kd"])
    y, x = positive.nonzero()[0].tolist()
    unread[0, 1, y, x] = float("nan")
    with pytest.raises(LossInputError, match=r"ld_recipe\(teacher_cls=\).*ATSS positives"):
        ld_recipe(*args, [unread], [teacher_box], gt, strides, reg_max)
