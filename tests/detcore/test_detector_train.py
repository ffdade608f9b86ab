"""Training, resume, evaluation, datasets of views and the `detector` CLI on tiny data (64 px, gfl_tiny)."""

import argparse
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from detcore.checkpoint import load_checkpoint
from detcore.coco import CocoDataset
from detcore.datasets import DecodeFailure, EpochViewSampler, ViewDataset, collate_views
from detcore.train import (
    TrainConfig,
    TrainConfigMismatchError,
    build_optimizer,
    config_difference,
    evaluate_detector,
    evaluate_model,
    learning_rate_factor,
    optimizer_step,
    parse_canvas,
    train_detector,
)
from detcore.views import content_hash, plan_views

pytestmark = pytest.mark.usefixtures("one_torch_thread")


COLOURS = ((220, 40, 40), (40, 80, 220))


def make_dataset(root, sizes, corrupt=(), seed=0):
    """PNG images with one or two solid rectangles of class colours on a noisy grey background."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index, (h, w) in enumerate(sizes):
        image_id = 10 + index
        pixels = rng.integers(100, 140, size=(h, w, 3), dtype=np.uint8)
        for k in range(1 + index % 2):
            label = (index + k) % 2
            bw, bh = int(rng.integers(w // 4, w // 2)), int(rng.integers(h // 4, h // 2))
            x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            pixels[y : y + bh, x : x + bw] = COLOURS[label]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 5 + 2 * label,
                                "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0})
        name = f"{image_id}.png"
        if image_id in corrupt:
            (root / "images" / name).write_bytes(b"\x89PNG\r\n\x1a\n broken")
        else:
            Image.fromarray(pixels).save(root / "images" / name)
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
    categories = [{"id": 5, "name": "red"}, {"id": 7, "name": "blue"}]
    path = root / "train.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return str(path), str(root / "images")


def tiny_config(annotations, images, out_dir, **overrides):
    values = dict(annotations=annotations, images=images, arch="gfl_tiny", out_dir=str(out_dir), canvas=(64, 64),
                  batch_size=2, num_workers=0, checkpoint_every=1000, log_every=1, seed=0)
    values.update(overrides)
    return TrainConfig(**values)


def test_losses_fall_on_a_tiny_overfitting_run(tmp_path):
    annotations, images = make_dataset(tmp_path / "data", [(64, 64), (64, 64)])
    config = tiny_config(annotations, images, tmp_path / "run", iters=30, lr=1e-2, flip=False)
    summary = train_detector(config, progress=False)
    losses = [row["loss"] for row in summary["history"]]
    assert len(losses) == 30 and summary["finished"]
    # GFL weights its box losses by the predicted score, so the loss first rises while the
    # classifier leaves its 0.01 prior; from that peak it must fall clearly.
    peak = max(np.convolve(losses, np.ones(5) / 5, mode="valid"))
    assert np.mean(losses[-5:]) < 0.5 * peak, (peak, losses[-5:])
    giou = [row["giou"] for row in summary["history"]]
    assert np.mean(giou[-5:]) < 0.5 * max(giou)
    # The two training images are then detected (an untrained detector finds nothing above 0.05).
    trained = evaluate_detector(tmp_path / "run" / "final.pt", annotations, images, progress=False)
    assert trained["AP50"] > 0.9, trained
    torch.manual_seed(0)
    from detcore.models.gfl import build_detector

    untrained = evaluate_model(build_detector("gfl_tiny", 2), CocoDataset(annotations, images), (64, 64))
    assert untrained["AP50"] < 0.2
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["step"] == 30 and metrics["failed_images"] == []
    final = load_checkpoint(tmp_path / "run" / "final.pt")
    assert final["training"] is None and final["classes"] == ["red", "blue"] and final["canvas_hw"] == [64, 64]


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path):
    annotations, images = make_dataset(tmp_path / "data", [(64, 64), (48, 80), (80, 48), (64, 64)])
    straight = train_detector(tiny_config(annotations, images, tmp_path / "a", iters=6), progress=False)
    partial = train_detector(tiny_config(annotations, images, tmp_path / "b", iters=6), stop_after_steps=3,
                             progress=False)
    assert not partial["finished"] and partial["step"] == 3
    assert not (tmp_path / "b" / "final.pt").exists()
    assert load_checkpoint(tmp_path / "b" / "last.pt")["training"]["step"] == 3
    resumed = train_detector(tiny_config(annotations, images, tmp_path / "b", iters=6, num_workers=1), progress=False)
    assert resumed["finished"] and resumed["step"] == 6
    assert [r["step"] for r in resumed["history"]] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([r["loss"] for r in resumed["history"]], [r["loss"] for r in straight["history"]],
                               rtol=1e-4)
    a = load_checkpoint(tmp_path / "a" / "final.pt")["model_state"]
    b = load_checkpoint(tmp_path / "b" / "final.pt")["model_state"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    with pytest.raises(TrainConfigMismatchError, match=r"\['lr'\]"):
        train_detector(tiny_config(annotations, images, tmp_path / "b", iters=6, lr=1e-2), progress=False)


def test_corrupt_image_is_skipped_and_reported_by_id_and_cli_exit_codes(tmp_path, capsys):
    from detcore.cli_detector import register

    annotations, images = make_dataset(tmp_path / "data", [(64, 64), (64, 64), (64, 64)], corrupt=(11,))
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args([
        "detector", "train", "--annotations", annotations, "--images", images, "--arch", "gfl_tiny",
        "--out", str(tmp_path / "run"), "--iters", "2", "--batch-size", "2", "--canvas", "64", "--num-workers", "0",
        "--val-annotations", annotations, "--val-images", images,
    ])
    assert args.func(args) == 3
    captured = capsys.readouterr()
    assert "image_id=11" in captured.err and "AP50" in captured.out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [f["image_id"] for f in metrics["failed_images"]] == [11]
    assert metrics["val"]["failed_image_ids"] == [11] and metrics["val"]["num_images"] == 2

    args = parser.parse_args(["detector", "eval", "--checkpoint", str(tmp_path / "run" / "final.pt"),
                              "--annotations", annotations, "--images", images])
    assert args.func(args) == 3
    out = capsys.readouterr().out
    assert "AP75" in out and "2 images evaluated" in out
    args = parser.parse_args(["detector", "eval", "--checkpoint", str(tmp_path / "missing.pt"),
                              "--annotations", annotations, "--images", images])
    assert args.func(args) == 2
    assert "missing.pt" in capsys.readouterr().err


def test_evaluate_detector_refuses_other_classes(tmp_path):
    annotations, images = make_dataset(tmp_path / "data", [(64, 64), (64, 64)])
    train_detector(tiny_config(annotations, images, tmp_path / "run", iters=1), progress=False)
    data = json.loads(open(annotations).read())
    data["categories"][1]["name"] = "green"
    other = tmp_path / "other.json"
    other.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="classes the checkpoint was trained on"):
        evaluate_detector(tmp_path / "run" / "final.pt", other, images)
    metrics = evaluate_detector(tmp_path / "run" / "final.pt", annotations, images, progress=False)
    assert set(metrics) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"} and metrics["num_images"] == 2


class _OracleDetector(torch.nn.Module):
    """Predicts fixed canvas boxes, to check the canvas -> image mapping of evaluation."""

    def __init__(self, boxes, labels):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.boxes, self.labels = boxes, labels

    def forward(self, images):
        return images

    def predict(self, outputs, score_thr=0.05, canvas_hw=None):
        n = self.boxes.shape[0]
        return [{"boxes": self.boxes, "scores": torch.ones(n), "labels": self.labels} for _ in range(outputs.shape[0])]


def test_evaluation_maps_canvas_detections_back_to_the_image(tmp_path):
    annotations, images = make_dataset(tmp_path / "data", [(32, 48)])
    dataset = CocoDataset(annotations, images)
    targets = dataset.targets(10)
    scale = 64 / 48  # fit scale of a 32 x 48 image on a 64 x 64 canvas
    canvas_boxes = torch.from_numpy(targets.gt_boxes) * scale
    labels = torch.from_numpy(targets.gt_labels)
    metrics = evaluate_model(_OracleDetector(canvas_boxes, labels), dataset, (64, 64))
    assert metrics["AP"] == pytest.approx(1.0) and metrics["num_images"] == 1
    unmapped = evaluate_model(_OracleDetector(canvas_boxes * scale, labels), dataset, (64, 64))
    assert unmapped["AP"] < 0.5


def test_view_dataset_items_and_failures(tmp_path):
    annotations, images = make_dataset(tmp_path / "data", [(32, 48), (64, 64)], corrupt=(11,))
    dataset = CocoDataset(annotations, images)
    views = plan_views([(i, dataset.record(i).height, dataset.record(i).width) for i in dataset.image_ids],
                       canvas_hw=(64, 64))
    items = ViewDataset(dataset, views)
    flipped = items[1]
    assert flipped["view"].flip and flipped["image_id"] == 10
    assert tuple(flipped["image"].shape) == (3, 64, 64) and flipped["valid_region"] == (0, 0, 64, 43)
    x1, y1, x2, y2 = dataset.targets(10).gt_boxes[0] * np.array([64 / 48, 43 / 32, 64 / 48, 43 / 32])  # resized 43 x 64
    torch.testing.assert_close(flipped["gt_boxes"][0], torch.tensor([64 - x2, y1, 64 - x1, y2], dtype=torch.float32), rtol=0, atol=1e-4)
    assert flipped["content_hash"] == content_hash(dataset.load(10))
    broken = items[2]
    assert isinstance(broken, DecodeFailure) and broken.image_id == 11 and broken.path.endswith("11.png")
    batch = collate_views([items[0], broken, None])
    assert tuple(batch["images"].shape) == (1, 3, 64, 64)
    assert [f.image_id for f in batch["failures"]] == [11, -1]
    assert collate_views([broken])["images"] is None


def test_epoch_view_sampler_is_one_view_per_image_and_reproducible():
    views = plan_views([(1, 64, 64), (2, 64, 64), (3, 64, 64)], canvas_hw=(64, 64), scales=(1.0, 0.5))
    sampler = EpochViewSampler(views, seed=3)
    orders = [sampler.order(epoch) for epoch in range(6)]
    for order in orders:
        assert sorted(views[i].image_id for i in order) == [1, 2, 3]
    assert orders[0] == EpochViewSampler(views, seed=3).order(0)
    assert len({tuple(o) for o in orders}) > 1
    assert len({views[i].view_id for o in orders for i in o}) > 1
    sampler.set_epoch(4, start=1)
    assert list(sampler) == orders[4][1:] and len(sampler) == 2


def test_optimizer_step_clips_steps_and_skips_a_loss_that_is_not_finite():
    weight = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    # gradient (300, 400): norm 500, clipped to norm 5 -> (3, 4); SGD with lr 1 subtracts it
    assert optimizer_step((weight * torch.tensor([300.0, 400.0])).sum(), optimizer, scaler, [weight], 5.0)
    assert torch.allclose(weight.detach(), torch.tensor([1.0 - 3.0, -2.0 - 4.0]))
    before = weight.detach().clone()
    assert not optimizer_step(weight.sum() * float("nan"), optimizer, scaler, [weight], 5.0)
    assert torch.equal(weight.detach(), before) and weight.grad is None  # no step, gradients cleared
    # no clipping: the raw gradient
    assert optimizer_step((weight * 2.0).sum(), optimizer, scaler, [weight], None)
    assert torch.allclose(weight.detach(), before - 2.0)


def test_build_optimizer_decays_weights_only_and_names_the_choices():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4))
    optimizer = build_optimizer(model, "sgd", 0.01, 1e-4)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["momentum"] == 0.9
    decayed, free = optimizer.param_groups
    assert [p.shape for p in decayed["params"]] == [(4, 3, 3, 3)] and decayed["weight_decay"] == 1e-4
    assert len(free["params"]) == 3 and free["weight_decay"] == 0.0  # conv bias, norm weight and bias
    assert isinstance(build_optimizer(model, "adamw", 2e-3, 0.05), torch.optim.AdamW)
    with pytest.raises(ValueError, match=r"\('adamw', 'sgd'\). Got 'adam'"):
        build_optimizer(model, "adam", 1e-3, 0.0)
    text = config_difference({"lr": 0.01, "epochs": 2}, {"lr": 0.02, "epochs": 2, "seed": 1})
    assert text == "different ['lr', 'seed'] (saved [0.01, None], now [0.02, 1])"


def test_learning_rate_schedules_and_parsing():
    assert learning_rate_factor(0, 100, 10, "cosine") == pytest.approx(0.001)
    assert learning_rate_factor(5, 100, 10, "cosine") == pytest.approx(0.001 + 0.999 * 0.5)
    assert learning_rate_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert learning_rate_factor(55, 100, 10, "cosine") == pytest.approx(0.01 + 0.99 * 0.5)
    assert learning_rate_factor(100, 100, 10, "cosine") == pytest.approx(0.01)
    assert learning_rate_factor(65, 120, 10, "step") == 1.0
    assert learning_rate_factor(80, 120, 10, "step") == pytest.approx(0.1)
    assert learning_rate_factor(110, 120, 10, "step") == pytest.approx(0.01)
    assert parse_canvas("256") == (256, 256) and parse_canvas("192x320") == (192, 320)
    with pytest.raises(ValueError, match="--canvas"):
        parse_canvas("16")
    with pytest.raises(ValueError, match="not both"):
        TrainConfig("a", "b", "gfl_tiny", "c", iters=3, epochs=2).validate()
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig("a", "b", "gfl_tiny", "c", optimizer="lion").validate()
    config = TrainConfig("a", "b", "gfl_r18", "c", canvas=(128, 96), scales=(1.0, 0.5))
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert math.isclose(TrainConfig("a", "b", "gfl_tiny", "c", optimizer="sgd").peak_lr, 0.01)


def test_cli_progress_bar_follows_no_progress_and_tqdm_disable(tmp_path, capsys, monkeypatch):
    from detcore.cli_detector import register

    annotations, images = make_dataset(tmp_path / "data", [(64, 64), (64, 64)])
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))

    def train(name, *extra):
        args = parser.parse_args([
            "detector", "train", "--annotations", annotations, "--images", images, "--arch", "gfl_tiny",
            "--out", str(tmp_path / name), "--iters", "1", "--batch-size", "2", "--canvas", "64", "--num-workers", "0",
            *extra,
        ])
        assert args.func(args) == 0
        return capsys.readouterr().err

    monkeypatch.delenv("TQDM_DISABLE", raising=False)  # tests/conftest.py sets it for the suite
    assert "train gfl_tiny" in train("bar")
    assert "train gfl_tiny" not in train("flag", "--no-progress")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert "train gfl_tiny" not in train("env")
