"""`load_detector` dispatches on the checkpoint's architecture family, in one function."""

import sys
import types

import pytest
import torch

from detcore.checkpoint import CheckpointError, load_checkpoint, load_detector, load_detector_with_meta, save_checkpoint
from detcore.models.gfl import build_detector


@pytest.fixture()
def native(tmp_path):
    torch.manual_seed(0)
    model = build_detector("gfl_tiny", 2, fpn_channels=16, head_channels=16)
    return save_checkpoint(tmp_path / "native.pt", model, classes=("a", "b"), canvas_hw=(64, 64)), model


def test_native_checkpoint_is_family_gfl(native):
    path, model = native
    loaded, meta = load_detector_with_meta(path)
    assert meta["architecture"] == {"family": "gfl"} and meta["detector_config"] == model.config
    assert isinstance(load_detector(path), torch.nn.Module)


def test_imported_family_builds_through_its_importer(native, tmp_path, monkeypatch):
    path, model = native
    payload = load_checkpoint(path)
    built = []

    def build_mmdet_gfl(architecture):  # stands in for detcore.importers.mmdet_gfl
        built.append(architecture)
        return build_detector("gfl_tiny", 2, fpn_channels=16, head_channels=16)

    fake = types.ModuleType("detcore.importers.mmdet_gfl")
    fake.build_mmdet_gfl = build_mmdet_gfl
    monkeypatch.setitem(sys.modules, "detcore.importers", types.ModuleType("detcore.importers"))
    monkeypatch.setitem(sys.modules, "detcore.importers.mmdet_gfl", fake)
    architecture = {"family": "mmdet-gfl", "depth": 18}
    imported = {k: v for k, v in payload.items() if k != "detector_config"}
    imported.update(architecture=architecture, format_version=2, point_offset=0.0, source_format="mmdet-gfl")
    torch.save(imported, tmp_path / "imported.pt")
    loaded, meta = load_detector_with_meta(tmp_path / "imported.pt")
    assert built == [architecture] and meta["architecture"] == architecture and meta["detector_config"] is None
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(images).cls_logits[0], model.eval()(images).cls_logits[0])
    # an imported checkpoint of format_version 1, and an unknown family, are refused by name
    torch.save({**imported, "format_version": 1}, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match=r"format_version in \[2\]. Got 1"):
        load_detector(tmp_path / "old.pt")
    torch.save({**imported, "architecture": {"family": "yolo"}}, tmp_path / "yolo.pt")
    with pytest.raises(CheckpointError, match=r"architecture\['family'\] in .*Got 'yolo'"):
        load_detector(tmp_path / "yolo.pt")
