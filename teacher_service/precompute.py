"""The precompute job: run a teacher over every view of a dataset and fill a label store.

Pipeline (Ray Data, streaming)::

    plan views (annotation sizes)  ->  a new store with transform codecs: fit their channel
                                      bases on the first views (driver, `fit_store_bases`)
      -> skip views already committed (resume)
      -> ray.data.from_items
      -> map_batches(decode_and_render)            CPU tasks; a bad image -> error rows
      -> map_batches(TeacherPredictor)             actor pool, one actor per GPU or CPU actors
      -> write_datasink(LabelStoreDatasink)        one committed part per write task
      -> failures table (driver)                   every view that could not be produced

The view recipe is planned from the annotation file's image sizes; rendering checks the
decoded size against it, so an image changed since annotation fails its views instead of
storing targets for other pixels.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from detcore.interrupt import Interrupted, StopRequest
from teacher_service.precompute_config import PrecomputeConfig, PrecomputeInputError
from teacher_service.progress import ProgressPoller
from teacher_service.ray_runtime import init_ray, shutdown_ray
from teacher_service.store_layout import StoreLayout, store_layout
from teacher_service.summary import PrecomputeSummary

logger = logging.getLogger("teacher_service.precompute")

MAX_RETRIES = 3
"""Retries of a task, and restarts of a teacher actor, after its process died (then the job fails)."""


def plan_job(config: PrecomputeConfig, dataset, canvas_hw: tuple[int, int], *, orient: bool = True) -> list:
    """Every view of the selected images, in image-id order (`detcore.views.plan_views`).

    ``orient=False`` plans a schema-1 store's views (one canvas, fit into it) to resume it."""
    from detcore.views import plan_views

    image_ids = dataset.image_ids if config.image_ids is None else list(config.image_ids)
    unknown = sorted(set(image_ids) - set(dataset.image_ids))
    if unknown:
        raise PrecomputeInputError(
            f"PrecomputeConfig(image_ids=) expects ids from {config.annotations}. Got unknown ids {unknown[:10]}."
        )
    records = [dataset.record(i) for i in image_ids]
    return plan_views(
        [(r.image_id, r.height, r.width) for r in records],
        canvas_hw=canvas_hw,
        scales=tuple(config.scales),
        flip=config.flip,
        scale_range=config.scale_range,
        views_per_image=config.views_per_image,
        orient=orient,
    )


def device_quantized(target_specs: Sequence[Any], device: str, mode: str) -> dict[str, str]:
    """``{name: codec}`` of the targets the teacher stage quantizes (`PrecomputeConfig.quantize_on_device`).

    ``auto`` quantizes there with a GPU teacher only: a CPU teacher is the job's
    bottleneck, and its stage cores quantize in the write tasks instead.
    """
    from teacher_service.pipeline_stages import device_quantizable

    if mode == "off" or (mode == "auto" and not device.startswith("cuda")):
        return {}
    return {spec.name: spec.codec for spec in target_specs if device_quantizable(spec.codec)}


def transfer_dtypes(target_specs: Sequence[Any], device: str) -> dict[str, str]:
    """Targets that may cross the object store as float16 without changing the stored bytes.

    Only on a GPU (where the cast is free) and only for targets whose codec stores
    float16 values: a float16 -> float32 -> float16 round trip is exact.
    """
    if device == "cpu":
        return {}
    return {spec.name: "float16" for spec in target_specs if str(spec.codec).split("+", 1)[0] == "fp16"}


def _store_exists(config: PrecomputeConfig) -> bool:
    from label_store.errors import StoreNotFoundError
    from label_store.reader import read_store_targets

    try:
        read_store_targets(config.store, config.storage_options)
    except StoreNotFoundError:
        return False
    return True


