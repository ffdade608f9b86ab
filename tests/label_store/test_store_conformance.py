"""One conformance suite that every backend passes: a local path and S3 (moto on loopback)."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest

from label_store import (
    CorruptDataError,
    FingerprintMismatchError,
    PartExistsError,
    StoreMismatchError,
    StoreNotFoundError,
    ViewNotFoundError,
    create_store,
    encode_targets,
    gc_store,
    inspect_store,
    open_store,
    verify_store,
)
from label_store._fs import Location


def _write_part(store, part_id, keys, make_record, make_targets, seed_offset=0):
    written = {}
    with store.open_part(part_id) as part:
        for image_id, view_id in keys:
            targets = make_targets(store.targets, image_id + seed_offset, view_id)
            part.append(make_record(image_id, view_id), targets)
            written[(image_id, view_id)] = targets
        part.commit()
    return written


def _expected(spec, array):
    codec = spec.target_codec
    return codec.decode(*codec.encode(array))


def test_round_trip(backend, fingerprint, specs, make_record, make_targets):
    url, options = backend
    store = create_store(url, fingerprint, specs, views_per_shard=2, storage_options=options)
    keys = [(10, 0), (10, 1), (11, 0), (12, 0), (13, 1)]  # 5 views: two full shards and a partial one
    written = _write_part(store, "task-0", keys, make_record, make_targets)
    reader = open_store(url, expected_fingerprint=fingerprint, storage_options=options)
    assert len(reader) == 5 and reader.keys() == sorted(keys)
    assert reader.parts == ["task-0"]
    assert reader.fingerprint == fingerprint and list(reader.targets) == specs
    record = reader.record(11, 0)
    assert record["valid_region"] == (0, 0, 48, 56) and record["part"] == "task-0"
    assert json.loads(record["view"])["image_id"] == 11 and record["content_hash"] == "hash-11"
    for key in keys:
        got = reader.read(*key)
        assert list(got) == [s.name for s in specs]
        for spec in specs:
            assert got[spec.name].dtype == np.float32 and got[spec.name].shape == spec.shape
            assert np.array_equal(got[spec.name], _expected(spec, written[key][spec.name]))
    batch = reader.read_many([(13, 1), (10, 0)], names=["box/p4", "cls/p3"])
    assert list(batch[0]) == ["box/p4", "cls/p3"]
    assert np.array_equal(batch[0]["box/p4"], _expected(specs[4], written[(13, 1)]["box/p4"]))
    assert np.array_equal(batch[1]["cls/p3"], _expected(specs[0], written[(10, 0)]["cls/p3"]))
    # the stored bytes are exactly the online endpoint's encoding of the same targets
    assert reader.read_blob(12, 0) == encode_targets(written[(12, 0)], specs)
    table = reader.views()
    assert table.num_rows == 5 and set(table.column_names) >= {"image_id", "view_id", "view", "content_hash", "valid_region", "checksum", "part"}
    with pytest.raises(ViewNotFoundError, match="image_id=99"):
        reader.read(99, 0)
    with pytest.raises(ValueError, match="names"):
        reader.read(10, 0, names=["cls/p9"])
    fidelity = reader.fidelity
    assert set(fidelity["targets"]) == {s.name for s in specs}
    assert fidelity["targets"]["box/p3"]["views"] == 2  # the first two views of the part are measured
    assert 0 < fidelity["targets"]["box/p3"]["max_abs_error"] < 0.5
    assert set(fidelity["groups"]) == {"cls", "box", "fpn"}


def test_invisible_until_commit(backend, fingerprint, specs, make_record, make_targets):
    url, options = backend
    store = create_store(url, fingerprint, specs, views_per_shard=1, storage_options=options)
    part = store.open_part("p")
    part.append(make_record(1), make_targets(specs, 1))  # one view per shard: its arrays are on storage now
    before = open_store(url, storage_options=options)
    assert len(before) == 0 and store.committed_keys() == set()
    part.commit()
    assert len(before) == 0  # a reader is a snapshot
    assert before.refresh().keys() == [(1, 0)]
    assert store.committed_keys() == {(1, 0)}
    assert store.is_committed("p") and store.committed_parts() == ["p"]


def test_abort_leaves_nothing(backend, fingerprint, specs, make_record, make_targets):
    url, options = backend
    store = create_store(url, fingerprint, specs, views_per_shard=1, storage_options=options)
    with pytest.raises(RuntimeError, match="teacher crashed"):
        with store.open_part("p") as part:
            part.append(make_record(1), make_targets(specs, 1))
            raise RuntimeError("teacher crashed")
    location = Location(url, options)
    location.refresh()
    assert not location.fs.exists(location.path("parts", part.part_dir))
    assert len(open_store(url, storage_options=options)) == 0


def test_fingerprint_mismatch_names_both_values(backend, fingerprint, specs, make_record, make_targets):
    url, options = backend
    create_store(url, fingerprint, specs, storage_options=options)
    other = dataclasses.replace(fingerprint, canvas_hw=(320, 320), checkpoint_sha256="cd" * 32)
    with pytest.raises(FingerprintMismatchError) as raised:
        open_store(url, expected_fingerprint=other, storage_options=options)
    message = str(raised.value)
    assert "canvas_hw: store has (64, 48), caller expects (320, 320)" in message
    assert "ab" * 32 in message and "cd" * 32 in message
    assert isinstance(raised.value, ValueError)
    assert len(open_store(url, expected_fingerprint=fingerprint.to_dict(), storage_options=options)) == 0


def test_create_refuses_other_teacher_or_targets(backend, fingerprint, specs):
    url, options = backend
    create_store(url, fingerprint, specs, storage_options=options)
    with pytest.raises(StoreMismatchError, match="reg_max: store has 7, caller expects 9") as raised:
        other = dataclasses.replace(fingerprint, reg_max=9)
        create_store(url, other, [s if s.group != "box" else dataclasses.replace(s, shape=(40, *s.shape[1:])) for s in specs], storage_options=options)
    assert "new store path" in str(raised.value)
    changed = [dataclasses.replace(s, codec="fp16") if s.name == "fpn/p4" else s for s in specs]
    stored_codec = re.escape(next(s.codec for s in specs if s.name == "fpn/p4"))
    with pytest.raises(StoreMismatchError, match=f"target fpn/p4: store has .* codec {stored_codec}, caller expects .* codec fp16"):
        create_store(url, fingerprint, changed, storage_options=options)
    with pytest.raises(StoreMismatchError, match="target fpn/p5: store has"):
        create_store(url, fingerprint, specs[:-1], storage_options=options)
    with pytest.raises(FileExistsError):
        create_store(url, fingerprint, specs, exist_ok=False, storage_options=options)
    again = create_store(url, fingerprint, list(reversed(specs)), storage_options=options)
    assert list(again.targets) == specs  # the store's order is kept


def test_missing_store_and_bad_shapes(backend, fingerprint, specs):
    url, options = backend
    with pytest.raises(StoreNotFoundError):
        open_store(url, storage_options=options)
    wrong = [dataclasses.replace(specs[0], shape=(3, 9, 6))] + specs[1:]
    with pytest.raises(ValueError, match=r"cls/p3 of shape \(3, 8, 6\)"):
        create_store(url, fingerprint, wrong, storage_options=options)


def test_duplicate_views_first_commit_wins(backend, fingerprint, specs, make_record, make_targets):
    url, options = backend
    store = create_store(url, fingerprint, specs, storage_options=options)
    first = _write_part(store, "a", [(1, 0), (2, 0)], make_record, make_targets)
    _write_part(store, "b", [(2, 0), (3, 0)], make_record, make_targets, seed_offset=500)
    reader = open_store(url, storage_options=options)
    assert reader.keys() == [(1, 0), (2, 0), (3, 0)]
    assert reader.record(2, 0)["part"] == "a"
    assert np.array_equal(reader.read(2, 0)["cls/p3"], _expected(specs[0], first[(2, 0)]["cls/p3"]))
    assert inspect_store(url, storage_options=options)["duplicate_views"] == 1
    with store.open_part("c") as part:
        part.append(make_record(5), make_targets(specs, 5))
        with pytest.raises(ValueError, match="each view once per part"):
            part.append(make_record(5), make_targets(specs, 5))


def test_part_commits_once(backend, fingerprint, specs, make_record, make_targets):
    url, options = backend
    store = create_store(url, fingerprint, specs, storage_options=options)
    first, second = store.open_part("t"), store.open_part("t")  # a task and its retry
    first.append(make_record(1), make_targets(specs, 1))
    second.append(make_record(1), make_targets(specs, 1))
    first.commit()
    with pytest.raises(PartExistsError):
        second.commit()
    with pytest.raises(PartExistsError):
        store.open_part("t")
    reader = open_store(url, storage_options=options)
    assert reader.keys() == [(1, 0)] and reader.parts == ["t"]
    assert gc_store(url, older_than_s=0, storage_options=options) == []  # the loser cleaned up after itself


def test_failures_table(backend, fingerprint, specs, make_record, make_targets):
    url, options = backend
    store = create_store(url, fingerprint, specs, storage_options=options)
    store.record_failures([{"image_id": 7, "view_id": 0, "reason": "image unreadable"}, {"image_id": 8, "view_id": 1, "reason": "NaN in cls/p3"}])
    store.record_failures([{"image_id": 9, "view_id": -1, "reason": "file missing"}])
    assert store.failures() == [
        {"image_id": 7, "view_id": 0, "reason": "image unreadable"},
        {"image_id": 8, "view_id": 1, "reason": "NaN in cls/p3"},
        {"image_id": 9, "view_id": -1, "reason": "file missing"},
    ]
    _write_part(store, "retry", [(8, 1)], make_record, make_targets)
    assert [f["image_id"] for f in store.failures()] == [7, 9]
    assert len(store.failures(include_resolved=True)) == 3
    info = inspect_store(url, storage_options=options)
    assert info["failures"] == store.failures()
    with pytest.raises(ValueError, match="reason"):
        store.record_failures([{"image_id": 1, "view_id": 0}])


def _shard_file(url, options, part_dir, target):
    location = Location(url, options)
    return location, location.path("parts", part_dir, target, "c", "0", "0", "0", "0")


def test_verify_catches_flipped_byte_and_truncation(backend, fingerprint, specs, make_record, make_targets):
    url, options = backend
    store = create_store(url, fingerprint, specs, views_per_shard=4, storage_options=options)
    keys = [(i, 0) for i in range(6)]  # shard 0: rows 0-3, shard 1: rows 4-5
    _write_part(store, "p", keys, make_record, make_targets)
    assert verify_store(url, storage_options=options).ok
    reader = open_store(url, storage_options=options)
    part_dir = reader._parts[0].part_dir
    location, path = _shard_file(url, options, part_dir, "fpn/p3")
    data = bytearray(location.fs.cat_file(path))
    index = np.frombuffer(bytes(data[-(16 * 4 + 4) : -4]), "<u8").reshape(4, 2)
    row = reader.record(2, 0)["row"]
    data[int(index[row, 0]) + int(index[row, 1]) // 2] ^= 0x5A
    location.fs.pipe_file(path, bytes(data))
    report = verify_store(url, storage_options=options)
    assert not report.ok and report.checked_views == 6
    assert [(b["image_id"], b["view_id"]) for b in report.bad_views] == [(2, 0)]
    assert "crc32c" in report.bad_views[0]["reason"] and "fpn/p3" in report.bad_views[0]["reason"]
    fresh = open_store(url, storage_options=options)
    with pytest.raises(CorruptDataError, match="image_id=2"):
        fresh.read(2, 0)
    assert fresh.read(3, 0)["fpn/p3"].shape == specs[6].shape  # the rest of the shard still reads

    location, path = _shard_file(url, options, part_dir, "box/p4")
    data = location.fs.cat_file(path)
    location.fs.pipe_file(path, data[: len(data) // 2])
    report = verify_store(url, storage_options=options)
    bad = {(b["image_id"], b["view_id"]): b["reason"] for b in report.bad_views}
    assert set(bad) == {(0, 0), (1, 0), (2, 0), (3, 0)}  # every view of the truncated shard
    assert "index" in bad[(0, 0)] and "box/p4" in bad[(0, 0)]


def test_gc_removes_only_uncommitted(backend, fingerprint, specs, make_record, make_targets):
    url, options = backend
    store = create_store(url, fingerprint, specs, views_per_shard=1, storage_options=options)
    _write_part(store, "done", [(1, 0)], make_record, make_targets)
    crashed = store.open_part("crashed")
    crashed.append(make_record(2), make_targets(specs, 2))  # arrays written, never committed
    assert gc_store(url, storage_options=options) == []  # its writer (this process) is alive and recent
    assert gc_store(url, older_than_s=0, dry_run=True, storage_options=options) == [crashed.part_dir]
    assert inspect_store(url, storage_options=options)["uncommitted_parts"] == 1
    assert gc_store(url, older_than_s=0, storage_options=options) == [crashed.part_dir]
    assert gc_store(url, older_than_s=0, storage_options=options) == []
    info = inspect_store(url, storage_options=options)
    assert info["uncommitted_parts"] == 0 and info["views"] == 1
    assert verify_store(url, storage_options=options).ok


def test_inspect_document(backend, fingerprint, specs, make_record, make_targets):
    url, options = backend
    store = create_store(url, fingerprint, specs, views_per_shard=2, storage_options=options)
    _write_part(store, "a", [(1, 0), (1, 1), (2, 0)], make_record, make_targets)
    store.record_failures([{"image_id": 3, "view_id": 0, "reason": "decode error"}])
    info = inspect_store(url, storage_options=options)
    json.dumps(info)  # JSON-able
    assert info["views"] == 3 and info["images"] == 2 and info["parts"] == 1
    assert info["failures"] == [{"image_id": 3, "view_id": 0, "reason": "decode error"}]
    assert info["schema_version"] == 2 and info["teacher"] == fingerprint.to_dict()
    assert info["bytes_on_disk"] > info["bytes_committed"] > 0
    assert info["fp32_bytes_per_view"] == sum(s.fp32_nbytes for s in specs)
    by_name = {t["name"]: t for t in info["targets"]}
    assert by_name["fpn/p3"]["codec"] == specs[6].codec
    assert by_name["fpn/p3"]["ratio_vs_fp32"] > 1.5
    assert {g["group"] for g in info["groups"]} == {"cls", "box", "fpn"}
    assert info["fidelity"]["targets"]["cls/p3"]["views"] == 2
