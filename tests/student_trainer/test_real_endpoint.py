"""The remote and read-through sources against the real `distill serve` (uvicorn, a subprocess on loopback).

student_trainer never imports teacher_service; these tests do, to start the real server
with the world's random-weight teacher. Requests are counted by the server's own
Prometheus metrics.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from student_fixtures import run_config, write_store

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

NAMES = ["cls/p3", "box/p3", "fpn/p4", "backbone/c3"]


@pytest.fixture(scope="module")
def server(world):
    from teacher_service.api.testing import ServerProcess

    options = ["--max-batch", "8", "--max-wait-ms", "5", "--torch-threads", "1"]
    with ServerProcess(world.teacher, options=options, log_path=world.root / "serve.log") as running:
        yield running
        assert running.alive(), running.log()


def _targets_requests(server) -> float:
    """Successful ``POST /v1/targets`` requests the server has answered (its /metrics)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.url + "/metrics", timeout=30).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "distillery_requests_total" and sample.labels.get("route") == "/v1/targets"
        and sample.labels.get("status") == "200"
    )


def _stored_views(world, image_ids):
    from detcore.coco import CocoDataset
    from detcore.views import content_hash
    from student_trainer.sources import StoreSource

    coco = CocoDataset(world.annotations, world.images)
    views = [view for view, _ in StoreSource(str(world.store_fp32), []).stored_views() if view.image_id in image_ids]
    paths = [str(coco.image_path(v.image_id)) for v in views]
    hashes = [content_hash(coco.load(v.image_id)) for v in views]
    return views, paths, hashes


def test_remote_source_gets_the_teachers_targets(world, server):
    from student_trainer.sources import RemoteSource, StoreSource

    views, paths, hashes = _stored_views(world, {1, 2, 3})
    before = _targets_requests(server)
    remote = RemoteSource(server.url, NAMES, token=server.token)
    try:
        got = remote.get(views, image_paths=paths, content_hashes=hashes)
    finally:
        remote.close()
    assert _targets_requests(server) - before == 1  # one request for the batch
    reference = StoreSource(str(world.store_fp32), NAMES).get(views)  # the same teacher's fp32 forward
    specs = {spec.name: spec for spec in remote.specs}
    for name in NAMES:
        assert got[name].shape == reference[name].shape == (len(views), *specs[name].shape)
        expected = reference[name].numpy()
        codec = specs[name].target_codec  # the endpoint's wire codec bounds the difference
        for row in range(len(views)):
            _, scale, _ = codec.encode(expected[row])
            bound = codec.error_bound(expected[row], scale)
            assert np.all(np.abs(got[name][row].numpy() - expected[row]) <= bound + 1e-4), (name, row)


def test_remote_source_reports_a_wrong_token(world, server):
    from student_trainer.sources import RemoteSource, RemoteSourceError

    with pytest.raises(RemoteSourceError, match="401 \\(check --token\\)"):
        RemoteSource(server.url, NAMES, token="not-the-token-0123456789")
    with pytest.raises(RemoteSourceError, match="401"):
        RemoteSource(server.url, NAMES, token=None)


def test_remote_run_takes_the_token_from_distillery_token(world, server, tmp_path, monkeypatch):
    from student_trainer.train import train_student

    monkeypatch.setenv("DISTILLERY_TOKEN", server.token)
    before = _targets_requests(server)
    config = run_config(world, tmp_path / "run", losses="ld,fgd", source="remote", endpoint=server.url, iters=2)
    assert config.source.token is None
    summary = train_student(config, progress=False)
    assert summary["finished"] and summary["source"]["kind"] == "remote"
    assert _targets_requests(server) - before == 2  # one per step
    monkeypatch.setenv("DISTILLERY_TOKEN", "not-the-token-0123456789")
    from student_trainer.sources import RemoteSourceError

    with pytest.raises(RemoteSourceError, match="401"):
        train_student(run_config(world, tmp_path / "bad", losses="ld", source="remote", endpoint=server.url, iters=1), progress=False)