def fit_store_bases(config: PrecomputeConfig, dataset, layout: StoreLayout, views: Sequence[Any]) -> list:
    """The layout's target specs with a channel basis fitted for every transform codec
    (`label_store.fit_target_bases`), on the teacher's targets for ``views``.

    Runs in the driver, one view at a time (views may lie on either canvas), on
    ``config.device`` where the driver has it (``auto``: a GPU if this process sees one),
    before the job: a new store's schema holds its bases from the start, and a resumed
    store never refits them. Views whose image cannot be decoded, or whose targets are
    not finite, are left out (the job records their failures); the same views of the
    same images give the same bases.

    Raises:
        PrecomputeInputError: no view gave usable targets.
    """
    import numpy as np
    import torch

    from detcore.images import load_image
    from detcore.teacher import load_teacher
    from detcore.views import render_array
    from label_store.schema import TARGET_GROUPS, fit_target_bases
    from teacher_service.pipeline_stages import describe_error, select_device

    started = time.perf_counter()
    specs = list(layout.target_specs)
    names = [spec.name for spec in specs if spec.target_codec.needs_basis and spec.transform is None]
    groups = tuple(g for g in TARGET_GROUPS if any(name.split("/", 1)[0] == g for name in names))
    device = select_device(config.device)
    teacher = load_teacher(config.teacher, device=device, precision=config.precision, class_mapping=layout.class_mapping)
    sample: list[dict[str, np.ndarray]] = []
    skipped: list[str] = []
    for view in views:
        try:
            pixels = render_array(load_image(dataset.image_path(view.image_id), view.image_id), view)
        except Exception as error:  # the job records this view's failure; the basis does without it
            skipped.append(f"image_id={view.image_id} view_id={view.view_id}: {describe_error(error)}")
            continue
        with torch.inference_mode():
            produced = teacher.forward(torch.from_numpy(pixels[None]).to(device), backbone="backbone" in groups).to_targets(groups)
        targets = {name: produced[name][0].float().cpu().numpy() for name in names}
        if not all(np.isfinite(value).all() for value in targets.values()):
            skipped.append(f"image_id={view.image_id} view_id={view.view_id}: the teacher produced NaN or inf")
            continue
        sample.append(targets)
    del teacher
    if device.startswith("cuda"):
        torch.cuda.empty_cache()  # the teacher actors need the memory
    if not sample:
        raise PrecomputeInputError(
            f"precompute expects the first {len(views)} planned views to give targets to fit the channel basis of "
            f"{names} ({'; '.join(skipped[:3]) or 'no views planned'}). Fix those images or choose int codecs with --codec."
        )
    logger.info(
        "precompute: fitted the channel bases of %d targets on %d views in %.1f s%s",
        len(names), len(sample), time.perf_counter() - started, f" ({len(skipped)} left out)" if skipped else "",
    )
    return fit_target_bases(specs, sample)


def run_precompute(
    config: PrecomputeConfig,
    *,
    on_progress: Callable[[int, int, int], None] | None = None,
) -> PrecomputeSummary:
    """Fill (or resume filling) ``config.store`` with the teacher's targets for every view.

    Args:
        config: the job.
        on_progress: called about twice a second from a background thread with
            ``(views stored, views failed, views to do)`` of this run.

    Raises:
        PrecomputeInputError: a missing file, an unknown image id, dataset categories the
            teacher lacks (without allow_missing_classes), a bad class map, a bad config value.
        label_store.StoreMismatchError: the store exists and was made by another
            teacher, canvas or target set (the message lists the differences).

    SIGINT or SIGTERM stops the job within seconds (`detcore.interrupt.StopRequest`): parts
    committed so far stay, parts in flight stay invisible, a local cluster the job started
    is shut down, and the summary (``interrupted_by``) counts what was committed; running
    the same job again resumes.
    """
    started = time.perf_counter()
    config.validate()
    dataset = _load_dataset(config)
    layout = store_layout(config, dataset.classes)
    if layout.class_mapping is not None:
        logger.info("precompute: teacher classes mapped to the dataset's categories:\n%s", layout.class_mapping.describe())
    region = config.store_region()
    _check_region_codecs(layout, region)
    store = _create_store(config, dataset, layout, region)
    layout = dataclasses.replace(layout, target_specs=tuple(store.targets))
    _log_region_limits(config, store)
    views, todo, skipped = _plan_todo(config, dataset, layout, store)
    totals, ray_init_seconds, pinning, interrupted = _run_todo(config, dataset, layout, store, todo, on_progress)
    if totals["failures"]:
        store.record_failures(totals["failures"])
    return _summary(
        config, views, skipped, todo, totals,
        seconds=time.perf_counter() - started, ray_init_seconds=ray_init_seconds, pinning=pinning, interrupted=interrupted,
    )


def _load_dataset(config: PrecomputeConfig):
    """The job's `detcore.coco.CocoDataset`; a bad annotation file raises `PrecomputeInputError`."""
    from detcore.coco import AnnotationError, CocoDataset

    try:
        return CocoDataset(config.annotations, config.images_dir)
    except AnnotationError as error:
        raise PrecomputeInputError(str(error)) from error


