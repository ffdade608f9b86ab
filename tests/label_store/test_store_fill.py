"""`StoreFiller`: fetched views committed as ``endpoint`` parts, each view once, crashes invisible."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from label_store import StoreFiller, create_store, gc_store, inspect_store, open_store, verify_store
from label_store.errors import FingerprintMismatchError
from label_store.testing import synthetic_targets

REPO_ROOT = Path(__file__).resolve().parents[2]


def _view(make_record, specs, image_id, view_id=0):
    return make_record(image_id, view_id), synthetic_targets(specs, seed=image_id * 1000 + view_id)


def test_parts_of_n_views_with_endpoint_origin(tmp_path, fingerprint, specs, make_record):
    url = str(tmp_path / "store.zarr")
    store = create_store(url, fingerprint, specs)
    with store.open_part("precomputed") as part:
        for image_id in (1, 2):
            part.append(*_view(make_record, specs, image_id))
        part.commit()

    filler = StoreFiller(url, expected_fingerprint=fingerprint, part_views=2)
    assert filler.add(*_view(make_record, specs, 3))
    assert filler.pending == 1 and open_store(url).keys() == [(1, 0), (2, 0)]  # buffered, not visible yet
    assert not filler.add(*_view(make_record, specs, 3))  # the same view twice is buffered once
    filler.add(*_view(make_record, specs, 4))  # the part is full: committed
    assert filler.pending == 0 and filler.committed_views == 2
    filler.add(*_view(make_record, specs, 5))
    assert filler.flush() == 1  # the end of an epoch commits the partial part
    assert len(filler.parts) == 2

    reader = open_store(url)
    assert reader.keys() == [(i, 0) for i in (1, 2, 3, 4, 5)]
    for image_id in (3, 4, 5):
        original = synthetic_targets(specs, seed=image_id * 1000)
        for spec in specs:  # the store's codecs
            codec = spec.target_codec
            np.testing.assert_array_equal(reader.read(image_id, 0)[spec.name], codec.decode(*codec.encode(original[spec.name])))
    info = inspect_store(url)
    assert info["views_by_origin"] == {"precompute": 2, "endpoint": 3}
    assert info["duplicate_views"] == 0
    assert verify_store(url).ok


def test_refuses_another_teacher_and_incomplete_targets(tmp_path, fingerprint, specs, make_record):
    import dataclasses

    url = str(tmp_path / "store.zarr")
    create_store(url, fingerprint, specs)
    other = dataclasses.replace(fingerprint, checkpoint_sha256="cd" * 32)
    with pytest.raises(FingerprintMismatchError, match="checkpoint_sha256"):
        StoreFiller(url, expected_fingerprint=other)
    filler = StoreFiller(url, expected_fingerprint=fingerprint)
    record, targets = _view(make_record, specs, 1)
    targets.pop(specs[0].name)
    with pytest.raises(ValueError, match=f"no \\['{specs[0].name}'\\] for image_id=1 view_id=0"):
        filler.add(record, targets)


def test_two_fillers_commit_each_view_once(tmp_path, fingerprint, specs, make_record):
    """Two trainers fetched overlapping views; started together, their commits race: each view lands once."""
    url = str(tmp_path / "store.zarr")
    create_store(url, fingerprint, specs)
    fillers = [StoreFiller(url, part_views=100) for _ in range(2)]
    wanted = [range(0, 6), range(3, 9)]  # views 3, 4, 5 fetched by both
    for filler, ids in zip(fillers, wanted):
        for image_id in ids:
            filler.add(*_view(make_record, specs, image_id))
    barrier = threading.Barrier(2)
    counts, errors = [0, 0], []

    def commit(index):
        try:
            barrier.wait(timeout=30)
            counts[index] = fillers[index].flush()
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=commit, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert sum(counts) == 9
    assert sum(f.skipped_views for f in fillers) == 3  # the overlap was dropped by the later committer
    info = inspect_store(url)
    assert info["views"] == 9 and info["duplicate_views"] == 0
    assert info["views_by_origin"]["endpoint"] == 9
    rows = sum(len(pq_rows) for pq_rows in _manifest_rows(url))
    assert rows == 9  # no view committed twice, not even as a shadowed copy
    assert not (Path(url) / "manifest" / "fill.lock").exists()


def _manifest_rows(url):
    import pyarrow.parquet as pq

    for path in sorted((Path(url) / "manifest" / "parts").glob("*.parquet")):
        yield pq.read_table(path).column("image_id").to_pylist()


_CRASHING_FILLER = textwrap.dedent(
    """
    import os, sys, json
    from label_store import StoreFiller, TargetSpec
    from label_store.testing import synthetic_targets
    from label_store.writer import PartWriter

    url, specs_json = sys.argv[1], sys.argv[2]
    specs = [TargetSpec.from_dict(d) for d in json.loads(specs_json)]

    def crash(self):
        self._flush()  # every array on disk, the manifest entry not yet published
        os._exit(9)

    PartWriter.commit = crash
    filler = StoreFiller(url, part_views=10)
    for image_id in (7, 8, 9):
        record = {"image_id": image_id, "view_id": 0, "view": json.dumps({"image_id": image_id, "view_id": 0}),
                  "content_hash": "h", "valid_region": (0, 0, 48, 56)}
        filler.add(record, synthetic_targets(specs, seed=image_id))
    filler.flush()
    """
)


def test_a_filler_killed_mid_commit_leaves_nothing_visible(tmp_path, fingerprint, specs, make_record):
    url = str(tmp_path / "store.zarr")
    create_store(url, fingerprint, specs)
    result = subprocess.run(
        [sys.executable, "-c", _CRASHING_FILLER, url, json.dumps([s.to_dict() for s in specs])],
        cwd=REPO_ROOT, env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 9, result.stderr
    assert open_store(url).keys() == []  # the part's arrays are there, unreferenced
    assert len(list((Path(url) / "parts").glob("fill-*"))) == 1
    assert (Path(url) / "manifest" / "fill.lock").exists()  # left by the dead process
    assert inspect_store(url)["uncommitted_parts"] == 1

    removed = gc_store(url)  # its writer is dead: removed without waiting
    assert len(removed) == 1 and removed[0].startswith("fill-")
    # the next trainer breaks the dead process's lock and commits the views
    filler = StoreFiller(url, part_views=10)
    for image_id in (7, 8):
        filler.add(*_view(make_record, specs, image_id))
    assert filler.flush() == 2
    assert open_store(url).keys() == [(7, 0), (8, 0)]
    assert verify_store(url).ok


def test_parts_without_an_origin_read_as_precomputed(tmp_path, fingerprint, specs, make_record):
    """Manifest entries written before the origin field existed count as precomputed."""
    import pyarrow.parquet as pq

    url = str(tmp_path / "store.zarr")
    store = create_store(url, fingerprint, specs)
    with store.open_part("old") as part:
        part.append(*_view(make_record, specs, 1))
        part.commit()
    entry = Path(url) / "manifest" / "parts" / "old.parquet"
    table = pq.read_table(entry)
    meta = json.loads(table.schema.metadata[b"label_store"])
    assert meta.pop("origin") == "precompute"
    pq.write_table(table.replace_schema_metadata({b"label_store": json.dumps(meta).encode()}), entry)
    filler = StoreFiller(url)
    filler.add(*_view(make_record, specs, 2))
    filler.close()
    assert inspect_store(url)["views_by_origin"] == {"precompute": 1, "endpoint": 1}


def test_background_commits_full_parts_and_flush_waits(tmp_path, fingerprint, specs, make_record):
    url = str(tmp_path / "store.zarr")
    create_store(url, fingerprint, specs)
    filler = StoreFiller(url, part_views=2, background=True)
    for image_id in (1, 2, 3):
        filler.add(*_view(make_record, specs, image_id))
    assert filler.pending == 1  # the first 2 went to the background commit
    assert filler.flush() == 3  # waits for it and commits the last one
    assert len(filler.parts) == 2 and open_store(url).keys() == [(1, 0), (2, 0), (3, 0)]
    filler.close()


@pytest.mark.parametrize("groups", [("box",), ("cls",)])
def test_fetched_views_go_into_a_region_store_with_every_point_stored(tmp_path, fingerprint, specs, make_record, groups):
    from label_store import StoreRegion

    url = str(tmp_path / "store.zarr")
    create_store(url, fingerprint, specs, region=StoreRegion(groups, topk=9, vlr_alpha=0.25))
    filler = StoreFiller(url, expected_fingerprint=fingerprint, part_views=2)
    for image_id in (1, 2):
        filler.add(*_view(make_record, specs, image_id))
    assert filler.committed_views == 2
    reader = open_store(url)
    assert reader.region.groups == groups and reader.region_share() == 1.0
    original = synthetic_targets(specs, seed=2000)
    for spec in specs:  # dense targets from the endpoint: every point, as a dense store holds them
        codec = spec.target_codec
        np.testing.assert_array_equal(reader.read(2, 0)[spec.name], codec.decode(*codec.encode(original[spec.name])))
