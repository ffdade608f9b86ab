"""The training dataset: stored views rendered as recorded, one view per image per epoch, targets in workers."""

import pickle

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _views(num_images=5, per_image=2):
    from detcore.views import View

    return [View(i, v, 64, 64, 50, 60, 1.0, bool(v % 2)) for i in range(1, num_images + 1) for v in range(per_image)]


def test_batches_take_one_view_per_image_each_epoch_reproducibly():
    from detcore.datasets import CanvasBatchSampler

    views = _views()
    sampler = CanvasBatchSampler(views, 5, seed=3)
    orders = []
    for epoch in range(6):
        sampler.set_epoch(epoch)
        (batch,) = list(sampler)
        assert sorted(views[i].image_id for i in batch) == [1, 2, 3, 4, 5]
        orders.append(batch)
    again = CanvasBatchSampler(views, 5, seed=3)
    again.set_epoch(4)
    assert list(again) == [orders[4]]
    chosen = {views[i].view_id for order in orders for i in order}
    assert chosen == {0, 1}  # both views of the images get sampled over the epochs
    assert len({tuple(o) for o in orders}) > 1


def test_batches_shard_evenly_and_resume_mid_epoch():
    from detcore.datasets import CanvasBatchSampler

    views = _views(num_images=9)
    shards = [CanvasBatchSampler(views, 2, seed=1, num_replicas=2, rank=r) for r in range(2)]
    a, b = shards[0].batches(2), shards[1].batches(2)
    assert len(a) == len(b) == 2  # 9 images: two blocks of 2 x 2, the ninth dropped
    assert len({views[i].image_id for batch in a + b for i in batch}) == 8
    whole = CanvasBatchSampler(views, 4, seed=1).batches(2)
    assert [batch[0::2] for batch in whole] == a and [batch[1::2] for batch in whole] == b  # interleaved shares of one order
    shards[0].set_epoch(2, start=1)
    assert list(shards[0]) == a[1:] and len(shards[0]) == 1
    with pytest.raises(ValueError, match="rank"):
        CanvasBatchSampler(views, 2, num_replicas=2, rank=2)


def test_dataset_renders_the_stored_recipe_and_reads_its_targets(world):
    from detcore.coco import CocoDataset
    from detcore.views import image_to_view_boxes, render
    from label_store import open_store
    from student_trainer.data import StoreViewDataset, collate_train
    from student_trainer.sources import StoreSource

    source = StoreSource(str(world.store), ["cls/p3", "fpn/p4"])
    stored = source.stored_views()
    assert len(stored) == 8 and {v.flip for v, _ in stored} == {False, True}
    views = [v for v, _ in stored]
    coco = CocoDataset(world.annotations, world.images)
    dataset = StoreViewDataset(coco, views, expected_hashes=dict((v.key, h) for v, h in stored),
                               target_reader=pickle.loads(pickle.dumps(source.worker_reader())))
    index = next(i for i, v in enumerate(views) if v.key == (2, 1))
    item = dataset[index]
    pixels = coco.load(2)
    expected = render(pixels, views[index], coco.targets(2).gt_boxes)
    assert torch.equal(item["image"], expected.image)
    np.testing.assert_allclose(item["gt_boxes"].numpy(), image_to_view_boxes(coco.targets(2).gt_boxes, views[index]))
    reader = open_store(str(world.store))
    record = reader.record(2, 1)
    assert tuple(item["valid_region"]) == tuple(record["valid_region"])
    assert item["content_hash"] == record["content_hash"]
    for name in ("cls/p3", "fpn/p4"):
        np.testing.assert_array_equal(item["targets"][name], reader.read(2, 1)[name])

    batch = collate_train([dataset[0], dataset[index]])
    assert batch["targets"]["cls/p3"].shape == (2, 2, 8, 8) and batch["missing"] == []


def test_items_without_targets_are_listed_for_the_source():
    from detcore.datasets import DecodeFailure
    from student_trainer.data import collate_train

    item = {"image": torch.zeros(3, 8, 8), "gt_boxes": torch.zeros(0, 4), "gt_labels": torch.zeros(0, dtype=torch.long),
            "ignore_boxes": torch.zeros(0, 4), "view": None, "image_id": 1, "valid_region": (0, 0, 8, 8),
            "content_hash": "h", "image_path": "p"}
    with_targets = {**item, "targets": {"cls/p3": np.ones((2, 1, 1), np.float32)}}
    without = {**item, "targets": None}
    failure = DecodeFailure(9, 0, "x.png", "image 9 changed on disk since precompute (hash a != b)")
    batch = collate_train([with_targets, failure, without])
    assert batch["targets"] is None and batch["missing"] == [1]
    assert batch["partial_targets"][0]["cls/p3"].shape == (2, 1, 1)
    assert [f.image_id for f in batch["failures"]] == [9]


