"""Self-describing checkpoints: round trip, fingerprint, clear errors."""

import hashlib
import json

import pytest
import torch

from detcore.checkpoint import (
    CheckpointError,
    CheckpointNotFoundError,
    checkpoint_sha256,
    load_checkpoint,
    load_detector,
    load_detector_with_meta,
    save_checkpoint,
    teacher_fingerprint,
)
from detcore.models.gfl import build_detector
from detcore.views import PIXEL_MEAN

pytestmark = pytest.mark.usefixtures("one_torch_thread")


CLASSES = ("circle", "square", "star")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = build_detector("gfl_tiny", num_classes=3, fpn_channels=16, reg_max=8).eval()
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(path, model, classes=CLASSES, canvas_hw=(64, 96), metadata={"note": "unit"})
    return model, path


def test_round_trip_gives_the_same_outputs(saved):
    model, path = saved
    loaded, meta = load_detector_with_meta(path)
    assert meta["classes"] == CLASSES and meta["canvas_hw"] == (64, 96)
    assert meta["detector_config"] == model.config and meta["metadata"] == {"note": "unit"}
    assert meta["preprocessing"]["pixel_mean"] == list(PIXEL_MEAN)
    assert not loaded.training
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        a, b = model(images, with_backbone=True), loaded(images, with_backbone=True)
    for name, tensor in a.to_targets(("cls", "box", "fpn", "backbone")).items():
        assert torch.equal(tensor, b.to_targets(("cls", "box", "fpn", "backbone"))[name]), name
    assert list(path.parent.glob("*.tmp")) == []


def test_fingerprint_is_plain_json_and_pins_the_file(saved, tmp_path):
    model, path = saved
    fingerprint = teacher_fingerprint(path)
    assert set(fingerprint) == {"architecture", "checkpoint_sha256", "classes", "canvas_hw", "strides", "reg_max",
                                "preprocessing"}
    assert json.loads(json.dumps(fingerprint)) == fingerprint
    assert fingerprint["architecture"] == "gfl_tiny" and fingerprint["reg_max"] == 8
    assert fingerprint["classes"] == list(CLASSES) and fingerprint["canvas_hw"] == [64, 96]
    assert fingerprint["strides"] == [8, 16, 32, 64, 128]
    assert fingerprint["checkpoint_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() == checkpoint_sha256(path)
    with torch.no_grad():
        model.head.scales[0].scale.add_(1.0)
    other = save_checkpoint(tmp_path / "other.pt", model, classes=CLASSES, canvas_hw=(64, 96))
    with torch.no_grad():
        model.head.scales[0].scale.sub_(1.0)
    assert teacher_fingerprint(other)["checkpoint_sha256"] != fingerprint["checkpoint_sha256"]


def test_training_state_round_trips(saved, tmp_path):
    model, _ = saved
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(1, 3, 64, 64)).cls_logits[0].sum().backward()
    optimizer.step()
    path = save_checkpoint(
        tmp_path / "last.pt", model, classes=CLASSES, canvas_hw=(64, 64),
        training={"step": 7, "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state()},
    )
    payload = load_checkpoint(path)
    assert payload["training"]["step"] == 7
    assert payload["training"]["optimizer"]["param_groups"][0]["lr"] == 1e-3
    model.zero_grad()


def test_errors_name_the_path_and_what_was_expected(saved, tmp_path):
    model, path = saved
    missing = tmp_path / "nope.pt"
    with pytest.raises(CheckpointNotFoundError, match="nope.pt.*does not exist") as info:
        load_detector(missing)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_checkpoint(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a distillery detector checkpoint"):
        load_detector(foreign)
    future = tmp_path / "future.pt"
    payload = load_checkpoint(path)
    payload["format_version"] = 99
    torch.save(payload, future)
    with pytest.raises(CheckpointError, match=r"format_version in \[1\]. Got 99 in .*future.pt"):
        teacher_fingerprint(future)
    with pytest.raises(CheckpointError, match="expects 3 names"):
        save_checkpoint(tmp_path / "x.pt", model, classes=("a",), canvas_hw=(64, 64))
    assert not (tmp_path / "x.pt").exists()
