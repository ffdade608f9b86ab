"""A store of two canvases (landscape and portrait views), and stores of schema 1 still open."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from label_store import create_store, open_store
from label_store.maintenance import inspect_store, verify_store
from label_store.schema import canvas_targets
from label_store.testing import synthetic_targets, write_schema_1_layout

CANVAS = (64, 48)  # the conftest fingerprint's canvas

PORTRAIT = (CANVAS[1], CANVAS[0])


def _record(image_id: int, canvas, valid_h: int, valid_w: int) -> dict:
    view = {"image_id": image_id, "view_id": 0, "canvas_h": canvas[0], "canvas_w": canvas[1], "image_h": valid_h,
            "image_w": valid_w, "scale": 1.0, "flip": False, "offset_x": 0, "offset_y": 0}
    return {"image_id": image_id, "view_id": 0, "view": json.dumps(view), "content_hash": f"h{image_id}",
            "valid_region": (0, 0, valid_w, valid_h)}


def _fill(url, fingerprint, specs):
    store = create_store(url, fingerprint, specs, views_per_shard=2)
    expected = {}
    with store.open_part("p") as part:
        for image_id in range(1, 6):
            portrait = image_id % 2 == 0  # on the transposed canvas
            canvas = PORTRAIT if portrait else CANVAS
            canvas_specs = canvas_targets(specs, canvas)
            targets = synthetic_targets(canvas_specs, seed=image_id)
            valid = (canvas[0], canvas[1] - 8) if portrait else (canvas[0] - 16, canvas[1])
            part.append(_record(image_id, canvas, *valid), targets)
            expected[image_id] = {s.name: s.target_codec.decode(*s.target_codec.encode(targets[s.name])) for s in canvas_specs}
        part.commit()
    return store, expected


def test_one_store_holds_both_canvases(tmp_path, fingerprint, specs):
    url = str(tmp_path / "s.zarr")
    store, expected = _fill(url, fingerprint, specs)
    assert [c.canvas_hw for c in store.canvases] == [CANVAS, PORTRAIT]
    reader = open_store(url)
    assert reader.schema_version == 2 and [c.path for c in reader.canvases] == ["", f"canvas_{PORTRAIT[0]}x{PORTRAIT[1]}"]
    for image_id, want in expected.items():
        got = reader.read(image_id, 0)
        for name, array in want.items():
            assert got[name].shape == array.shape
            np.testing.assert_array_equal(got[name], array)
        assert reader.canvas_of(image_id, 0).canvas_hw == (PORTRAIT if image_id % 2 == 0 else CANVAS)
    # The two canvases' shapes differ (p3 at stride 8: 8x6 on 64x48, 6x8 on 48x64).
    assert reader.read(1, 0)["cls/p3"].shape[1:] == (8, 6) and reader.read(2, 0)["cls/p3"].shape[1:] == (6, 8)
    assert verify_store(url).ok

    # Plain zarr and pyarrow read it: one fixed chunk shape per array and canvas; the schema lists the canvases.
    import zarr

    root = zarr.open_group(url, mode="r")
    listed = root.attrs["label_store"]["canvases"]
    assert [tuple(c["canvas_hw"]) for c in listed] == [CANVAS, PORTRAIT]
    part_dir = reader._parts[0].part_dir
    first = zarr.open_array(f"{url}/parts/{part_dir}/cls/p3", mode="r")
    second = zarr.open_array(f"{url}/parts/{part_dir}/canvas_48x64/cls/p3", mode="r")
    assert first.shape == (3, 3, 8, 6) and first.chunks == (1, 3, 8, 6)
    assert second.shape == (2, 3, 6, 8) and second.chunks == (1, 3, 6, 8)
    (manifest,) = (tmp_path / "s.zarr" / "manifest" / "parts").glob("*.parquet")
    table = pq.read_table(manifest)
    assert table.column("canvas").to_pylist() == [0, 1, 0, 1, 0] and table.column("row").to_pylist() == [0, 0, 1, 1, 2]
    view = json.loads(table.column("view")[1].as_py())
    assert {"image_id", "view_id", "image_h", "image_w", "scale", "flip", "canvas_h", "canvas_w", "offset_x", "offset_y"} <= set(view)
    assert (view["canvas_h"], view["canvas_w"]) == PORTRAIT


def test_inspect_shows_views_bytes_and_padding_per_canvas(tmp_path, fingerprint, specs, capsys):
    url = str(tmp_path / "s.zarr")
    _fill(url, fingerprint, specs)
    info = inspect_store(url)
    json.dumps(info)
    by_canvas = {tuple(c["canvas_hw"]): c for c in info["canvases"]}
    assert by_canvas[CANVAS]["views"] == 3 and by_canvas[PORTRAIT]["views"] == 2
    assert by_canvas[CANVAS]["bytes_per_view"] > 0 and by_canvas[PORTRAIT]["bytes_per_view"] > 0
    # Views on 64x48 leave the bottom 16 of 64 rows as padding: ~a quarter of the cells.
    assert 0.15 < by_canvas[CANVAS]["padding_share"] < 0.35
    # Views on 48x64 leave the right 8 of 64 columns: ~an eighth (the last p5 column is partly valid).
    assert 0.05 < by_canvas[PORTRAIT]["padding_share"] < 0.3
    assert min(c["padding_share"] for c in info["canvases"]) < info["padding_share"] < max(c["padding_share"] for c in info["canvases"])
    from label_store.cli import _print_inspect

    _print_inspect(info)
    out = capsys.readouterr().out
    assert "canvas 64x48" in out and "canvas 48x64" in out and "encode padding" in out


def test_views_off_the_store_canvases_are_refused(tmp_path, fingerprint, specs):
    store = create_store(str(tmp_path / "s.zarr"), fingerprint, specs)
    with store.open_part("p") as part:
        with pytest.raises(ValueError, match=r"canvases .*Got canvas 50x50 \(image_id=1, view_id=0\)"):
            part.append(_record(1, (50, 50), 40, 40), synthetic_targets(specs, seed=1))
        with pytest.raises(ValueError, match="cls/p3 of shape"):  # portrait view, landscape shapes
            part.append(_record(2, PORTRAIT, 40, 40), synthetic_targets(specs, seed=2))
    with pytest.raises(ValueError, match="canvases"):
        create_store(str(tmp_path / "t.zarr"), fingerprint, specs, canvases=[PORTRAIT])


def test_a_schema_1_store_opens_reads_verifies_and_resumes(tmp_path, fingerprint, specs, make_record, make_targets):
    url = str(tmp_path / "old.zarr")
    store = create_store(url, fingerprint, specs, views_per_shard=2)
    with store.open_part("a") as part:
        for image_id in (1, 2, 3):
            part.append(make_record(image_id), make_targets(specs, image_id))
        part.commit()
    write_schema_1_layout(url)
    raw = json.loads((tmp_path / "old.zarr" / "zarr.json").read_text())["attributes"]["label_store"]
    assert raw["schema_version"] == 1 and "canvases" not in raw
    (manifest,) = (tmp_path / "old.zarr" / "manifest" / "parts").glob("*.parquet")
    assert "canvas" not in pq.read_table(manifest).column_names

    reader = open_store(url, expected_fingerprint=fingerprint)
    assert reader.schema_version == 1 and [c.canvas_hw for c in reader.canvases] == [CANVAS]
    assert reader.views().column("canvas").to_pylist() == [0, 0, 0]
    np.testing.assert_array_equal(reader.read(2, 0)["box/p4"], open_store(url).read(2, 0)["box/p4"])
    assert verify_store(url).ok
    # Resume: the same create_store call opens it; a new part lands next to the old one.
    resumed = create_store(url, fingerprint, specs)
    assert resumed.schema_version == 1 and len(resumed.canvases) == 1
    with resumed.open_part("b") as part:
        part.append(make_record(4), make_targets(specs, 4))
        part.commit()
    reader = open_store(url)
    assert reader.keys() == [(1, 0), (2, 0), (3, 0), (4, 0)] and verify_store(url).ok
    assert inspect_store(url)["canvases"][0]["views"] == 4