def test_read_through_fills_the_store_and_the_second_epoch_fetches_nothing(world, server, tmp_path, monkeypatch):
    from label_store import inspect_store, open_store, verify_store
    from student_trainer import sources
    from student_trainer.train import DistContext, train_student

    partial = write_store(tmp_path / "partial.zarr", world.teacher, world.annotations, world.images, image_ids=[1, 2])
    before = open_store(str(partial))
    assert sorted({i for i, _ in before.keys()}) == [1, 2]

    # Record which process fetches: the DataLoader worker, not the training process.
    fetchers = tmp_path / "fetchers.txt"
    original = sources.ReadThroughReader.fetch_many

    def fetch_many(self, views, image_paths, content_hashes):
        with open(fetchers, "a") as handle:
            handle.write(f"{os.getpid()}\n")
        return original(self, views, image_paths, content_hashes)

    monkeypatch.setattr(sources.ReadThroughReader, "fetch_many", fetch_many)
    monkeypatch.setenv("DISTILLERY_TOKEN", server.token)
    config = run_config(world, tmp_path / "run", losses="ld,fgd", source="read-through", endpoint=server.url,
                        store=str(partial), iters=6, num_workers=1)
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, flip=False))  # one planned view per new image
    requests_at_epoch_end = []
    start = _targets_requests(server)
    dist = DistContext(on_epoch_end=lambda metrics, last: requests_at_epoch_end.append(_targets_requests(server) - start))
    summary = train_student(config, dist=dist, progress=False)

    assert summary["finished"] and summary["iters_per_epoch"] == 2 and len(requests_at_epoch_end) == 3
    first, second, third = requests_at_epoch_end
    assert first >= 1  # epoch 1 fetched images 3 and 4 ...
    assert second == first and third == first  # ... and the later epochs read them from the store
    assert summary["source"]["fetched_views"] == 2 and summary["source"]["committed_views"] == 2
    pids = {int(line) for line in fetchers.read_text().split()}
    assert pids and os.getpid() not in pids  # fetched in the DataLoader worker

    after = open_store(str(partial))
    assert sorted({i for i, _ in after.keys()}) == [1, 2, 3, 4]
    assert len(after.keys()) == len(before.keys()) + 2
    assert after.fingerprint == before.fingerprint and after.targets == before.targets  # same teacher and codecs
    info = inspect_store(str(partial))
    assert info["views_by_origin"] == {"precompute": len(before.keys()), "endpoint": 2}
    assert info["duplicate_views"] == 0 and info["uncommitted_parts"] == 0
    assert verify_store(str(partial)).ok

    # the filled views hold the teacher's targets for the rendered view (vs the fp32 store, within the codecs)
    fp32 = open_store(str(world.store_fp32))
    for image_id, view_id in after.keys():
        if image_id not in (3, 4):
            continue
        got, expected = after.read(image_id, view_id), fp32.read(image_id, view_id)
        for spec in after.targets:
            _, scale, _ = spec.target_codec.encode(expected[spec.name])
            bound = 2 * spec.target_codec.error_bound(expected[spec.name], scale) + 1e-4  # endpoint's codec, then the store's
            assert np.all(np.abs(got[spec.name] - expected[spec.name]) <= bound), (image_id, spec.name)

    # `distill store inspect` shows the origin
    from distillery.cli import main

    assert main(["store", "inspect", str(partial)]) == 0


def _trainer_process(config_dict, barrier, results):
    import torch

    from student_trainer.config import config_from_dict
    from student_trainer.train import train_student

    torch.set_num_threads(1)
    barrier.wait(timeout=120)
    summary = train_student(config_from_dict(config_dict), progress=False)
    results.put(summary["source"])


def test_two_trainers_fill_one_store_each_view_once(world, server, tmp_path, monkeypatch):
    """Two read-through runs in two processes, started together on one partial store."""
    import multiprocessing

    import pyarrow.parquet as pq

    from label_store import inspect_store, verify_store

    partial = write_store(tmp_path / "shared.zarr", world.teacher, world.annotations, world.images, image_ids=[1, 2], flip=False)
    monkeypatch.setenv("DISTILLERY_TOKEN", server.token)
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    processes = []
    for name in ("a", "b"):
        config = run_config(world, tmp_path / name, losses="ld", source="read-through", endpoint=server.url,
                            store=str(partial), iters=2)
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, flip=False))
        processes.append(context.Process(target=_trainer_process, args=(config.to_dict(), barrier, results)))
    for process in processes:
        process.start()
    described = [results.get(timeout=300) for _ in processes]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    assert sum(d["committed_views"] for d in described) == 2  # images 3 and 4, once
    assert sum(d["fetched_views"] for d in described) == 2 + sum(d["skipped_views"] for d in described)
    rows = [key for path in sorted((partial / "manifest" / "parts").glob("*.parquet"))
            for key in zip(*pq.read_table(path, columns=["image_id", "view_id"]).to_pydict().values())]
    assert len(rows) == len(set(rows)) == 4  # no view committed twice
    info = inspect_store(str(partial))
    assert info["views_by_origin"] == {"precompute": 2, "endpoint": 2} and info["duplicate_views"] == 0
    assert verify_store(str(partial)).ok


def test_store_inspect_prints_the_origin(world, tmp_path, capsys):
    from distillery.cli import main

    store = write_store(tmp_path / "s.zarr", world.teacher, world.annotations, world.images, image_ids=[1])
    assert main(["store", "inspect", str(store)]) == 0
    assert "2 views precomputed, 0 fetched from the endpoint" in capsys.readouterr().out
    assert main(["store", "inspect", str(store), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["views_by_origin"] == {"precompute": 2, "endpoint": 0}