def test_failure_log_separates_changed_and_undecodable_images():
    from detcore.datasets import DecodeFailure
    from student_trainer.data import FailureLog

    log = FailureLog.empty()
    new = log.add([DecodeFailure(3, 0, "a.png", "image 3 changed on disk since precompute (hash 1 != 2)"),
                   DecodeFailure(5, 1, "b.png", "zero-byte file")])
    assert len(new) == 2 and log.count == 2
    assert log.add([DecodeFailure(3, 1, "a.png", "image 3 changed on disk since precompute (hash 1 != 2)")]) == []
    assert "image 3" in log.summary() and "image 5" in log.summary()
    assert list(log.to_dict()["changed"]) == ["3"] and list(log.to_dict()["undecodable"]) == ["5"]


def test_fit_check_lists_every_difference(world):
    from label_store import open_store
    from student_trainer.data import StoreFitError, check_store_fits

    reader = open_store(str(world.store))
    check_store_fits(reader.fingerprint, reader.targets, store="s", classes=("square", "disc"), strides=(8, 16, 32, 64, 128),
                     reg_max=16, canvas_hw=(64, 64), needed=["cls/p3", "backbone/c5"])
    with pytest.raises(StoreFitError) as info:
        check_store_fits(reader.fingerprint, reader.targets, store="s", classes=("a", "b", "c"), strides=(8, 16, 32),
                         reg_max=7, canvas_hw=(128, 128), needed=["fpn/p9"])
    message = str(info.value)
    for part in ("classes: store has 2", "strides: store has (8, 16, 32, 64, 128), the student has (8, 16, 32)",
                 "reg_max: store has 16, the student has 7", "canvas: store has (64, 64)", "['fpn/p9']"):
        assert part in message
    assert message.count("\n  - ") == 5


def test_photometric_jitter_keeps_padding_and_changes_pixels():
    from student_trainer.data import photometric_jitter

    torch.manual_seed(0)
    image = torch.zeros(3, 16, 16)
    image[:, :8, :10] = 0.5
    out = photometric_jitter(image, (0, 0, 10, 8))
    assert torch.equal(out[:, 8:, :], image[:, 8:, :]) and torch.equal(out[:, :, 10:], image[:, :, 10:])
    assert not torch.allclose(out[:, :8, :10], image[:, :8, :10])


def test_workers_compute_the_gt_regions_the_model_would(world):
    """LD's VLR and ld_im's region from the loader (`GTRegions`) give the model's own losses exactly."""
    from detcore.coco import CocoDataset
    from detcore.models.gfl import build_detector
    from student_trainer.config import LossConfig, parse_losses
    from student_trainer.data import StoreViewDataset, collate_train
    from student_trainer.distill import DistillationModel, TargetShapeError, needed_target_names
    from student_trainer.sources import StoreSource

    torch.manual_seed(0)
    student = build_detector("gfl_tiny", 2, fpn_channels=16, head_channels=16)
    losses = LossConfig(enabled=parse_losses("ld,ld_im"))
    source = StoreSource(str(world.store), needed_target_names(losses, student.strides))
    model = DistillationModel(student, losses, (64, 64), {s.name: s.shape[0] for s in source.specs})
    stored = source.stored_views()
    views = [v for v, _ in stored]
    dataset = StoreViewDataset(CocoDataset(world.annotations, world.images), views, target_reader=source.worker_reader(),
                               regions=pickle.loads(pickle.dumps(model.region_spec())))  # as a worker gets it
    batch = collate_train([dataset[i] for i in range(4)])
    assert set(batch["regions"]) == {"vlr", "im"} and batch["regions"]["im"].dtype == torch.bool
    assert batch["regions"]["vlr"].shape == (4, sum(h * w for h, w in [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]))
    assert (batch["regions"]["vlr"] > 0).any() and batch["regions"]["im"].any()
    args = (batch["images"], batch["gt_boxes"], batch["gt_labels"], source.outputs(batch["targets"]))
    with torch.no_grad():
        own, _ = model(*args)
        given, _ = model(*args, regions=batch["regions"])
    assert {k: float(v) for k, v in given.items()} == {k: float(v) for k, v in own.items()}
    with pytest.raises(TargetShapeError, match=r"regions=\) expects 'vlr' as Tensor\[4, 86\]"):
        model(*args, regions={"vlr": batch["regions"]["vlr"][:2]})
    # no region-reading term, nothing for the workers to do
    assert DistillationModel(student, LossConfig(enabled=("ld_main", "fgd")), (64, 64),
                             {s.name: s.shape[0] for s in source.specs}).region_spec() is None
