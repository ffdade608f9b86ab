"""The precompute job: run a teacher over every view of a dataset and fill a label store.

Pipeline (Ray Data, streaming)::

    plan views (annotation sizes)  ->  skip views already committed (resume)
      -> ray.data.from_items
      -> map_batches(decode_and_render)            CPU tasks; a bad image -> error rows
      -> map_batches(TeacherPredictor)             actor pool, one actor per GPU or CPU actors
      -> write_datasink(LabelStoreDatasink)        one committed part per write task
      -> failures table (driver)                   every view that could not be produced

The view recipe is planned from the annotation file's image sizes; rendering checks the
decoded size against it, so an image changed since annotation fails its views instead of
storing targets for other pixels.

Stage seconds in `PrecomputeSummary` are worker-seconds summed over tasks (decode:
decoding and rendering; forward: the teacher's forward pass; encode: device-to-host copy
and dtype cast of the outputs; write: codec encoding, compression and the part commit),
so they can add up to more than the wall time when stages overlap.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from detcore.interrupt import Interrupted, StopRequest, stop_signals_blocked_for_children
from label_store.schema import TARGET_GROUPS  # the one definition, re-exported for the CLI

logger = logging.getLogger("teacher_service.precompute")

DEVICES = ("auto", "cpu", "cuda")
QUANTIZE_MODES = ("auto", "on", "off")
CODEC_PROFILE_MODES = ("auto", "small", "fast")
MAX_RETRIES = 3
"""Retries of a task, and restarts of a teacher actor, after its process died (then the job fails)."""
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


class PrecomputeInputError(ValueError):
    """Bad input to the precompute job (missing file, bad config, classes that do not map)."""


@dataclass(frozen=True, slots=True)
class PrecomputeConfig:
    """Everything one precompute run needs; built by the CLI or by a script."""

    annotations: str
    """COCO annotation JSON of the images to precompute."""
    images_dir: str
    """Folder that the annotation file's ``file_name`` entries are relative to."""
    teacher: str
    """Teacher checkpoint (`detcore.checkpoint`)."""
    store: str
    """Label store path or fsspec URL; created if missing, resumed if it exists."""
    canvas_hw: tuple[int, int] | None = None
    """Store canvas ``(H, W)``; None uses the canvas recorded in the teacher checkpoint."""
    scales: tuple[float, ...] = (1.0,)
    """View scales relative to mmdetection's keep-ratio scale for the canvas, each in (0, 1]."""
    scale_range: tuple[float, float] | None = None
    """``(LO, HI)``: plan ``views_per_image`` scales per image spread over it instead of ``scales``."""
    views_per_image: int | None = None
    """N views (before flips) per image with ``scale_range``."""
    flip: bool = True
    """Add a mirrored twin of every scale."""
    target_groups: tuple[str, ...] = ("cls", "box", "fpn")
    """Target groups to store, from `TARGET_GROUPS`."""
    codecs: tuple[tuple[str, str], ...] = ()
    """Codec overrides ``((group or target name, codec name), ...)``, e.g. ``(("fpn", "int8-channel"),)``."""
    class_map: tuple[tuple[str, str], ...] = ()
    """Teacher class renames ``((teacher name, dataset name), ...)`` for `detcore.classes.map_classes`."""
    allow_missing_classes: bool = False
    """Accept dataset categories the teacher lacks: recorded in the store, left out of class distillation."""
    codec_profile: str = "auto"
    """Default codecs' profile (`label_store.codecs.profile_codec`): ``small`` (the default
    codecs), ``fast`` (their quantizers with a fast zstd level, for writers that keep up with
    a GPU teacher) or ``auto`` (``fast`` with a GPU teacher, else ``small``); ``codecs`` win."""
    batch_size: int = 8
    """Views per teacher forward pass."""
    num_actors: int = 1
    """Teacher actors (one per GPU on GPU nodes)."""
    cpus_per_actor: float = 1.0
    """CPUs Ray reserves for each teacher actor."""
    cpus_per_task: float = 1.0
    """CPUs Ray reserves for each decode and write task."""
    torch_threads: int | None = None
    """Intra-op threads of each CPU actor; None: ``max(1, int(cpus_per_actor))``."""
    device: str = "auto"
    """Teacher device: ``auto`` (a GPU where the actor's node has one), ``cpu`` or ``cuda``."""
    precision: str = "auto"
    """Autocast: ``auto`` (bf16 or fp16 on GPU, fp32 on CPU), ``fp32``, ``bf16``, ``fp16``."""
    quantize_on_device: str = "auto"
    """Quantize the int-coded targets in the teacher stage (`pipeline_stages.quantize_batch`)
    rather than in the write tasks: ``auto`` with a GPU teacher (uint8 codes leave the GPU,
    a quarter of the float32 bytes to the host, through the object store and to a writer
    on another node), ``on``, ``off``. The stored bytes are the same either way."""
    views_per_part: int = 32
    """Views a write task gathers into one part (the last part of a run may be smaller)."""
    cpu_stage_niceness: int = 10
    """Lower the CPU priority of decoding and writing by this nice increment (Linux, per
    thread; 0 keeps it): they then fill the cycles a CPU teacher leaves idle."""
    pin_cpus: bool = True
    """On a local cluster started by the job with a CPU teacher (Linux): keep the teacher
    actors on cores of their own and decoding and writing on the others (`cpu_pinning`).
    Without it, preemptions cost a CPU teacher 8-15% of its speed on a 2-core machine
    (benchmarks/RESULTS.md, "CPU pinning and block size")."""
    storage_options: tuple[tuple[str, str], ...] = ()
    """fsspec options for a remote store, ``((key, value), ...)``."""
    image_ids: tuple[int, ...] | None = None
    """Only these images (None: all images of the annotation file)."""
    max_views: int | None = None
    """Process at most this many of the views not yet committed (a later run does the rest)."""
    ray_address: str | None = None
    """Ray cluster to join; None starts a local one (ignored when Ray is already initialised)."""
    num_cpus: int | None = None
    """CPUs of a local cluster started here; None: ``os.cpu_count()``."""
    show_progress: bool = True
    """Show a tqdm progress bar (views/s, ETA) on stderr."""

    @property
    def actor_cpus(self) -> float:
        """Logical CPUs the teacher actors hold together."""
        return self.num_actors * self.cpus_per_actor

    @property
    def block_views(self) -> int:
        """Views per Ray Data block, i.e. per decode task, teacher call and (usually) part.

        One part's worth (`views_per_part`), rounded up to whole forward batches: every
        block costs the driver, the raylet and the object store a task and a few objects
        whatever its size, and with a fast teacher that fixed cost competes with the
        forward for the CPU (at canvas 128 on 2 cores, 32-view blocks instead of 8-view ones
        took a 1600-view job from 1.79x to 1.58x the bare forward; benchmarks/RESULTS.md,
        "CPU pinning and block size"). The teacher still runs `batch_size` views per forward pass, and
        the write task still gathers at least `views_per_part` rows per part.
        """
        return self.batch_size * math.ceil(self.views_per_part / self.batch_size)

    @property
    def cpus_needed(self) -> float:
        """Logical CPUs the job cannot run without: its teacher actors plus one decode/write task."""
        return self.actor_cpus + self.cpus_per_task

    def validate(self) -> None:
        """Raise `PrecomputeInputError` naming the first field that is not usable."""
        for name in ("annotations", "teacher"):
            path = Path(getattr(self, name))
            if not path.is_file():
                raise PrecomputeInputError(f"PrecomputeConfig({name}=) expects an existing file. Got {str(path)!r}.")
        if not Path(self.images_dir).is_dir():
            raise PrecomputeInputError(f"PrecomputeConfig(images_dir=) expects an existing folder. Got {self.images_dir!r}.")
        if self.canvas_hw is not None and (len(self.canvas_hw) != 2 or min(self.canvas_hw) <= 0):
            raise PrecomputeInputError(f"PrecomputeConfig(canvas_hw=) expects two positive ints (H, W). Got {self.canvas_hw}.")
        if not self.scales or any(not (0 < s <= 1) for s in self.scales):
            raise PrecomputeInputError(f"PrecomputeConfig(scales=) expects factors in (0, 1]. Got {list(self.scales)}.")
        from detcore.views import ViewError, check_scales

        try:
            check_scales(self.scales, self.scale_range, self.views_per_image, "PrecomputeConfig")
        except ViewError as error:
            raise PrecomputeInputError(str(error)) from None
        unknown = [g for g in self.target_groups if g not in TARGET_GROUPS]
        if not self.target_groups or unknown:
            raise PrecomputeInputError(
                f"PrecomputeConfig(target_groups=) expects a non-empty subset of {list(TARGET_GROUPS)}. "
                f"Got {list(self.target_groups)}."
            )
        for name in ("batch_size", "num_actors", "views_per_part"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise PrecomputeInputError(f"PrecomputeConfig({name}=) expects a positive int. Got {value!r}.")
        for name in ("cpus_per_actor", "cpus_per_task"):
            if not getattr(self, name) > 0:
                raise PrecomputeInputError(f"PrecomputeConfig({name}=) expects a positive number. Got {getattr(self, name)!r}.")
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise PrecomputeInputError(f"PrecomputeConfig(device=) expects one of {list(DEVICES)}. Got {self.device!r}.")
        if self.precision not in PRECISIONS:
            raise PrecomputeInputError(f"PrecomputeConfig(precision=) expects one of {list(PRECISIONS)}. Got {self.precision!r}.")
        if self.codec_profile not in CODEC_PROFILE_MODES:
            raise PrecomputeInputError(
                f"PrecomputeConfig(codec_profile=) (--codec-profile) expects one of {list(CODEC_PROFILE_MODES)}. "
                f"Got {self.codec_profile!r}."
            )
        if self.quantize_on_device not in QUANTIZE_MODES:
            raise PrecomputeInputError(
                f"PrecomputeConfig(quantize_on_device=) expects one of {list(QUANTIZE_MODES)}. Got {self.quantize_on_device!r}."
            )
        if not isinstance(self.cpu_stage_niceness, int) or not 0 <= self.cpu_stage_niceness <= 19:
            raise PrecomputeInputError(
                f"PrecomputeConfig(cpu_stage_niceness=) expects an int in [0, 19]. Got {self.cpu_stage_niceness!r}."
            )
        if not isinstance(self.pin_cpus, bool):
            raise PrecomputeInputError(f"PrecomputeConfig(pin_cpus=) expects True or False. Got {self.pin_cpus!r}.")
        if self.max_views is not None and self.max_views < 0:
            raise PrecomputeInputError(f"PrecomputeConfig(max_views=) expects None or >= 0. Got {self.max_views}.")


@dataclass(frozen=True, slots=True)
class PrecomputeSummary:
    """What one precompute run did."""

    store: str
    """The store's path or URL."""
    views_planned: int
    """Views of the selected images (all scales and flips)."""
    views_skipped: int
    """Views already committed by an earlier run, not recomputed."""
    views_stored: int
    """Views committed by this run."""
    views_failed: int
    """Views that could not be produced; each is in the store's failures table with its reason."""
    views_left: int
    """Views neither committed nor failed (only when ``max_views`` cut the run short)."""
    num_parts: int
    """Parts committed by this run."""
    bytes_written: int
    """Bytes of the parts committed by this run (as the store reports them)."""
    seconds: float
    """Wall time of the run, Ray start-up included."""
    ray_init_seconds: float
    """Of which starting or joining the Ray cluster."""
    decode_seconds: float
    """Worker-seconds decoding and rendering."""
    forward_seconds: float
    """Worker-seconds in the teacher's forward pass."""
    encode_seconds: float
    """Worker-seconds moving outputs off the device and casting them."""
    write_seconds: float
    """Worker-seconds in write tasks (codec encoding, compression, commit)."""
    failures: tuple[tuple[int, int, str], ...] = ()
    """``(image_id, view_id, reason)`` of the views that failed in this run."""
    teacher_cpus: tuple[int, ...] = ()
    """Cores the teacher actors were pinned to (empty: no pinning, see `cpu_pinning`)."""
    stage_cpus: tuple[int, ...] = ()
    """Cores decoding and writing were pinned to, beside the teacher's."""
    stage_slots: int = 0
    """Decode and write tasks that could run at once: the task slots the cluster had beside
    the teacher actors, or the cores the stages were pinned to where fewer (0: nothing ran)."""
    num_actors: int = 1
    """Teacher actors of the job."""
    views_quantized_on_device: int = 0
    """Stored views whose int-coded targets the teacher stage quantized (`PrecomputeConfig.quantize_on_device`)."""
    interrupted_by: str | None = None
    """``SIGINT`` or ``SIGTERM`` when a signal stopped the run (its committed parts stay; the
    stage seconds and bytes of an interrupted run are not known and read 0); None otherwise."""

    @property
    def bottleneck(self) -> str:
        """Which side bound the job, from the stage worker-seconds: the teacher, or decode + write.

        The teacher side is the forward and device-to-host seconds per actor; the CPU side is
        the decode and write worker-seconds spread over `stage_slots`. Both are lower bounds
        of the time each side needed; the larger says what to add. Start-up and the tail
        (the first block waiting for its decode, the last part's write) are in neither.
        """
        if not self.views_stored or not self.stage_slots:
            return "-"
        teacher = (self.forward_seconds + self.encode_seconds) / max(1, self.num_actors)
        stages = (self.decode_seconds + self.write_seconds) / self.stage_slots
        if stages > teacher:
            remedy = "more CPUs beside the teacher"
            if self.write_seconds > self.decode_seconds:  # the codecs' encoding, mostly
                remedy += ", or cheaper codecs (--codec-profile fast, or --codec fpn=... per group),"
            return (
                f"decode + write on the CPU: {self.decode_seconds + self.write_seconds:.1f} worker-s over "
                f"{self.stage_slots} task slot(s), >= {stages:.1f} s, against the teacher's {teacher:.1f} s per actor; "
                f"{remedy} would shorten it"
            )
        return (
            f"the teacher: {teacher:.1f} s per actor, against >= {stages:.1f} s of decode + write per task slot "
            f"({self.stage_slots})"
        )

    @property
    def views_per_second(self) -> float:
        """Views committed per second of wall time (0 when nothing ran)."""
        return self.views_stored / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["failures"] = [list(f) for f in self.failures]
        out["teacher_cpus"], out["stage_cpus"] = list(self.teacher_cpus), list(self.stage_cpus)
        out["views_per_second"] = self.views_per_second
        out["bound_by"] = self.bottleneck
        return out

    def format(self) -> str:
        """The end-of-run table."""
        rows = [
            ("store", self.store),
            ("views planned", f"{self.views_planned}"),
            ("already committed (skipped)", f"{self.views_skipped}"),
            ("stored", f"{self.views_stored} in {self.num_parts} part(s)"),
            ("failed", f"{self.views_failed}"),
        ]
        if self.interrupted_by:
            rows.append(("interrupted by", f"{self.interrupted_by}: the views above stay committed"))
        if self.views_left:
            rows.append(("left for a later run", f"{self.views_left}"))
        rows += [
            ("bytes written", _format_bytes(self.bytes_written)),
            ("wall time", f"{self.seconds:.1f} s (Ray start {self.ray_init_seconds:.1f} s)"),
            ("throughput", f"{self.views_per_second:.2f} views/s"),
            ("decode + render", f"{self.decode_seconds:.1f} worker-s"),
            ("teacher forward", f"{self.forward_seconds:.1f} worker-s"),
            ("encode (to host)", f"{self.encode_seconds:.1f} worker-s"
             + (f", {self.views_quantized_on_device} view(s) quantized there" if self.views_quantized_on_device else "")),
            ("write (codecs + commit)", f"{self.write_seconds:.1f} worker-s"),
            ("CPU pinning", _format_pinning(self.teacher_cpus, self.stage_cpus)),
            ("bound by", self.bottleneck),
        ]
        width = max(len(name) for name, _ in rows)
        lines = [f"  {name:<{width}}  {value}" for name, value in rows]
        if self.failures:
            lines.append(f"  first failures (all {self.views_failed} are in the store's failures table):")
            for image_id, view_id, reason in self.failures[:5]:
                lines.append(f"    image_id={image_id} view_id={view_id}: {reason}")
        return "\n".join(lines)


def _format_pinning(teacher: Sequence[int], stages: Sequence[int]) -> str:
    if not teacher:
        return "off"
    return f"teacher on CPU {','.join(map(str, teacher))}; decode and write on CPU {','.join(map(str, stages))}"


def _format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


@dataclass(frozen=True, slots=True)
class StoreLayout:
    """What the teacher checkpoint and the config decide about the store."""

    fingerprint: dict[str, Any]
    """Teacher fingerprint as stored in the manifest (canvas set to the store's canvas)."""
    target_specs: tuple[Any, ...]
    """`label_store.TargetSpec` of every stored target, in store order."""
    canvas_hw: tuple[int, int]
    """The store's canvas ``(H, W)``."""
    classes: tuple[str, ...]
    """Class names of the stored ``cls`` channels: the dataset's categories, in its order."""
    class_mapping: Any = None
    """`detcore.classes.ClassMapping` from the teacher's classes to ``classes``; None when they are the same."""

    @property
    def target_shapes(self) -> dict[str, tuple[int, ...]]:
        """``{name: (C, H_l, W_l)}``."""
        return {spec.name: tuple(int(s) for s in spec.shape) for spec in self.target_specs}


def split_codecs(codecs: Sequence[tuple[str, str]], target_groups: Sequence[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Codec overrides -> ``(per group, per target name)``, checked against the stored groups."""
    per_group: dict[str, str] = {}
    per_target: dict[str, str] = {}
    for name, codec in codecs:
        group = name.split("/", 1)[0]
        if group not in target_groups:
            raise PrecomputeInputError(
                f"PrecomputeConfig(codecs=) expects a group or target of the stored groups {list(target_groups)}. "
                f"Got {name!r}={codec!r}."
            )
        (per_target if "/" in name else per_group)[name] = codec
    return per_group, per_target


def resolve_codec_profile(config: PrecomputeConfig) -> str:
    """``small`` or ``fast``: ``auto`` is ``fast`` when the teacher runs on a GPU (``--device
    cuda``, or ``auto`` with a GPU visible to this process), else ``small``."""
    if config.codec_profile != "auto":
        return config.codec_profile
    if config.device.startswith("cuda"):
        return "fast"
    if config.device == "cpu":
        return "small"
    import torch

    return "fast" if torch.cuda.is_available() else "small"


def profile_codecs(config: PrecomputeConfig) -> dict[str, str]:
    """Codec per stored group under the resolved codec profile (before ``codecs`` overrides)."""
    from label_store.codecs import profile_codec
    from label_store.schema import DEFAULT_CODECS

    profile = resolve_codec_profile(config)
    return {group: profile_codec(DEFAULT_CODECS[group], profile) for group in config.target_groups}


def store_layout(config: PrecomputeConfig, dataset_classes: Sequence[str] | None = None) -> StoreLayout:
    """Fingerprint and target specs of the store that ``config`` fills (loads the teacher once).

    ``dataset_classes``: the categories the store's ``cls`` targets hold, mapped from the
    teacher's classes by name (`detcore.classes.map_classes` with the config's class map);
    None keeps the teacher's classes.
    """
    from detcore.classes import ClassMappingError, map_classes
    from detcore.teacher import TeacherGroupError, load_teacher

    teacher = load_teacher(config.teacher, device="cpu", precision="fp32")
    if dataset_classes is not None:
        try:
            mapping = map_classes(
                teacher.teacher_classes, dataset_classes, class_map=dict(config.class_map), allow_missing=config.allow_missing_classes
            )
        except ClassMappingError as error:
            hint = " (--class-map FILE, --allow-missing-classes)"
            raise PrecomputeInputError(f"{error}{hint} Dataset: {config.annotations}; teacher: {config.teacher}.") from error
        teacher.use_class_mapping(mapping)
    elif config.class_map or config.allow_missing_classes:
        raise PrecomputeInputError("store_layout(config=) with a class map or allow_missing_classes expects dataset_classes.")
    fingerprint = teacher.fingerprint()
    canvas_hw = tuple(int(v) for v in (config.canvas_hw or fingerprint["canvas_hw"]))
    fingerprint["canvas_hw"] = list(canvas_hw)
    per_group, per_target = split_codecs(config.codecs, config.target_groups)
    try:
        # Explicit overrides win over the profile; an explicit profile counts as a choice on resume.
        codecs = {**profile_codecs(config), **per_group}
        chosen_groups = codecs if config.codec_profile != "auto" else per_group
        specs = teacher.target_specs(tuple(config.target_groups), canvas_hw, codecs=codecs)
        unknown = sorted(set(per_target) - {spec.name for spec in specs})
        if unknown:
            raise PrecomputeInputError(
                f"PrecomputeConfig(codecs=) expects target names of this store {[s.name for s in specs]}. Got {unknown}."
            )
        specs = [dataclasses.replace(s, codec=per_target[s.name]) if s.name in per_target else s for s in specs]
        specs = _keep_existing_codecs(config, specs, chosen_groups, per_target)
    except PrecomputeInputError:
        raise
    except TeacherGroupError as error:  # e.g. --targets box for a teacher without edge distributions
        raise PrecomputeInputError(f"--targets: {error}") from error
    except ValueError as error:  # an unknown codec name: the message carries the grammar
        raise PrecomputeInputError(str(error)) from error
    return StoreLayout(fingerprint, tuple(specs), canvas_hw, tuple(teacher.classes), teacher.class_mapping)


def _keep_existing_codecs(config: PrecomputeConfig, specs: list, per_group: dict, per_target: dict) -> list:
    """Resuming a store: targets whose codec the caller did not choose keep the store's codec.

    Default codecs can change between versions; a store filled under older defaults must
    still resume with the same command. An explicit ``codecs`` choice that differs from the
    store is still refused (by `create_store`, naming each target).
    """
    from label_store.errors import StoreNotFoundError
    from label_store.reader import read_store_targets

    try:
        existing = read_store_targets(config.store, config.storage_options)
    except StoreNotFoundError:
        return specs
    stored = {spec.name: spec for spec in existing}
    out, kept = [], []
    for spec in specs:
        chosen = spec.name in per_target or spec.group in per_group
        old = stored.get(spec.name)
        if not chosen and old is not None and tuple(old.shape) == tuple(spec.shape) and old.codec != spec.codec:
            kept.append(f"{spec.name} {old.codec}")
            spec = dataclasses.replace(spec, codec=old.codec)
        out.append(spec)
    if kept:
        logger.info("resuming %s with the codecs it was written with (current defaults differ): %s", config.store, ", ".join(kept))
    return out


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


class _ProgressPoller:
    """Polls the `ProgressCounter` actor from a daemon thread and drives a tqdm bar."""

    def __init__(self, counter, total: int, show: bool, on_progress: Callable[[int, int, int], None] | None) -> None:
        from tqdm.auto import tqdm

        self.counter = counter
        self.total = total
        self.on_progress = on_progress
        self.bar = tqdm(total=total, unit="view", desc="precompute", disable=not show, dynamic_ncols=True)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="precompute-progress", daemon=True)
        self.seen = 0

    def _poll(self) -> None:
        import ray

        stored, failed, _ = ray.get(self.counter.get.remote(), timeout=10)
        done = stored + failed
        if done > self.seen:
            self.bar.update(done - self.seen)
            self.seen = done
        self.bar.set_postfix(failed=failed, refresh=False)
        if self.on_progress is not None:
            self.on_progress(stored, failed, self.total)

    def _run(self) -> None:
        while not self.stop.wait(0.5):
            try:
                self._poll()
            except Exception as error:  # progress is cosmetic; never let it end the job
                logger.debug("progress poll failed: %s", error)

    def __enter__(self) -> "_ProgressPoller":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        if exc[0] is None:
            try:
                self._poll()
            except Exception as error:
                logger.debug("final progress poll failed: %s", error)
        self.bar.close()


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
    from detcore.coco import AnnotationError, CocoDataset
    from label_store.writer import create_store

    try:
        dataset = CocoDataset(config.annotations, config.images_dir)
    except AnnotationError as error:
        raise PrecomputeInputError(str(error)) from error
    layout = store_layout(config, dataset.classes)
    if layout.class_mapping is not None:
        logger.info("precompute: teacher classes mapped to the dataset's categories:\n%s", layout.class_mapping.describe())
    storage_options = dict(config.storage_options) or None
    store = create_store(
        config.store, layout.fingerprint, list(layout.target_specs), exist_ok=True, storage_options=storage_options
    )
    # A store of one non-square canvas (schema 1) resumes with the views it was planned with.
    orient = len(store.canvases) > 1 or layout.canvas_hw[0] == layout.canvas_hw[1]
    views = plan_job(config, dataset, layout.canvas_hw, orient=orient)
    committed = store.committed_keys()
    todo = [v for v in views if v.key not in committed]
    skipped = len(views) - len(todo)
    if config.max_views is not None:
        todo = todo[: config.max_views]
    left = len(views) - skipped - len(todo)
    logger.info("precompute: %d views planned, %d already committed, %d to do", len(views), skipped, len(todo))

    totals: dict[str, Any] = {"parts": 0, "stored": 0, "bytes": 0, "failures": []}
    for name in ("decode_s", "forward_s", "encode_s", "write_s"):
        totals[name] = 0.0
    ray_init_seconds = 0.0
    pinning = None
    interrupted: int | None = None
    if todo:
        parts_before = set(store.committed_parts())
        ray_started = time.perf_counter()
        started_ray, pinning = init_ray(config)
        ray_init_seconds = time.perf_counter() - ray_started
        # Installed after ray.init, which replaces the driver's SIGTERM handler.
        stop = StopRequest(raise_at_once=True)
        try:
            with stop:
                totals = _run_per_canvas(config, dataset, layout, store.canvases, todo, on_progress, pinning=pinning)
        except Interrupted:
            interrupted = stop.signum
        finally:
            if started_ray:
                _shutdown_ray()
        if interrupted is not None:
            totals = _interrupted_totals(store, parts_before, {v.key for v in todo})
        if totals["failures"]:
            store.record_failures(totals["failures"])
    failures = tuple((f["image_id"], f["view_id"], f["reason"]) for f in totals["failures"])
    return PrecomputeSummary(
        store=config.store,
        views_planned=len(views),
        views_skipped=skipped,
        views_stored=int(totals["stored"]),
        views_failed=len(failures),
        views_left=left + max(0, len(todo) - int(totals["stored"]) - len(failures)),
        num_parts=int(totals["parts"]),
        bytes_written=int(totals["bytes"]),
        seconds=time.perf_counter() - started,
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


def _shutdown_ray() -> None:
    """Stop (or leave) the cluster the job started (or joined); a failure there is logged, not
    raised, so that the summary of the committed parts still comes."""
    import ray

    try:
        ray.shutdown()
    except Exception as error:
        logger.warning("shutting down the local Ray cluster: %s", error)


def _interrupted_totals(store, parts_before: set[str], todo_keys: set) -> dict[str, Any]:
    """The totals of an interrupted run, from the manifest: the parts it committed (the
    write tasks' own reports died with the job)."""
    totals: dict[str, Any] = {"failures": []}
    for name in ("decode_s", "forward_s", "encode_s", "write_s"):
        totals[name] = 0.0
    totals["parts"] = len(set(store.committed_parts()) - parts_before)
    totals["stored"] = len(store.committed_keys() & todo_keys)
    totals["bytes"] = 0
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
    import ray
    from ray.data import ActorPoolStrategy, DataContext, TaskPoolStrategy

    from teacher_service.pipeline_ray import LabelStoreDatasink, ProgressCounter
    from teacher_service.pipeline_stages import FAULT_ENV, TeacherPredictor, decode_and_render, parse_fault

    fault = parse_fault(os.environ.get(FAULT_ENV))

    items = [
        {"image_id": v.image_id, "view_id": v.view_id, "view": v.to_json(), "path": str(dataset.image_path(v.image_id))}
        for v in todo
    ]
    block = config.block_views
    num_blocks = max(1, min(math.ceil(len(items) / block), 4096))
    resources = ray.cluster_resources()
    num_gpus = int(resources.get("GPU", 0))
    device = config.device if config.device != "auto" else ("cuda" if num_gpus and config.device != "cpu" else "cpu")
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
    torch_threads = config.torch_threads or max(1, int(config.cpus_per_actor))
    actor_resources: dict[str, Any] = {"num_cpus": config.cpus_per_actor}
    if device.startswith("cuda"):
        actor_resources["num_gpus"] = 1
    task_concurrency = _task_concurrency(config)
    # No more tasks than inputs (Ray Data warns about a cap it cannot reach).
    decode_concurrency = min(task_concurrency, num_blocks)
    write_concurrency = min(task_concurrency, max(1, math.ceil(len(items) / config.views_per_part)))

    with warnings.catch_warnings():
        # Bounded retries need max_retries / max_restarts / max_task_retries, which Ray 2.60
        # takes only through the deprecated **ray_remote_args (its defaults retry forever).
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        pipeline = (
            ray.data.from_items(items, override_num_blocks=num_blocks)
            .map_batches(
                decode_and_render,
                batch_size=block,
                batch_format="numpy",
                fn_kwargs={"fault": fault, "niceness": config.cpu_stage_niceness, "cpus": stage_cpus},
                num_cpus=config.cpus_per_task,
                compute=TaskPoolStrategy(size=decode_concurrency),
                max_retries=MAX_RETRIES,
            )
            .map_batches(
                TeacherPredictor,
                batch_size=block,
                batch_format="numpy",
                compute=ActorPoolStrategy(size=config.num_actors),
                fn_constructor_kwargs={
                    "teacher_path": str(Path(config.teacher).resolve()),
                    "target_shapes": {spec.name: tuple(int(v) for v in spec.shape) for spec in specs},
                    "class_mapping": layout.class_mapping,
                    "batch_size": config.batch_size,
                    "device": device,
                    "precision": config.precision,
                    "torch_threads": None if device.startswith("cuda") else torch_threads,
                    "transfer_dtypes": transfer_dtypes(specs, device),
                    "quantize": device_quantized(specs, device, config.quantize_on_device),
                    "fault": fault,
                    "cpu_affinity": tuple(teacher_cpus) if teacher_cpus and not device.startswith("cuda") else None,
                },
                max_restarts=MAX_RETRIES,
                max_task_retries=MAX_RETRIES,
                **actor_resources,
            )
        )
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
    )
    context = DataContext.get_current()
    saved = (context.enable_progress_bars, context.print_on_execution_start)
    # Our own bar counts committed views; Ray Data's per-operator bars would interleave with it.
    context.enable_progress_bars, context.print_on_execution_start = False, False
    try:
        with _ProgressPoller(counter, len(todo), config.show_progress, on_progress), warnings.catch_warnings():
            # The write cap is an upper bound; a small job whose outputs arrive as fewer
            # blocks than the cap is fine, and Ray Data's warning about it is noise.
            warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks for 'Write'")
            pipeline.write_datasink(
                sink,
                ray_remote_args={"num_cpus": config.cpus_per_task, "max_retries": MAX_RETRIES},
                concurrency=write_concurrency,
            )
    finally:
        context.enable_progress_bars, context.print_on_execution_start = saved
        ray.kill(counter)
    if sink.result is None:
        raise RuntimeError("LabelStoreDatasink expects on_write_complete to run after a successful write. It did not.")
    # Pinned stages share their cores, however many task slots Ray has for them.
    sink.result["stage_slots"] = min(task_concurrency, len(stage_cpus)) if stage_cpus else task_concurrency
    return sink.result


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
