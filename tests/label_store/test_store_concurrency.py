"""Writers in separate processes: disjoint parts lose nothing; a killed writer leaves nothing visible."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from label_store import create_store, gc_store, inspect_store, open_store, verify_store
from label_store.testing import synthetic_targets


def _writer_process(url, options, fingerprint_dict, spec_dicts, part_id, image_ids):
    from label_store import TargetSpec, TeacherFingerprint, create_store

    specs = [TargetSpec.from_dict(d) for d in spec_dicts]
    store = create_store(url, TeacherFingerprint.from_dict(fingerprint_dict), specs, views_per_shard=2, storage_options=options)
    with store.open_part(part_id) as part:
        for image_id in image_ids:
            record = {"image_id": image_id, "view_id": 0, "view": "{}", "content_hash": "h", "valid_region": (0, 0, 48, 64)}
            part.append(record, synthetic_targets(specs, seed=image_id))
        part.commit()


@pytest.mark.slow
def test_concurrent_writer_processes_lose_nothing(backend, fingerprint, specs):
    url, options = backend
    create_store(url, fingerprint, specs, views_per_shard=2, storage_options=options)
    context = multiprocessing.get_context("spawn")
    tasks, views = (3, 3) if not url.startswith("s3://") else (2, 2)  # moto serves from this process: keep it small
    jobs = {f"task-{n}": list(range(10 * n, 10 * n + views)) for n in range(tasks)}
    processes = [
        context.Process(target=_writer_process, args=(url, options, fingerprint.to_dict(), [s.to_dict() for s in specs], part_id, ids))
        for part_id, ids in jobs.items()
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
        assert process.exitcode == 0
    reader = open_store(url, storage_options=options)
    expected_keys = sorted((i, 0) for ids in jobs.values() for i in ids)
    assert reader.keys() == expected_keys
    assert sorted(reader.parts) == sorted(jobs)
    for image_id, _ in expected_keys:
        original = synthetic_targets(specs, seed=image_id)
        got = reader.read(image_id, 0)
        for spec in specs:
            codec = spec.target_codec
            assert np.array_equal(got[spec.name], codec.decode(*codec.encode(original[spec.name])))
    assert verify_store(url, storage_options=options).ok


_KILLED_WRITER = textwrap.dedent(
    """
    import sys, time
    from label_store import TargetSpec, TeacherFingerprint, create_store
    from label_store.testing import synthetic_targets
    import json
    url, fingerprint, specs = sys.argv[1], json.loads(sys.argv[2]), [TargetSpec.from_dict(d) for d in json.loads(sys.argv[3])]
    store = create_store(url, TeacherFingerprint.from_dict(fingerprint), specs, views_per_shard=1)
    part = store.open_part("task-7")
    for image_id in (1, 2):
        part.append({"image_id": image_id, "view_id": 0, "view": "{}", "content_hash": "h", "valid_region": (0, 0, 48, 64)},
                    synthetic_targets(specs, seed=image_id))
    print("WROTE", part.part_dir, flush=True)
    time.sleep(120)
    """
)


@pytest.mark.slow
def test_killed_writer_leaves_nothing_visible_and_gc_removes_it(tmp_path, fingerprint, specs):
    import json

    url = str(tmp_path / "store.zarr")
    create_store(url, fingerprint, specs)
    import label_store

    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(label_store.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo_root, os.environ.get("PYTHONPATH", "")]))
    process = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, url, json.dumps(fingerprint.to_dict()), json.dumps([s.to_dict() for s in specs])],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = process.stdout.readline()
        assert line.startswith("WROTE"), line
        part_dir = line.split()[1]
        # both views' shards are on disk before the kill
        assert os.path.exists(os.path.join(url, "parts", part_dir, "cls", "p3", "c", "1", "0", "0", "0"))
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    reader = open_store(url)
    assert len(reader) == 0 and reader.parts == []
    info = inspect_store(url)
    assert info["views"] == 0 and info["uncommitted_parts"] == 1
    assert verify_store(url).ok
    # the writer ran on this host and is gone: gc removes its part without waiting
    assert gc_store(url) == [part_dir]
    assert not os.path.exists(os.path.join(url, "parts", part_dir))
    # the retried task commits under the same part id, and each view is there once
    store = create_store(url, fingerprint, specs)
    with store.open_part("task-7") as part:
        for image_id in (1, 2):
            part.append({"image_id": image_id, "view_id": 0, "view": "{}", "content_hash": "h", "valid_region": (0, 0, 48, 64)},
                        synthetic_targets(specs, seed=image_id))
        part.commit()
    reader = reader.refresh()
    assert reader.keys() == [(1, 0), (2, 0)] and inspect_store(url)["duplicate_views"] == 0
