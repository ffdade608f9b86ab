"""Data-parallel student training with Ray Train (``TorchTrainer``).

``distill train --ray-workers N [--address ADDR]`` runs `student_trainer.train.train_student`
on N Ray Train workers: ``ScalingConfig(num_workers=N, use_gpu=torch.cuda.is_available())``,
torch's process group from Ray (gloo on CPU, NCCL on GPUs), the `DistillationModel`
wrapped in DDP by ``ray.train.torch.prepare_model`` (so the FGD/HGD modules are
synchronised with the student), and each worker reading its own shard of the epoch's
views from the store (`detcore.datasets.CanvasBatchSampler`: one view per image per
epoch, batches of one canvas each, the same number on every rank). ``--batch-size`` is per
worker, so the global batch is ``batch_size * N``; the learning rate is never rescaled:
keep the global batch to keep the result (docs/operations.md, "Training on many
workers"). DDP averages the gradients, so every rank ends each step with the same
parameters (``results.json`` lists each rank's `student_trainer.train.parameter_digest`).

Rank 0 writes ``last.pt``, ``final.pt``, ``metrics.jsonl``, TensorBoard files and
``results.json`` into ``--out`` and, at every epoch end, reports ``last.pt`` to Ray Train
as a checkpoint (under ``OUT/ray``); on resume rank 0 reads ``OUT/last.pt`` (or Ray's
latest checkpoint when it is missing) and broadcasts the state to the other ranks. On a
multi-node cluster ``--out`` must be a folder the driver can read after the run (shared
storage), and the store must be reachable from every node (NFS or fsspec URL).

Ctrl-C or SIGTERM on the driver aborts the run through Ray Train's controller (the workers
stop where they are) and `train_with_ray` raises `detcore.interrupt.Interrupted`: the
command exits 130 / 143 and says which step ``last.pt`` holds (the last checkpoint:
every ``--checkpoint-every`` steps and each epoch end); the same command resumes there.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def _worker_loop(payload: dict[str, Any]) -> None:
    """The per-worker training function (runs inside a Ray Train worker)."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as tdist

    from student_trainer.config import config_from_dict
    from student_trainer.train import DistContext, train_student

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    config = config_from_dict(payload["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if config.num_threads:
        torch.set_num_threads(int(config.num_threads))
    out = Path(config.out)
    last_path = out / "last.pt"
    if rank == 0 and not last_path.exists():
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                saved = Path(folder) / "last.pt"
                if saved.exists():
                    out.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(saved, last_path)

    distributed = world > 1 and tdist.is_available() and tdist.is_initialized()

    def broadcast(obj: Any) -> Any:
        if not distributed:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(obj: Any) -> list[Any]:
        if not distributed:
            return [obj]
        box: list[Any] = [None] * world
        tdist.all_gather_object(box, obj)
        return box

    def wrap(model):
        # Every parameter takes part in every step: the recipes return graph-connected zeros
        # for levels without positives, so DDP needs no unused-parameter search.
        return ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False})

    def on_epoch_end(metrics: dict[str, Any], last: Path | None) -> None:
        plain = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        if last is not None and last.exists():
            with tempfile.TemporaryDirectory() as folder:
                shutil.copy2(last, Path(folder) / "last.pt")
                ray.train.report(plain, checkpoint=ray.train.Checkpoint.from_directory(folder))
        else:
            ray.train.report(plain)

    dist = DistContext(
        rank=rank, world_size=world, device=device, wrap_model=wrap, broadcast=broadcast, gather=gather,
        on_epoch_end=on_epoch_end,
    )
    train_student(config, dist=dist, progress=False)


def _local_python_path() -> str:
    """PYTHONPATH that lets local Ray workers import this repository (when not pip-installed)."""
    root = str(Path(__file__).resolve().parent.parent)
    existing = os.environ.get("PYTHONPATH", "")
    return root if not existing else f"{root}{os.pathsep}{existing}"


