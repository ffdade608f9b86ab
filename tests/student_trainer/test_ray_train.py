"""A 2-worker Ray Train run on a local CPU cluster (gloo), every worker reading the store."""

import json
import os
import tempfile

import pytest
import torch

from student_fixtures import run_config

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def test_two_worker_ray_train_run(world, tmp_path, monkeypatch):
    import ray

    from detcore.checkpoint import load_detector_with_meta
    from student_trainer.ray_train import train_with_ray

    monkeypatch.setenv("RAY_TMPDIR", tempfile.mkdtemp(prefix="st-ray-"))
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    assert not ray.is_initialized()
    out = tmp_path / "run"
    config = run_config(world, out, losses="ld,fgd", iters=2, ray_workers=2)
    summary = train_with_ray(config, num_cpus=2)
    assert not ray.is_initialized()  # it shut down the cluster it started

    assert summary["finished"] and summary["world_size"] == 2 and summary["step"] == 2
    # 4 images over 2 workers with batch 2 each: one step is one epoch
    assert summary["iters_per_epoch"] == 1
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]  # written by rank 0 only
    assert all(line["fgd"] > 0 and line["ld_kd"] >= 0 for line in lines)
    model, meta = load_detector_with_meta(out / "final.pt")
    assert meta["classes"] == ("square", "disc")
    final = torch.load(out / "final.pt", weights_only=True)
    assert any(k.startswith("fgd.") for k in final["training"]["distill_state"])
    checkpoints = [p for p in (out / "ray").rglob("last.pt")]
    assert checkpoints  # rank 0 reported last.pt to Ray Train at the epoch ends
    assert os.path.getsize(checkpoints[0]) > 0
