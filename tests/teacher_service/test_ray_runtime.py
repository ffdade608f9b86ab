"""`teacher_service.ray_runtime`: the local cluster's CPUs, CPU pinning of the teacher, the workers' import path.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from teacher_service.precompute import run_precompute

from precompute_fixtures import (  # noqa: F401  (fixtures are found by name)
    _committed_rows,
    _config,
    _shutdown_ray_after_module,
    data,
)


def test_local_cluster_cpus_fit_the_actors_and_the_tasks(data, tmp_path):
    from teacher_service.ray_runtime import local_cluster_cpus

    config = _config(data, tmp_path / "s.zarr", cpus_per_actor=1.0, cpus_per_task=1.0)
    # the actors plus one decode/write task at least
    assert local_cluster_cpus(dataclasses.replace(config, num_cpus=2), cpu_count=8) == 2
    assert local_cluster_cpus(dataclasses.replace(config, num_cpus=1), cpu_count=8) == 2
    assert local_cluster_cpus(dataclasses.replace(config, num_cpus=None), cpu_count=1) == 2
    assert local_cluster_cpus(dataclasses.replace(config, num_cpus=None), cpu_count=16) == 16
    assert local_cluster_cpus(dataclasses.replace(config, num_cpus=3, num_actors=3), cpu_count=2) == 4
    # with a pinned teacher, a decode and a write task at once
    assert local_cluster_cpus(dataclasses.replace(config, num_cpus=None), cpu_count=2, pinned=True) == 3
    assert local_cluster_cpus(dataclasses.replace(config, num_cpus=None), cpu_count=16, pinned=True) == 16
    assert local_cluster_cpus(dataclasses.replace(config, num_cpus=3, num_actors=3), cpu_count=2, pinned=True) == 5
    tiny = dataclasses.replace(config, num_cpus=1, cpus_per_actor=0.5, cpus_per_task=0.25)
    assert local_cluster_cpus(tiny, cpu_count=1) == local_cluster_cpus(tiny, cpu_count=1, pinned=True) == 1


def test_cpu_pinning_gives_a_cpu_teacher_cores_of_its_own(data, tmp_path):
    from teacher_service.ray_runtime import cpu_pinning

    config = _config(data, tmp_path / "s.zarr", cpus_per_actor=1.0)  # device auto
    assert cpu_pinning(config, [0, 1], gpu=False) == ((0,), (1,))
    assert cpu_pinning(config, [5, 3, 9], gpu=False) == ((3,), (5, 9))
    two = dataclasses.replace(config, num_actors=2, cpus_per_actor=1.5)
    assert cpu_pinning(two, range(8), gpu=False) == ((0, 1, 2), (3, 4, 5, 6, 7))
    # no core left for the rest, a GPU teacher, a joined cluster, or switched off: no pinning
    assert cpu_pinning(config, [0], gpu=False) is None
    assert cpu_pinning(two, [0, 1, 2], gpu=False) is None
    assert cpu_pinning(config, [0, 1], gpu=True) is None
    assert cpu_pinning(dataclasses.replace(config, device="cuda"), [0, 1], gpu=False) is None
    assert cpu_pinning(dataclasses.replace(config, device="cpu"), [0, 1], gpu=True) == ((0,), (1,))
    assert cpu_pinning(dataclasses.replace(config, ray_address="127.0.0.1:6379"), [0, 1], gpu=False) is None
    assert cpu_pinning(dataclasses.replace(config, pin_cpus=False), [0, 1], gpu=False) is None


def test_job_that_starts_its_own_cluster_pins_the_teacher(data, tmp_path, monkeypatch):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # a CPU teacher whatever the machine
    store = tmp_path / "own-cluster.zarr"
    try:
        summary = run_precompute(_config(data, store, cpus_per_actor=1.0, cpus_per_task=1.0, num_cpus=2))
    finally:
        if ray.is_initialized():
            ray.shutdown()
    assert (summary.views_stored, summary.views_failed) == (16, 0)
    cores = sorted(os.sched_getaffinity(0))
    pinning_row = next(line for line in summary.format().splitlines() if line.strip().startswith("CPU pinning"))
    if len(cores) >= 2:
        assert (summary.teacher_cpus, summary.stage_cpus) == ((cores[0],), tuple(cores[1:]))
        assert f"teacher on CPU {cores[0]}" in pinning_row
        # the stages share their pinned cores, whatever Ray's task slots for them
        assert 1 <= summary.stage_slots <= len(cores) - 1
    else:  # one usable core: nothing to pin apart
        assert summary.teacher_cpus == () and pinning_row.endswith(" off")
        assert summary.stage_slots >= 1
    assert summary.num_actors == 1 and summary.bottleneck != "-"
    assert sorted(os.sched_getaffinity(0)) == cores  # the driver's own mask is restored
    rows = _committed_rows(str(store))
    assert len(rows) == len(set(rows)) == 16


def test_local_cluster_workers_import_from_the_source_tree_and_the_driver_env_is_kept(data, tmp_path, monkeypatch):
    import ray

    from teacher_service.ray_runtime import init_ray

    if ray.is_initialized():
        ray.shutdown()
    monkeypatch.setenv("PYTHONPATH", "/opt/users-own-path")
    repo_root = str(Path(__file__).resolve().parents[2])
    try:
        started, _ = init_ray(_config(data, tmp_path / "unused.zarr", num_cpus=2))
        assert started
        # the driver's environment is as it was; the cluster's workers have the source tree first
        assert os.environ["PYTHONPATH"] == "/opt/users-own-path"
        worker_path = ray.get(ray.remote(lambda: os.environ.get("PYTHONPATH")).remote())
    finally:
        ray.shutdown()
    assert worker_path == os.pathsep.join([repo_root, "/opt/users-own-path"])