def train_with_ray(config, *, progress: bool = True, num_cpus: int | None = None) -> dict[str, Any]:
    """Run `train_student` on ``config.num_ray_workers`` Ray Train workers; returns ``results.json``.

    Args:
        config: the run; ``num_ray_workers`` >= 1, ``address`` None for a local cluster.
        progress: unused by workers (they log lines); kept for the CLI's signature.
        num_cpus: CPUs of a local cluster started here (default: Ray's detection).

    Starts a local Ray cluster when none is connected and ``address`` is None, and shuts
    down only what it started.
    """
    import json

    import ray
    import torch
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if config.num_ray_workers < 1:
        raise ValueError(f"train_with_ray(config.num_ray_workers=) expects at least 1. Got {config.num_ray_workers}.")
    out = Path(config.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    resolved = _absolute_paths(config)
    started = False
    if not ray.is_initialized():
        env = {"env_vars": {"PYTHONPATH": _local_python_path()}} if config.address is None else None
        init_kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
        if config.address is not None:
            init_kwargs["address"] = config.address
        elif num_cpus is not None:
            init_kwargs["num_cpus"] = num_cpus
        if env:
            init_kwargs["runtime_env"] = env
        ray.init(**init_kwargs)
        started = True
    stop = _AbortOnSignal()

    class _Trainer(TorchTrainer):
        def _register_sigint_handler(self, controller) -> None:  # Ray Train's hook for its own Ctrl-C handler
            stop.install(controller)

    try:
        trainer = _Trainer(
            _worker_loop,
            train_loop_config={"config": resolved.to_dict()},
            scaling_config=ScalingConfig(num_workers=int(config.num_ray_workers), use_gpu=torch.cuda.is_available()),
            run_config=RunConfig(name="train", storage_path=str(out / "ray")),
        )
        try:
            trainer.fit()
        except Exception:
            if stop.signum is None:
                raise
    finally:
        stop.restore()
        if started:
            ray.shutdown()
    if stop.signum is not None:
        from detcore.interrupt import Interrupted

        raise Interrupted(stop.signum, _resume_note(out / "last.pt"))
    results = out / "results.json"
    if not results.exists():
        raise RuntimeError(f"train_with_ray expects rank 0 to write {results}. It is missing; see the worker logs above.")
    return json.loads(results.read_text(encoding="utf-8"))


class _AbortOnSignal:
    """SIGINT and SIGTERM while Ray Train runs: the first aborts the run through its controller
    (as Ray Train's own Ctrl-C handler does, which this replaces) and is remembered; a second
    stops the driver at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self, controller) -> None:
        import signal

        import ray

        from detcore.interrupt import STOP_SIGNALS, Interrupted

        def handle(signum, frame) -> None:
            if self.signum is not None:
                raise Interrupted(signum, "forced stop; re-run the same command to resume from the last checkpoint")
            self.signum = signum
            logger.warning("%s: aborting the Ray Train run (a second signal stops at once)", signal.Signals(signum).name)
            try:
                ray.get(controller.abort.remote())
            except ray.exceptions.RayActorError:
                pass  # the controller is gone already: the run has ended

        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, handle)

    def restore(self) -> None:
        import signal

        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()


def _resume_note(last: Path) -> str:
    """What an interrupted run kept: the step ``last.pt`` holds, and how to go on."""
    import torch

    if not last.exists():
        return "no checkpoint was written yet; re-run the same command to start again"
    training = torch.load(last, map_location="cpu", weights_only=True).get("training", {})
    return f"{last} holds step {training.get('step')} (the last checkpoint); re-run the same command to resume"


def _absolute_paths(config):
    """Local paths made absolute: Ray workers do not share the driver's working directory."""
    import dataclasses

    def fix(value):
        if not value or "://" in str(value):
            return value
        return str(Path(value).resolve())

    data = dataclasses.replace(
        config.data,
        store=fix(config.data.store),
        annotations=fix(config.data.annotations),
        images=fix(config.data.images),
        val_annotations=fix(config.data.val_annotations),
        val_images=fix(config.data.val_images),
    )
    source = dataclasses.replace(config.source, teacher=fix(config.source.teacher), class_map=fix(config.source.class_map))
    student = dataclasses.replace(
        config.student, init=fix(config.student.init), backbone_weights=fix(config.student.backbone_weights)
    )
    return dataclasses.replace(config, data=data, source=source, student=student, out=fix(config.out))