def _check_region_codecs(layout: StoreLayout, region) -> None:
    """Refuse transform codecs for a region group's targets: they are stored at every point,
    which defeats storing the group only in LD's region."""
    regional = [s for s in layout.target_specs if region is not None and s.group in region.groups and s.target_codec.needs_basis]
    if regional:
        flags = " / ".join(f"--{group}-region ld" for group in dict.fromkeys(s.group for s in regional))
        raise PrecomputeInputError(
            f"{flags} expects int or float codecs for the region's targets. Got transform codecs (pca-std<k>, "
            f"stored at every point) for {[s.name for s in regional]}; choose another with --codec."
        )


def _create_store(config: PrecomputeConfig, dataset, layout: StoreLayout, region):
    """The job's `label_store.writer.Store`: created, with channel bases fitted for its
    transform codecs when it is new, or opened to resume."""
    from label_store.writer import create_store

    specs = list(layout.target_specs)
    if any(spec.target_codec.needs_basis and spec.transform is None for spec in specs) and not _store_exists(config):
        # A new store: fit its bases once. An existing one kept its own (`store_layout`), or
        # holds another codec, which create_store refuses below without fitting anything.
        specs = fit_store_bases(config, dataset, layout, plan_job(config, dataset, layout.canvas_hw)[: config.basis_views])
    storage_options = dict(config.storage_options) or None
    return create_store(
        config.store, layout.fingerprint, specs, exist_ok=True, storage_options=storage_options, region=region,
    )


def _log_region_limits(config: PrecomputeConfig, store) -> None:
    """Log which method cannot train from ``store`` because a group is stored only in LD's region."""
    if store.region is not None and "cls" in store.region.groups:
        logger.info("precompute: cls stored only where LD reads it; BCD cannot train from %s", config.store)
    elif store.region is not None and "edges" not in config.target_groups:
        logger.info("precompute: box stored only where LD reads it; without edges in --targets, BCD cannot train from %s", config.store)


def _plan_todo(config: PrecomputeConfig, dataset, layout: StoreLayout, store) -> tuple[list, list, int]:
    """(every planned view, the views this run does, the number already committed): the
    views not yet in ``store``, at most ``config.max_views`` of them."""
    # A store of one non-square canvas (schema 1) resumes with the views it was planned with.
    orient = len(store.canvases) > 1 or layout.canvas_hw[0] == layout.canvas_hw[1]
    views = plan_job(config, dataset, layout.canvas_hw, orient=orient)
    committed = store.committed_keys()
    todo = [v for v in views if v.key not in committed]
    skipped = len(views) - len(todo)
    if config.max_views is not None:
        todo = todo[: config.max_views]
    logger.info("precompute: %d views planned, %d already committed, %d to do", len(views), skipped, len(todo))
    return views, todo, skipped


def _run_todo(
    config: PrecomputeConfig, dataset, layout: StoreLayout, store, todo: list, on_progress,
) -> tuple[dict[str, Any], float, tuple[tuple[int, ...], tuple[int, ...]] | None, int | None]:
    """Run the pipeline over ``todo`` on Ray, stoppable by SIGINT or SIGTERM: (the totals,
    seconds to start Ray, `init_ray`'s CPU pinning, the signal that stopped the run or None)."""
    if not todo:
        return _empty_totals(), 0.0, None, None
    parts_before = set(store.committed_parts())
    ray_started = time.perf_counter()
    started_ray, pinning = init_ray(config)
    ray_init_seconds = time.perf_counter() - ray_started
    # Installed after ray.init, which replaces the driver's SIGTERM handler.
    stop = StopRequest(raise_at_once=True)
    interrupted: int | None = None
    try:
        with stop:
            totals = _run_per_canvas(config, dataset, layout, store.canvases, todo, on_progress, pinning=pinning)
    except Interrupted:
        interrupted = stop.signum
    finally:
        if started_ray:
            shutdown_ray()
    if interrupted is not None:
        totals = _interrupted_totals(store, parts_before, {v.key for v in todo})
    return totals, ray_init_seconds, pinning, interrupted


