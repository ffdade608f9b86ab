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
