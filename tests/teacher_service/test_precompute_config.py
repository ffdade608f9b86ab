"""`teacher_service.precompute_config`: validation and the block size of a part.
"""

from __future__ import annotations

import pytest

from teacher_service.precompute import PrecomputeInputError

from precompute_fixtures import (  # noqa: F401  (fixtures are found by name)
    _config,
    data,
)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"annotations": "/nonexistent.json"}, "annotations="),
        ({"images_dir": "/nonexistent-dir"}, "images_dir="),
        ({"scales": (1.5,)}, "scales="),
        ({"target_groups": ("cls", "logits")}, "target_groups="),
        ({"batch_size": 0}, "batch_size="),
        ({"precision": "fp8"}, "precision="),
        ({"quantize_on_device": "yes"}, "quantize_on_device="),
        ({"codec_profile": "tiny"}, "codec-profile"),
        ({"canvas_hw": (64, 0)}, "canvas_hw="),
        ({"box_region": "positives"}, "box-region"),
        ({"box_region": "ld", "target_groups": ("cls", "fpn")}, "expects 'box' among the target groups"),
        ({"box_region": "ld", "region_vlr_alpha": 0.0}, "region-vlr-alpha"),
        ({"cls_region": "positives"}, "cls-region"),
        ({"cls_region": "ld", "target_groups": ("box", "fpn")}, r"\(--cls-region ld\) expects 'cls' among the target groups"),
        ({"cls_region": "ld", "region_topk": 0}, "region-topk"),
    ],
)
def test_config_validation(data, tmp_path, overrides, match):
    with pytest.raises(PrecomputeInputError, match=match):
        _config(data, tmp_path / "s.zarr", **overrides).validate()


@pytest.mark.parametrize(
    "cls_region, box_region, groups", [("ld", "dense", ("cls",)), ("ld", "ld", ("cls", "box")), ("dense", "ld", ("box",))]
)
def test_the_store_region_holds_the_groups_asked_for(data, tmp_path, cls_region, box_region, groups):
    config = _config(data, tmp_path / "s.zarr", cls_region=cls_region, box_region=box_region, region_topk=7)
    config.validate()
    region = config.store_region()
    assert (region.groups, region.topk, region.vlr_alpha) == (groups, 7, 0.25)
    assert _config(data, tmp_path / "s.zarr").store_region() is None


@pytest.mark.parametrize(
    "batch_size, views_per_part, expected",
    [(8, 32, 32), (3, 4, 6), (64, 32, 64), (1, 1, 1)],
)
def test_block_views_is_a_part_in_whole_forward_batches(data, tmp_path, batch_size, views_per_part, expected):
    config = _config(data, tmp_path / "s.zarr", batch_size=batch_size, views_per_part=views_per_part)
    assert config.block_views == expected
    assert config.block_views % batch_size == 0 and config.block_views >= views_per_part