def _summary(
    config: PrecomputeConfig, views: list, skipped: int, todo: list, totals: dict[str, Any], *,
    seconds: float, ray_init_seconds: float, pinning, interrupted: int | None,
) -> PrecomputeSummary:
    """The job's summary from its plan (views planned, already committed, done this run) and the run's totals."""
    failures = tuple((f["image_id"], f["view_id"], f["reason"]) for f in totals["failures"])
    left = len(views) - skipped - len(todo)
    return PrecomputeSummary(
        store=config.store,
        views_planned=len(views),
        views_skipped=skipped,
        views_stored=int(totals["stored"]),
        views_failed=len(failures),
        views_left=left + max(0, len(todo) - int(totals["stored"]) - len(failures)),
        num_parts=int(totals["parts"]),
        bytes_written=int(totals["bytes"]),
        seconds=seconds,
        ray_init_seconds=ray_init_seconds,
        decode_seconds=float(totals["decode_s"]),
        forward_seconds=float(totals["forward_s"]),
        encode_seconds=float(totals["encode_s"]),
        write_seconds=float(totals["write_s"]),
        failures=failures,
        teacher_cpus=pinning[0] if pinning else (),
        stage_cpus=pinning[1] if pinning else (),
        stage_slots=int(totals.get("stage_slots", 0)),
        num_actors=config.num_actors,
        views_quantized_on_device=int(totals.get("quantized", 0)),
        interrupted_by=signal.Signals(interrupted).name if interrupted is not None else None,
    )


def _empty_totals() -> dict[str, Any]:
    """Write totals of a run that stored nothing (the keys `_summary` reads)."""
    totals: dict[str, Any] = {"parts": 0, "stored": 0, "bytes": 0, "failures": []}
    for name in ("decode_s", "forward_s", "encode_s", "write_s"):
        totals[name] = 0.0
    return totals


def _run_per_canvas(
    config: PrecomputeConfig, dataset, layout: StoreLayout, canvases: Sequence[Any], todo: list, on_progress,
    pinning: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
) -> dict[str, Any]:
    """One pipeline run per store canvas (a batch of the teacher is one canvas); the summed totals."""
    index = {canvas.canvas_hw: i for i, canvas in enumerate(canvases)}
    groups: dict[int, list] = {}
    for view in todo:
        where = index.get((view.canvas_h, view.canvas_w))
        if where is None:
            raise PrecomputeInputError(
                f"run_precompute expects views on the store's canvases {list(index)}. Got {view.canvas_h}x{view.canvas_w} "
                f"(image_id={view.image_id} view_id={view.view_id})."
            )
        groups.setdefault(where, []).append(view)
    totals: dict[str, Any] = {}
    done = [0, 0]

    def progress(stored: int, failed: int, _total: int) -> None:
        if on_progress is not None:
            on_progress(done[0] + stored, done[1] + failed, len(todo))

    for where in sorted(groups):
        result = _run_pipeline(config, dataset, layout, groups[where], progress, pinning=pinning, canvas=canvases[where])
        for key, value in result.items():
            if key == "stage_slots":
                totals[key] = max(totals.get(key, 0), value)
            elif isinstance(value, list):
                totals[key] = totals.get(key, []) + value
            elif isinstance(value, (int, float)):
                totals[key] = totals.get(key, 0) + value
        done[0] += int(result.get("stored", 0))
        done[1] += len(result.get("failures", []))
    return totals


def _interrupted_totals(store, parts_before: set[str], todo_keys: set) -> dict[str, Any]:
    """The totals of an interrupted run, from the manifest: the parts it committed (the
    write tasks' own reports died with the job)."""
    totals = _empty_totals()
    totals["parts"] = len(set(store.committed_parts()) - parts_before)
    totals["stored"] = len(store.committed_keys() & todo_keys)
    return totals


def _run_pipeline(
    config: PrecomputeConfig, dataset, layout: StoreLayout, todo: list, on_progress,
    pinning: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
    canvas: Any = None,
) -> dict[str, Any]:
    """Build and run the Ray Data pipeline over ``todo`` views; the aggregated write totals.

    ``pinning``: `cpu_pinning`'s (teacher cores, stage cores), or None.
    ``canvas``: the store canvas (`label_store.schema.StoreCanvas`) every view of ``todo``
    is on; None: the layout's canvas.
    """
    specs = tuple(canvas.targets) if canvas is not None else layout.target_specs
    teacher_cpus, stage_cpus = pinning or (None, None)
    from ray.data import DataContext

    from teacher_service.pipeline_stages import FAULT_ENV, parse_fault

    fault = parse_fault(os.environ.get(FAULT_ENV))
    items = _view_items(dataset, todo, with_gt_boxes=config.store_region() is not None)
    device = _cluster_device(config)
    task_concurrency = _task_concurrency(config)
    with _ray_data_settings(DataContext.get_current()):
        predictor_kwargs = _predictor_kwargs(config, layout, specs, device, fault, teacher_cpus)
        pipeline = _teacher_stages(
            config, layout, items, predictor_kwargs, fault=fault, stage_cpus=stage_cpus, task_concurrency=task_concurrency,
        )
        result = _write_views(
            config, layout, pipeline, len(todo), on_progress, fault=fault, stage_cpus=stage_cpus, task_concurrency=task_concurrency,
        )
    # Pinned stages share their cores, however many task slots Ray has for them.
    result["stage_slots"] = min(task_concurrency, len(stage_cpus)) if stage_cpus else task_concurrency
    return result


