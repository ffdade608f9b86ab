"""`teacher_service.store_layout`: codec profiles, the codecs a resumed store keeps, a schema-1 store's own views.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from detcore.coco import CocoDataset
from detcore.views import View, render_array
from teacher_service.precompute import run_precompute

from precompute_fixtures import (  # noqa: F401  (fixtures are found by name)
    FP32_CODECS_NO_BACKBONE,
    _config,
    _direct_targets,
    _shutdown_ray_after_module,
    _store_codecs,
    data,
    dataclasses_replace,
    local_ray,
    ray_cluster_dir,
    teacher_model,
)


def test_codec_profile_auto_follows_the_teacher_device(data, tmp_path):
    from teacher_service.store_layout import profile_codecs, resolve_codec_profile

    assert resolve_codec_profile(_config(data, tmp_path / "s.zarr", device="cpu")) == "small"
    assert resolve_codec_profile(_config(data, tmp_path / "s.zarr", device="cuda")) == "fast"
    assert resolve_codec_profile(_config(data, tmp_path / "s.zarr", device="cuda", codec_profile="small")) == "small"
    fast = profile_codecs(_config(data, tmp_path / "s.zarr", codec_profile="fast", target_groups=("cls", "backbone")))
    assert fast == {"cls": "pca-std24-dct+blosc-zstd1-bitshuffle", "backbone": "int6-view+blosc-zstd1-bitshuffle"}
    # cls held only in LD's region takes the int codec: a transform codec stores every point.
    regional = profile_codecs(_config(data, tmp_path / "s.zarr", codec_profile="fast", target_groups=("cls", "box"), cls_region="ld"))
    assert regional == {"cls": "int5-view-dchw+zstd1", "box": "int6-view-dbhw+zstd1"}


def test_resume_keeps_the_codecs_the_store_was_written_with(data, local_ray, tmp_path, monkeypatch, caplog):
    import label_store.schema as schema

    store = tmp_path / "old_defaults.zarr"
    first = run_precompute(_config(data, store, max_views=4))
    assert first.views_stored == 4
    written = _store_codecs(store)
    # the defaults move on (as they did when prediction was added): the same command resumes
    monkeypatch.setitem(schema.DEFAULT_CODECS, "box", "int8-view+zstd3")
    with caplog.at_level(logging.INFO, logger="teacher_service.precompute"):
        second = run_precompute(_config(data, store))
    assert second.views_skipped == 4 and second.views_stored == 12
    assert _store_codecs(store) == written
    assert "codecs it was written with" in caplog.text
    # an explicit, different choice is still refused, naming the target
    from label_store.errors import StoreMismatchError

    with pytest.raises(StoreMismatchError, match="box/p3"):
        run_precompute(_config(data, store, codecs=(("box", "int8-view+zstd3"),)))


def test_schema_1_store_resumes_with_its_own_views(data, teacher_model, local_ray, tmp_path):
    """A store written before canvases (one non-square canvas, views fit into it) resumes as it was planned."""
    from label_store import create_store
    from label_store.maintenance import verify_store
    from label_store.reader import open_store
    from label_store.testing import write_schema_1_layout
    from teacher_service.store_layout import store_layout

    store = tmp_path / "old.zarr"
    config = _config(data, store, canvas_hw=(48, 64), codecs=FP32_CODECS_NO_BACKBONE)
    layout = store_layout(config)
    create_store(str(store), layout.fingerprint, list(layout.target_specs), canvases=[(48, 64)])
    first = run_precompute(dataclasses_replace(config, max_views=5))
    assert first.views_stored == 5
    write_schema_1_layout(str(store))
    second = run_precompute(config)
    assert (second.views_skipped, second.views_stored, second.views_left) == (5, 11, 0)
    reader = open_store(str(store))
    assert reader.schema_version == 1 and len(reader) == 16 and verify_store(str(store)).ok
    dataset = CocoDataset(data["annotations"], data["images"])
    for key in reader.keys():
        view = View.from_json(reader.record(*key)["view"])
        assert (view.canvas_h, view.canvas_w) == (48, 64)
        assert view.scale == pytest.approx(min(48 / view.image_h, 64 / view.image_w))
        expected = _direct_targets(teacher_model, render_array(dataset.load(view.image_id), view), with_backbone=False)
        np.testing.assert_allclose(reader.read(*key)["cls/p3"], expected["cls/p3"], rtol=1e-4, atol=1e-5)
