"""What one precompute run is asked to do: `PrecomputeConfig` and its validation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from label_store.schema import DEFAULT_STORED_GROUPS, TARGET_GROUPS

DEVICES = ("auto", "cpu", "cuda")
QUANTIZE_MODES = ("auto", "on", "off")
CODEC_PROFILE_MODES = ("auto", "small", "fast")
REGION_MODES = ("dense", "ld")
"""``--box-region`` / ``--cls-region``: a group at every point, or only where LD reads it."""
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
    target_groups: tuple[str, ...] = DEFAULT_STORED_GROUPS
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
    basis_views: int = 16
    """Views a new store's channel bases are fitted on, for transform codecs (``pca-std<k>``,
    the ``fpn`` and dense ``cls`` defaults): the plan's first views, in order, through the teacher in the driver
    (`teacher_service.precompute.fit_store_bases`). A resumed store keeps its bases."""
    box_region: str = "dense"
    """``dense`` stores ``box`` at every point; ``ld`` only where LD reads it (the ATSS
    candidates and the VLR of `region_topk` / `region_vlr_alpha`, from each view's GT:
    `label_store.StoreRegion`). BCD reads the teacher's boxes at every point, so it trains
    from such a store's ``edges`` (store them too)."""
    cls_region: str = "dense"
    """``dense`` stores ``cls`` at every point; ``ld`` only in the same region as ``box_region``
    (LD reads the class logits at the ATSS positives, ``ld_kd``). BCD reads them at every
    point, so it cannot train from such a store."""
    region_topk: int = 9
    """ATSS topk the region serves (LD's and the student's ``topk``)."""
    region_vlr_alpha: float = 0.25
    """Smallest VLR alpha the region serves (LD's ``alpha``; a run may use a larger one)."""
    region_vlr_diou: str = "standard"
    """DIoU flavour of the VLR the region serves (``standard`` or ``released``)."""
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

    def _region_modes(self) -> tuple[tuple[str, str], ...]:
        """``(group, mode)`` of ``--cls-region`` and ``--box-region``, in store order."""
        return (("cls", self.cls_region), ("box", self.box_region))

    def region_groups(self) -> tuple[str, ...]:
        """Groups stored only in the region: ``cls`` and / or ``box``, by ``cls_region`` and ``box_region``."""
        return tuple(group for group, mode in self._region_modes() if mode != "dense")

    def store_region(self):
        """The `label_store.StoreRegion` of `region_groups` (None when both are ``dense``); the
        student's point convention is this project's (0.5)."""
        groups = self.region_groups()
        if not groups:
            return None
        from label_store.schema import StoreRegion

        return StoreRegion(groups, self.region_topk, self.region_vlr_alpha, self.region_vlr_diou, 0.5)

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
        for name in ("batch_size", "num_actors", "views_per_part", "basis_views"):
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
        self._validate_region()
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

    def _validate_region(self) -> None:
        """Raise `PrecomputeInputError` naming ``--box-region`` / ``--cls-region`` or the region settings."""
        for group, mode in self._region_modes():
            flag = f"--{group}-region"
            if mode not in REGION_MODES:
                raise PrecomputeInputError(f"PrecomputeConfig({group}_region=) ({flag}) expects one of {list(REGION_MODES)}. Got {mode!r}.")
            if mode != "dense" and group not in self.target_groups:
                raise PrecomputeInputError(
                    f"PrecomputeConfig({group}_region=) ({flag} {mode}) expects '{group}' among the target groups. "
                    f"Got {list(self.target_groups)}."
                )
        try:
            self.store_region()
        except ValueError as error:
            raise PrecomputeInputError(f"--region-topk / --region-vlr-alpha / --region-vlr-diou: {error}") from None
