"""The Ray cluster of a precompute job: joining or starting it, its logical CPUs, and CPU pinning."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Sequence

from detcore.interrupt import stop_signals_blocked_for_children
from teacher_service.precompute_config import PrecomputeConfig

logger = logging.getLogger("teacher_service.precompute")  # the job's logger, whichever module logs


def local_cluster_cpus(config: PrecomputeConfig, cpu_count: int, *, pinned: bool = False) -> int:
    """Logical CPUs of a local cluster: the requested number, raised to fit the job.

    The job cannot run without its teacher actors plus one decode/write task (with fewer
    logical CPUs Ray would never schedule a decode task and the job would hang). With
    the teacher ``pinned`` (`cpu_pinning`) it also gets room for a decode *and* a write
    task at once: with one task slot, Ray Data runs every decode task before the first
    write, so the teacher's outputs pile up in the object store and the writes pile up at
    the end. A 2-core machine
    with one 1-CPU teacher actor then gets 3 logical CPUs: the teacher's core, and the
    other core shared by the (niced) decode and write tasks. Without pinning the extra
    slot is not given: the concurrent tasks then slow an unpinned CPU teacher down more
    than the streaming gains (1.59 vs 1.42 times the bare forward at 512 views).
    """
    requested = config.num_cpus or cpu_count
    tasks = 2 if pinned else 1
    needed = math.ceil(config.actor_cpus + tasks * config.cpus_per_task)
    if requested < needed:
        logger.info(
            "local Ray cluster: %d CPU(s) requested, but %d teacher actor(s) x %g CPU plus %d %g-CPU decode/write "
            "task(s) need %d; declaring %d logical CPUs (they share the physical cores)",
            requested, config.num_actors, config.cpus_per_actor, tasks, config.cpus_per_task, needed, needed,
        )
    return max(requested, needed)


def _gpu_visible() -> bool:
    """Whether this machine seems to have an NVIDIA GPU for a local cluster (no torch import)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    return Path("/dev/nvidiactl").exists()


def cpu_pinning(config: PrecomputeConfig, available: Sequence[int], *, gpu: bool) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """``(teacher cores, stage cores)`` for a local cluster with a CPU teacher, or None.

    A CPU teacher is the job's bottleneck; on a small machine the scheduler keeps
    preempting it for the decode and write tasks, Ray's own processes and the driver's
    scheduling loop (8-15% of its time on 2 cores, even with those tasks niced). The
    teacher actors pin themselves to the first ``ceil(num_actors * cpus_per_actor)`` of
    the ``available`` cores and the decode and write threads to the rest.
    None (no pinning) when it is off, the job joins a cluster (``ray_address``: which
    cores of which node the actors land on, beside what other work, is not known here),
    the teacher runs on a GPU, or no core would be left for the other stages.
    """
    if not config.pin_cpus or config.ray_address or not hasattr(os, "sched_setaffinity"):
        return None
    if config.device.startswith("cuda") or (config.device == "auto" and gpu):
        return None
    cores = sorted(int(c) for c in available)
    count = math.ceil(config.actor_cpus)
    if len(cores) <= count:
        return None
    return tuple(cores[:count]), tuple(cores[count:])


_PINNED_CLUSTER: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
"""GCS address -> `cpu_pinning` of the local clusters `init_ray` started in this process."""


def _gcs_address() -> str:
    import ray

    return str(ray.get_runtime_context().gcs_address)


def init_ray(config: PrecomputeConfig) -> tuple[bool, tuple[tuple[int, ...], tuple[int, ...]] | None]:
    """Join or start the Ray cluster for ``config``, unless one is initialised.

    Without ``config.ray_address`` a local cluster starts with `local_cluster_cpus`
    logical CPUs, and the `cpu_pinning` that applies to it is remembered for its jobs.
    A script that runs several jobs on one local cluster calls this first (then
    `run_precompute` finds Ray initialised, reuses the cluster and its pinning, and does
    not shut it down); `run_precompute` calls it otherwise.

    Returns:
        ``(started, pinning)``: whether this call started or joined the cluster, and the
        `cpu_pinning` of the cluster in use (None: none).
    """
    import ray

    if ray.is_initialized():
        return False, _PINNED_CLUSTER.get(_gcs_address())
    repo_root = str(Path(__file__).resolve().parent.parent)
    # Workers import detcore / label_store / teacher_service from the driver's source tree.
    pythonpath = os.pathsep.join(p for p in (repo_root, os.environ.get("PYTHONPATH", "")) if p)
    runtime_env = {"env_vars": {"PYTHONPATH": pythonpath}}
    if config.ray_address:
        ray.init(address=config.ray_address, runtime_env=runtime_env, log_to_driver=False)
        return True, None
    pinning = cpu_pinning(config, sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [], gpu=_gpu_visible())
    # Ray's own processes stay where the OS puts them: confining them to the stage cores
    # too made a cold 128-view job 24% slower (every worker process starting on one core)
    # for a few percent at steady state. The teacher actors and the decode and write
    # threads place themselves (`TeacherPredictor`, `run_at_lower_priority`).
    # A local cluster's processes inherit this process's environment, so PYTHONPATH goes
    # there rather than into a job runtime_env: Ray pools workers per runtime_env, and with
    # one the first decode task of a cold 128-view job started 1.6 s later (Ray timeline).
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = pythonpath
    try:
        with stop_signals_blocked_for_children():
            ray.init(
                num_cpus=local_cluster_cpus(config, os.cpu_count() or 1, pinned=pinning is not None),
                include_dashboard=False,
                log_to_driver=False,
            )
    finally:
        if saved is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = saved
    if pinning:
        _PINNED_CLUSTER[_gcs_address()] = pinning
    return True, pinning


def shutdown_ray() -> None:
    """Stop (or leave) the cluster the job started (or joined); a failure there is logged, not
    raised, so that the summary of the committed parts still comes."""
    import ray

    try:
        ray.shutdown()
    except Exception as error:
        logger.warning("shutting down the local Ray cluster: %s", error)