def _view_items(dataset, todo: list, *, with_gt_boxes: bool) -> list[dict[str, Any]]:
    """The pipeline's input rows, one per view of ``todo``: its ids, the view and its image path.

    ``with_gt_boxes``: also the image's GT boxes (float32 bytes), from which a region store's
    decode tasks render each view's GT and compute its stored points.
    """
    from teacher_service.pipeline_stages import GT_BOXES_COLUMN

    items = [{"image_id": v.image_id, "view_id": v.view_id, "view": v, "path": str(dataset.image_path(v.image_id))} for v in todo]
    if with_gt_boxes:
        import numpy as np

        for item, view in zip(items, todo):
            item[GT_BOXES_COLUMN] = np.ascontiguousarray(dataset.targets(view.image_id).gt_boxes, dtype=np.float32).tobytes()
    return items


def _cluster_device(config: PrecomputeConfig) -> str:
    """The teacher actors' device (``auto``: cuda when the cluster has a GPU), once the
    cluster is known to hold the job's actors and at least one decode/write task.

    Raises:
        PrecomputeInputError: more GPU actors than GPUs, or actors and a task need more CPUs than there are.
    """
    import ray

    resources = ray.cluster_resources()
    num_gpus = int(resources.get("GPU", 0))
    device = config.device if config.device != "auto" else ("cuda" if num_gpus else "cpu")
    if device.startswith("cuda") and config.num_actors > num_gpus:
        raise PrecomputeInputError(
            f"PrecomputeConfig(num_actors=) expects at most one teacher actor per GPU of the cluster ({num_gpus}). "
            f"Got {config.num_actors}; lower --num-actors or add GPU nodes."
        )
    if config.cpus_needed > float(resources.get("CPU", 0)):
        # Otherwise the actors hold every CPU, no decode task is ever scheduled and the job hangs.
        raise PrecomputeInputError(
            f"PrecomputeConfig(num_actors=, cpus_per_actor=, cpus_per_task=) expects the teacher actors plus one "
            f"decode/write task to fit the cluster's {resources.get('CPU', 0):g} CPUs. Got {config.num_actors} x "
            f"{config.cpus_per_actor:g} + {config.cpus_per_task:g}; lower --num-actors, --cpus-per-actor or "
            f"--cpus-per-task, or add CPUs to the cluster."
        )
    return device


def _predictor_kwargs(
    config: PrecomputeConfig, layout: StoreLayout, specs: Sequence[Any], device: str, fault, teacher_cpus,
) -> dict[str, Any]:
    """`TeacherPredictor`'s constructor arguments for ``specs`` on ``device`` (threads and
    pinned cores apply to a CPU teacher only)."""
    cuda = device.startswith("cuda")
    return {
        "teacher_path": str(Path(config.teacher).resolve()),
        "target_shapes": {spec.name: tuple(int(v) for v in spec.shape) for spec in specs},
        "class_mapping": layout.class_mapping,
        "batch_size": config.batch_size,
        "device": device,
        "precision": config.precision,
        "torch_threads": None if cuda else (config.torch_threads or max(1, int(config.cpus_per_actor))),
        "transfer_dtypes": transfer_dtypes(specs, device),
        "quantize": device_quantized(specs, device, config.quantize_on_device),
        "fault": fault,
        "cpu_affinity": tuple(teacher_cpus) if teacher_cpus and not cuda else None,
    }


