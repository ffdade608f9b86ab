"""Region storage (`label_store.StoreRegion`): box (and cls) targets kept only at the points LD reads."""

from __future__ import annotations

import numpy as np
import pytest

from label_store import create_store, open_store
from label_store.errors import SchemaVersionError, StoreMismatchError
from label_store.schema import REGION_SCHEMA_VERSION, SCHEMA_VERSION, StoreRegion

CANVAS = (64, 48)  # the conftest fixtures' canvas and strides
STRIDES = (8, 16, 32)

REGION = StoreRegion(("box",), topk=9, vlr_alpha=0.25)
NUM_POINTS = sum(-(-CANVAS[0] // s) * -(-CANVAS[1] // s) for s in STRIDES)


def _mask(seed: int, share: float = 0.3) -> np.ndarray:
    """Scattered points (every layout must round-trip)."""
    return np.random.default_rng(seed).random(NUM_POINTS) < share


def _block_mask(seed: int) -> np.ndarray:
    """One rectangle of points per level, as the region of an object."""
    rng = np.random.default_rng(seed)
    levels = []
    for stride in STRIDES:
        h, w = -(-CANVAS[0] // stride), -(-CANVAS[1] // stride)
        level = np.zeros((h, w), bool)
        y, x = rng.integers(0, h), rng.integers(0, w)
        level[y : y + max(1, h // 3), x : x + max(1, w // 3)] = True
        levels.append(level.reshape(-1))
    return np.concatenate(levels)


def _level_masks(mask: np.ndarray) -> dict[str, np.ndarray]:
    out, start = {}, 0
    for stride in STRIDES:
        h, w = -(-CANVAS[0] // stride), -(-CANVAS[1] // stride)
        out[f"p{stride.bit_length() - 1}"] = mask[start : start + h * w].reshape(h, w)
        start += h * w
    return out


def _fill(url, fingerprint, specs, make_record, make_targets, region, masks):
    store = create_store(url, fingerprint, specs, region=region)
    with store.open_part("p0") as part:
        for image_id, mask in enumerate(masks):
            part.append(make_record(image_id), make_targets(specs, image_id), region=mask)
        part.commit()
    return open_store(url)


@pytest.mark.parametrize("groups", [("box",), ("cls",), ("cls", "box")])
def test_region_store_reads_back_the_dense_values_inside_and_nan_outside(tmp_path, fingerprint, specs, make_record, make_targets, groups):
    region = StoreRegion(groups, topk=9, vlr_alpha=0.25)
    masks = [_mask(0), _mask(1), None]  # None: every point (e.g. dense targets from the endpoint)
    dense = _fill(str(tmp_path / "dense.zarr"), fingerprint, specs, make_record, make_targets, None, [None] * 3)
    sparse = _fill(str(tmp_path / "region.zarr"), fingerprint, specs, make_record, make_targets, region, masks)
    assert dense.schema_version == SCHEMA_VERSION and dense.region is None
    assert sparse.schema_version == REGION_SCHEMA_VERSION and sparse.region == region
    for image_id, mask in enumerate(masks):
        expected = dense.read(image_id, 0)
        got = sparse.read(image_id, 0)
        stored = sparse.read_regions([(image_id, 0)])[0]
        np.testing.assert_array_equal(stored, np.ones(NUM_POINTS, bool) if mask is None else mask)
        for name, value in got.items():
            if name.split("/")[0] not in groups:
                np.testing.assert_array_equal(value, expected[name])  # other groups stay dense, bit for bit
                continue
            keep = _level_masks(stored)[name.split("/")[1]]
            np.testing.assert_array_equal(value[:, keep], expected[name][:, keep])  # bit-identical inside
            assert np.isnan(value[:, ~keep]).all()
    assert dense.read_regions([(0, 0)])[0].all()
    shares = [m.mean() for m in masks[:2]] + [1.0]
    assert sparse.region_share() == pytest.approx(float(np.mean(shares)))
    assert dense.region_share() is None


def test_region_store_is_smaller_and_its_checksums_verify(tmp_path, fingerprint, specs, make_record, make_targets):
    from label_store.maintenance import inspect_store, verify_store

    masks = [_block_mask(i) for i in range(4)]
    dense = _fill(str(tmp_path / "dense.zarr"), fingerprint, specs, make_record, make_targets, None, [None] * 4)
    sparse = _fill(str(tmp_path / "region.zarr"), fingerprint, specs, make_record, make_targets, REGION, masks)
    dense_groups = {g["group"]: g for g in inspect_store(dense.url)["groups"]}
    info = inspect_store(sparse.url)
    sparse_groups = {g["group"]: g for g in info["groups"]}
    assert sparse_groups["box"]["stored_bytes_per_view"] < 0.5 * dense_groups["box"]["stored_bytes_per_view"]
    assert sparse_groups["box"]["region_share"] == pytest.approx(float(np.mean([m.mean() for m in masks])))
    assert sparse_groups["cls"]["region_share"] == 1.0 and dense_groups["box"]["region_share"] == 1.0
    assert info["region"] == REGION.to_dict()
    assert verify_store(sparse.url).ok


def test_a_cls_region_shows_its_share_and_the_box_stays_dense(tmp_path, fingerprint, specs, make_record, make_targets):
    from label_store.maintenance import inspect_store

    masks = [_block_mask(i) for i in range(4)]
    dense = _fill(str(tmp_path / "dense.zarr"), fingerprint, specs, make_record, make_targets, None, [None] * 4)
    sparse = _fill(
        str(tmp_path / "region.zarr"), fingerprint, specs, make_record, make_targets, StoreRegion(("cls",), 9, 0.25), masks
    )
    dense_groups = {g["group"]: g for g in inspect_store(dense.url)["groups"]}
    sparse_groups = {g["group"]: g for g in inspect_store(sparse.url)["groups"]}
    assert sparse_groups["cls"]["region_share"] == pytest.approx(float(np.mean([m.mean() for m in masks])))
    assert sparse_groups["box"]["region_share"] == 1.0
    assert sparse_groups["box"]["stored_bytes_per_view"] == dense_groups["box"]["stored_bytes_per_view"]


def test_a_reader_that_does_not_know_a_region_group_refuses_the_store(tmp_path, fingerprint, specs, monkeypatch):
    import label_store.schema as schema
    from label_store.errors import StoreFormatError

    url = str(tmp_path / "s.zarr")
    create_store(url, fingerprint, specs, region=StoreRegion(("cls", "box"), 9, 0.25))
    assert open_store(url).region.groups == ("cls", "box")
    monkeypatch.setattr(schema, "REGION_GROUPS", ("box", "edges"))  # a reader from before cls regions
    with pytest.raises(StoreFormatError, match=r"StoreRegion\(groups=\).*'cls'"):
        open_store(url)


def test_region_settings_are_part_of_the_store_identity(tmp_path, fingerprint, specs):
    url = str(tmp_path / "s.zarr")
    create_store(url, fingerprint, specs, region=REGION)
    with pytest.raises(StoreMismatchError, match="region: store has box at ATSS positives"):
        create_store(url, fingerprint, specs)
    with pytest.raises(StoreMismatchError, match="alpha >= 0.5"):
        create_store(url, fingerprint, specs, region=StoreRegion(("box",), topk=9, vlr_alpha=0.5))
    assert create_store(url, fingerprint, specs, region=REGION).region == REGION


def test_region_mask_is_checked(tmp_path, fingerprint, specs, make_record, make_targets):
    dense = create_store(str(tmp_path / "d.zarr"), fingerprint, specs)
    with dense.open_part("p") as part, pytest.raises(ValueError, match="expects None for a store without region"):
        part.append(make_record(0), make_targets(specs, 0), region=_mask(0))
    sparse = create_store(str(tmp_path / "r.zarr"), fingerprint, specs, region=REGION)
    with sparse.open_part("p") as part, pytest.raises(ValueError, match=rf"bool array\[{NUM_POINTS}\].*image_id=0"):
        part.append(make_record(0), make_targets(specs, 0), region=np.ones(NUM_POINTS - 1, bool))


def test_store_region_validates_and_round_trips():
    assert StoreRegion.from_dict(REGION.to_dict()) == REGION
    for bad in ({"groups": ("fpn",)}, {"topk": 0}, {"vlr_alpha": 0.0}, {"vlr_diou": "x"}, {"point_offset": 1.0}):
        with pytest.raises(ValueError, match="StoreRegion"):
            StoreRegion(**{**REGION.to_dict(), **bad})


def test_a_reader_that_does_not_know_region_storage_refuses_it(tmp_path, fingerprint, specs, monkeypatch):
    import label_store._manifest as manifest

    url = str(tmp_path / "s.zarr")
    create_store(url, fingerprint, specs, region=REGION)
    monkeypatch.setattr(manifest, "READABLE_SCHEMA_VERSIONS", (1, 2, 3))  # a reader from before the points layout
    with pytest.raises(SchemaVersionError, match="upgrade label_store"):
        open_store(url)


@pytest.mark.parametrize("layout", ["points", "channels"])
@pytest.mark.parametrize(
    "codec", ["int6-view-dbhw+zstd15", "int5-view-dchw", "int8-channel-dhw+zstd3", "int6-std4-dh", "int7-view", "fp16", "fp32"]
)
def test_region_layout_round_trips_every_codec(codec, layout):
    from label_store.codecs import parse_codec

    rng = np.random.default_rng(3)
    x = rng.normal(0, 3, size=(8, 6, 5)).astype(np.float32)
    keep = rng.random((6, 5)) < 0.4
    count = int(keep.sum())
    target = parse_codec(codec)
    dense = target.decode(*target.encode(x))
    codes, scale, offset = target.encode(x, keep, layout)
    assert codes.shape == x.shape
    if layout == "points":  # each kept point's 8 values together, then zeros
        assert not codes.reshape(-1)[8 * count :].any()
    else:  # each channel's kept points, past the drop to zero the channel is zeros
        assert not codes.reshape(8, -1)[:, count + 1 :].any()
    region = target.decode(codes, scale, offset, keep, layout)
    np.testing.assert_array_equal(region[:, keep], dense[:, keep])
    assert np.isnan(region[:, ~keep]).all()
    other = "channels" if layout == "points" else "points"
    assert not np.array_equal(target.decode(codes, scale, offset, keep, other)[:, keep], dense[:, keep])


def test_schema_3_region_stores_keep_their_layout_when_read_and_resumed(tmp_path, fingerprint, specs, make_record, make_targets, monkeypatch):
    import label_store.writer as writer

    url = str(tmp_path / "old.zarr")
    dense = _fill(str(tmp_path / "dense.zarr"), fingerprint, specs, make_record, make_targets, None, [None] * 4)
    with monkeypatch.context() as patch:  # a store written before the points layout
        patch.setattr(writer, "REGION_SCHEMA_VERSION", 3)
        old = _fill(url, fingerprint, specs, make_record, make_targets, REGION, [_mask(0), _mask(1)])
    assert old.schema_version == 3
    resumed = create_store(url, fingerprint, specs, region=REGION)  # today's writer, the old store
    with resumed.open_part("p1") as part:
        for image_id in (2, 3):
            part.append(make_record(image_id), make_targets(specs, image_id), region=_mask(image_id))
        part.commit()
    reader = open_store(url)
    assert reader.schema_version == 3
    for image_id in range(4):
        keep = _level_masks(_mask(image_id))
        got, want = reader.read(image_id, 0), dense.read(image_id, 0)
        for name, value in got.items():
            level = name.split("/")[-1]
            if name.startswith("box/"):
                np.testing.assert_array_equal(value[:, keep[level]], want[name][:, keep[level]])
                assert np.isnan(value[:, ~keep[level]]).all()
            else:
                np.testing.assert_array_equal(value, want[name])


def test_the_points_layout_stores_box_regions_in_fewer_bytes():
    from label_store.codecs import parse_codec

    rng = np.random.default_rng(5)
    # Box-like targets: 4 edges x 17 bins of smooth logits whose shape drifts slowly across the map.
    bins = np.linspace(-3, 3, 17)
    centre = rng.normal(0, 1, size=(4, 1, 1)) + np.cumsum(rng.normal(0, 0.1, size=(4, 24, 20)), axis=2)
    x = (-((bins[None, :, None, None] - centre[:, None]) ** 2)).reshape(68, 24, 20).astype(np.float32)
    keep = np.zeros((24, 20), bool)
    keep[4:14, 3:15] = True
    codec = parse_codec("int6-view-dbhw+zstd15")
    sizes = {layout: codec.compressed_nbytes(codec.encode(x, keep, layout)[0]) for layout in ("points", "channels")}
    assert sizes["points"] < sizes["channels"]
