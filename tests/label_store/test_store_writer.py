"""PartWriter input checks and state rules (local backend; the conformance suite covers both)."""

from __future__ import annotations

import numpy as np
import pytest

from label_store import PartStateError, create_store, open_store


@pytest.fixture
def store(tmp_path, fingerprint, specs):
    return create_store(str(tmp_path / "store.zarr"), fingerprint, specs, views_per_shard=2)


def test_bad_inputs_raise_and_leave_the_part_usable(store, specs, make_record, make_targets):
    part = store.open_part("p")
    targets = make_targets(specs, 1)
    with pytest.raises(ValueError, match="exactly the keys"):
        part.append({**make_record(1), "extra": 1}, targets)
    with pytest.raises(ValueError, match=r"valid_region.*image_id=1"):
        part.append({**make_record(1), "valid_region": (0, 0, 49, 10)}, targets)
    with pytest.raises(ValueError, match="JSON object"):
        part.append({**make_record(1), "view": "not json"}, targets)
    with pytest.raises(ValueError, match="image_id an int"):
        part.append({**make_record(1), "image_id": -3}, targets)
    nan = {name: array.copy() for name, array in targets.items()}
    nan["box/p4"][0, 0, 0] = np.inf
    with pytest.raises(ValueError, match=r"image_id=1.*finite values in box/p4"):
        part.append(make_record(1), nan)
    with pytest.raises(ValueError, match="of shape"):
        part.append(make_record(1), {**targets, "cls/p3": targets["cls/p3"][None]})
    part.append({**make_record(1), "view": {"scale": 1.0}}, targets)  # a dict view is serialised
    assert part.num_views == 1
    result = part.commit()
    assert result["num_views"] == 1 and result["part_id"] == "p"
    assert open_store(store.url).record(1, 0)["view"] == '{"scale": 1.0}'
    with pytest.raises(PartStateError, match="already committed"):
        part.append(make_record(2), targets)
    with pytest.raises(PartStateError):
        part.abort()


@pytest.mark.parametrize("part_id", ["", "a/b", "x" * 129, "dots.are.reserved", 7])
def test_part_id_validation(store, part_id):
    with pytest.raises(ValueError, match="part_id"):
        store.open_part(part_id)


def test_empty_part_and_no_fidelity_sample(store, specs, make_record, make_targets):
    with store.open_part("empty") as part:
        part.commit()
    with store.open_part("unmeasured", fidelity_views=0) as part:
        part.append(make_record(4), make_targets(specs, 4))
        part.commit()
    reader = open_store(store.url)
    assert reader.parts == ["empty", "unmeasured"] and len(reader) == 1
    assert reader.fidelity == {"targets": {}, "groups": {}}


def test_fidelity_sample_counts_first_views(store, specs, make_record, make_targets):
    with store.open_part("p", fidelity_views=3) as part:
        for image_id in range(5):
            part.append(make_record(image_id), make_targets(specs, image_id))
        part.commit()
    fidelity = open_store(store.url).fidelity
    assert {row["views"] for row in fidelity["targets"].values()} == {3}
    for spec in specs:
        row = fidelity["targets"][spec.name]
        assert row["codec"] == spec.codec
        assert 0 < row["mean_abs_error"] <= row["max_abs_error"]
        assert row["loss_rel_error"] < 0.05


def _quantize(spec, array):
    """A `QuantizedTarget` as a teacher-side quantizer sends it: the codec's plain codes (no prediction)."""
    import dataclasses

    from label_store import QuantizedTarget

    return QuantizedTarget(*dataclasses.replace(spec.target_codec, predict="").encode(array))


def test_quantized_inputs_store_the_same_bytes_as_floats(tmp_path, fingerprint, specs, make_record, make_targets):
    assert all(spec.target_codec.quantized for spec in specs)  # the defaults: every target quantized
    from_floats = create_store(str(tmp_path / "floats.zarr"), fingerprint, specs, views_per_shard=2)
    from_codes = create_store(str(tmp_path / "codes.zarr"), fingerprint, specs, views_per_shard=2)
    with from_floats.open_part("p") as a, from_codes.open_part("p") as b:
        for image_id in range(3):
            targets = make_targets(specs, image_id)
            a.append(make_record(image_id), targets)
            quantized = {spec.name: _quantize(spec, targets[spec.name]) for spec in specs}
            mixed = {**quantized, specs[0].name: targets[specs[0].name]}  # floats and codes may mix
            # the first view without originals: not sampled; the next two with them
            b.append(make_record(image_id), mixed, originals=None if image_id == 0 else targets)
        a.commit()
        b.commit()
    x, y = open_store(from_floats.url), open_store(from_codes.url)
    assert sorted(x.keys()) == sorted(y.keys())
    for key in x.keys():
        assert x.record(*key)["checksum"] == y.record(*key)["checksum"]
        for name, array in x.read(*key).items():
            np.testing.assert_array_equal(array, y.read(*key)[name])
    sampled = {row["views"] for row in y.fidelity["targets"].values()}
    assert sampled == {2} and {row["views"] for row in x.fidelity["targets"].values()} == {2}


def test_quantized_inputs_are_checked(store, specs, make_record, make_targets):
    from label_store import QuantizedTarget, TargetSpec

    targets = make_targets(specs, 1)
    spec = specs[0]
    good = _quantize(spec, targets[spec.name])
    part = store.open_part("p")
    bits = spec.target_codec.bits
    bad = {
        "uint8": QuantizedTarget(good.codes.astype(np.int16), good.scale, good.offset),
        "shape": QuantizedTarget(good.codes[:, :1], good.scale, good.offset),
        f"in \\[0, {(1 << bits) - 1}\\]": QuantizedTarget(np.full_like(good.codes, 1 << bits), good.scale, good.offset),
        "scale as a float array of shape": QuantizedTarget(good.codes, np.ones(3, np.float32), good.offset),
        "finite non-negative": QuantizedTarget(good.codes, -good.scale - 1, good.offset),
        "finite .*offset": QuantizedTarget(good.codes, good.scale, np.full_like(good.offset, np.nan)),
    }
    for match, value in bad.items():
        with pytest.raises(ValueError, match=match) as error:
            part.append(make_record(1), {**targets, spec.name: value})
        assert "image_id=1" in str(error.value) and spec.name in str(error.value)
    with pytest.raises(ValueError, match="unexpected"):
        part.append(make_record(1), {**targets, "cls/p9": good})
    assert part.num_views == 0
    part.append(make_record(1), {**targets, spec.name: good})  # still usable
    part.abort()
    fp16 = [TargetSpec(s.name, s.shape, "fp16") for s in specs]
    with create_store(store.url + "-fp16", store.fingerprint, fp16).open_part("q") as other:
        with pytest.raises(ValueError, match="does not quantize"):
            other.append(make_record(1), {**targets, spec.name: good})