def _teacher_stages(
    config: PrecomputeConfig, layout: StoreLayout, items: list[dict[str, Any]], predictor_kwargs: dict[str, Any], *,
    fault, stage_cpus, task_concurrency: int,
):
    """The lazy `ray.data.Dataset` of ``items`` through the decode tasks and the teacher actor pool."""
    import ray
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    from teacher_service.pipeline_stages import TeacherPredictor, decode_and_render

    block = config.block_views
    num_blocks = max(1, min(math.ceil(len(items) / block), 4096))
    region = config.store_region()
    decode_region = None if region is None else {"region": region.to_dict(), "strides": list(layout.fingerprint["strides"])}
    actor_resources: dict[str, Any] = {"num_cpus": config.cpus_per_actor}
    if predictor_kwargs["device"].startswith("cuda"):
        actor_resources["num_gpus"] = 1
    with warnings.catch_warnings():
        # Bounded retries need max_retries / max_restarts / max_task_retries, which Ray 2.60
        # takes only through the deprecated **ray_remote_args (its defaults retry forever).
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        return (
            ray.data.from_items(items, override_num_blocks=num_blocks)
            .map_batches(
                decode_and_render,
                batch_size=block,
                batch_format="numpy",
                fn_kwargs={"fault": fault, "niceness": config.cpu_stage_niceness, "cpus": stage_cpus, "region": decode_region},
                num_cpus=config.cpus_per_task,
                # No more tasks than inputs (Ray Data warns about a cap it cannot reach).
                compute=TaskPoolStrategy(size=min(task_concurrency, num_blocks)),
                max_retries=MAX_RETRIES,
            )
            .map_batches(
                TeacherPredictor,
                batch_size=block,
                batch_format="numpy",
                compute=ActorPoolStrategy(size=config.num_actors),
                fn_constructor_kwargs=predictor_kwargs,
                max_restarts=MAX_RETRIES,
                max_task_retries=MAX_RETRIES,
                **actor_resources,
            )
        )


def _write_views(
    config: PrecomputeConfig, layout: StoreLayout, pipeline, num_views: int, on_progress, *,
    fault, stage_cpus, task_concurrency: int,
) -> dict[str, Any]:
    """Run ``pipeline`` into a `LabelStoreDatasink` (one committed part per write task) while
    polling its progress; the sink's write totals."""
    import ray

    from teacher_service.pipeline_ray import LabelStoreDatasink, ProgressCounter

    region = config.store_region()
    counter = ProgressCounter.remote()
    sink = LabelStoreDatasink(
        config.store,
        layout.fingerprint,
        layout.target_specs,
        storage_options=dict(config.storage_options) or None,
        views_per_part=config.views_per_part,
        progress=counter,
        niceness=config.cpu_stage_niceness,
        cpus=stage_cpus,
        fault=fault,
        region=None if region is None else region.to_dict(),
    )
    try:
        with ProgressPoller(counter, num_views, config.show_progress, on_progress), warnings.catch_warnings():
            # The write cap is an upper bound; a small job whose outputs arrive as fewer
            # blocks than the cap is fine, and Ray Data's warning about it is noise.
            warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks for 'Write'")
            pipeline.write_datasink(
                sink,
                ray_remote_args={"num_cpus": config.cpus_per_task, "max_retries": MAX_RETRIES},
                # No more tasks than parts to write (Ray Data warns about a cap it cannot reach).
                concurrency=min(task_concurrency, max(1, math.ceil(num_views / config.views_per_part))),
            )
    finally:
        ray.kill(counter)
    if sink.result is None:
        raise RuntimeError("LabelStoreDatasink expects on_write_complete to run after a successful write. It did not.")
    return sink.result


@contextlib.contextmanager
def _ray_data_settings(context) -> Iterator[None]:
    """The job's Ray Data settings (``context``: a `ray.data.DataContext`), restored on exit.

    Our own bar counts committed views, so Ray Data's per-operator bars (they would
    interleave with it) are off; and the ``view`` column holds `detcore.views.View`
    values, which Ray Data pickles (an explicit setting, so it does so without first
    warning that Arrow could not hold them).
    """
    names = ("enable_progress_bars", "print_on_execution_start", "enable_fallback_to_arrow_object_ext_type")
    saved = {name: getattr(context, name) for name in names}
    context.enable_progress_bars = context.print_on_execution_start = False
    context.enable_fallback_to_arrow_object_ext_type = True
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(context, name, value)


def _task_concurrency(config: PrecomputeConfig) -> int:
    """Decode (and write) tasks in flight at once: the CPUs the teacher actors leave free.

    Without a cap, decode tasks can take every CPU of a small cluster before the teacher
    actors are placed, and the actors' start-up (seconds: torch import, checkpoint load)
    no longer overlaps with decoding.
    """
    import ray

    cpus = float(ray.cluster_resources().get("CPU", 0))
    free = cpus - config.actor_cpus
    return max(1, int(free // config.cpus_per_task))
