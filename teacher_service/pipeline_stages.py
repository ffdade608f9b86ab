"""Worker-side stages of the precompute job: decode + render, teacher inference, fault hooks.

Legend: N views in a batch, canvas H x W, C channels of one target.

Every stage works on Ray Data numpy batches (``dict[str, ndarray]``, one entry per
column, N rows). The columns carried from stage to stage:

    image_id      int64[N]
    view_id       int64[N]
    view          object[N]         the `detcore.views.View` itself (Ray Data carries it pickled)
    content_hash  object[N]         `detcore.views.content_hash` of the decoded pixels ("" on error)
    valid_region  int64[N, 4]       (x1, y1, x2, y2) of the canvas covered by image pixels
    error         object[N]         "" for a good view, else why it could not be produced
    pixels        float32[N, 3, H, W]   rendered canvas (zeros on error); dropped by the teacher
    <target>      float32[N, C, H_l, W_l] or float16, one column per store target
                  (``cls/p3`` ...); zeros on error rows; added by the teacher
    <target>, <target>#scale, <target>#offset   uint8[N, C, H_l, W_l], float32[N, Pc] twice:
                  a target quantized by the teacher stage, a `label_store.encoding.QuantizedTarget`
                  flattened into Ray Data columns (`quantized_columns`, `quantized_from_columns`)
    originals     object[N]         see `ORIGINALS_COLUMN` (only when the teacher stage quantizes)
    decode_s, forward_s, encode_s   float64[N]  each row's share of its batch's stage time
    region        object[N]         region stores only: `numpy.packbits` of the view's stored-point
                  mask (`detcore.assign.stored_region` of its GT rendered through the view);
                  computed from ``gt_boxes`` (float32 bytes of the image's [M, 4] GT boxes in
                  image pixels, an input column)

A view that cannot be produced (missing, corrupt or resized image; a teacher output with
NaN or inf) becomes a row whose ``error`` says why, never an exception: one bad image must
not fail a block of good ones.
Nothing here imports Ray, so the stages are testable as plain functions.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from label_store.encoding import QuantizedTarget
from label_store.schema import TARGET_GROUPS

PASSTHROUGH_COLUMNS = ("image_id", "view_id", "view", "content_hash", "valid_region", "error", "decode_s")
"""Columns the teacher stage copies from its input to its output (``error`` may gain entries);
``region`` too when present."""

GT_BOXES_COLUMN, REGION_COLUMN = "gt_boxes", "region"
"""Input column of a region store's job (the image's GT boxes) and the column of each view's packed mask."""

SCALE_SUFFIX, OFFSET_SUFFIX = "#scale", "#offset"
"""Columns ``<target>#scale`` / ``<target>#offset`` beside a target quantized by the teacher stage."""

ORIGINALS_COLUMN = "originals"
"""Float32 bytes of a view's quantized targets (in target order) for the writer's fidelity
sample; empty for the other views."""


def quantized_columns(quantized: Mapping[str, QuantizedTarget]) -> dict[str, np.ndarray]:
    """A batch's quantized targets as Ray Data columns: ``<name>`` (the codes), ``<name>#scale``, ``<name>#offset``.

    Ray Data keeps arrays as Arrow tensor columns, while a column of `QuantizedTarget`
    values would be pickled row by row, codes and all; so the value crosses the Ray Data
    boundary flattened, by this and `quantized_from_columns`, the one pair that does.
    """
    columns: dict[str, np.ndarray] = {}
    for name, value in quantized.items():
        columns[name], columns[name + SCALE_SUFFIX], columns[name + OFFSET_SUFFIX] = value
    return columns


def quantized_from_columns(batch: Mapping[str, np.ndarray]) -> dict[str, QuantizedTarget]:
    """Inverse of `quantized_columns`: name -> the batch's `QuantizedTarget` (``.row(i)``: view i's); {} when none."""
    names = [str(column)[: -len(SCALE_SUFFIX)] for column in batch if str(column).endswith(SCALE_SUFFIX)]
    return {name: QuantizedTarget(batch[name], batch[name + SCALE_SUFFIX], batch[name + OFFSET_SUFFIX]) for name in names}


DEVICE_SCALINGS = ("view", "channel")
"""Int-codec scalings `quantize_batch` reproduces exactly (``std`` needs a float64 standard
deviation whose summation order the device would not match)."""

FAULT_ENV = "DISTILLERY_PRECOMPUTE_FAULT"
"""Testing hook, read on the driver: ``<point>:<marker_dir>`` makes the first process that
reaches ``<point>`` SIGKILL itself once (the marker file makes it once per job, across
processes and retries). Points: ``decode``, ``teacher``, ``write-before-commit``,
``write-after-commit``; and ``stall-after-commit``, which instead holds every write task
after its commit until ``<marker_dir>/release`` exists (a job that cannot end by itself,
for the interruption tests)."""

FAULT_POINTS = ("decode", "teacher", "write-before-commit", "write-after-commit", "stall-after-commit")
STALL_POINT = "stall-after-commit"


class FaultSpecError(ValueError):
    """A malformed `FAULT_ENV` value."""


def parse_fault(spec: str | None) -> tuple[str, str] | None:
    """``"teacher:/tmp/x"`` -> ``("teacher", "/tmp/x")``; None or "" -> None."""
    if not spec:
        return None
    point, sep, marker_dir = spec.partition(":")
    if not sep or point not in FAULT_POINTS or not marker_dir:
        raise FaultSpecError(
            f"{FAULT_ENV} expects '<point>:<marker_dir>' with point in {list(FAULT_POINTS)}. Got {spec!r}."
        )
    return (point, marker_dir)


def maybe_inject_fault(fault: tuple[str, str] | None, point: str) -> None:
    """SIGKILL this process if ``fault`` targets ``point`` and no process has done so yet (or stall, see `FAULT_ENV`)."""
    if fault is None or fault[0] != point:
        return
    if point == STALL_POINT:
        while not (Path(fault[1]) / "release").exists():
            time.sleep(0.05)
        return
    marker = Path(fault[1]) / f"killed-{point}"
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, f"{os.getpid()}\n".encode())
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


def run_at_lower_priority(niceness: int, fn, /, *args, cpus: Sequence[int] | None = None, **kwargs):
    """``fn(*args, **kwargs)`` in a helper thread whose CPU priority is lowered by ``niceness``.

    Decoding and writing only have to keep pace with the teacher; where they share cores
    with a CPU teacher, a lower priority lets them use the cycles the forward pass leaves
    idle instead of slowing it down, and ``cpus`` (the stage cores of
    `teacher_service.ray_runtime.cpu_pinning`) keeps the thread off the teacher's cores
    altogether. On Linux the nice value and the CPU mask are per thread, so only this
    short-lived thread is affected (never the pooled Ray worker, which may later host a
    teacher actor); elsewhere, or with ``niceness=0`` and no ``cpus``, ``fn`` runs in the
    calling thread. Lowering one's own priority needs no privilege.
    """
    if (niceness <= 0 and not cpus) or not sys.platform.startswith("linux"):
        return fn(*args, **kwargs)
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            if cpus:
                os.sched_setaffinity(0, {int(c) for c in cpus})
            if niceness > 0:
                tid = threading.get_native_id()
                os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + niceness))
        except OSError:  # e.g. a seccomp profile that forbids it: run as the worker does
            pass
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as error:  # re-raised in the calling thread
            outcome["error"] = error

    thread = threading.Thread(target=target, name="precompute-low-priority")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def describe_error(error: BaseException) -> str:
    """One line naming the exception type and its message (the failures table's ``reason``)."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def decode_and_render(
    batch: Mapping[str, np.ndarray],
    *,
    fault: tuple[str, str] | None = None,
    niceness: int = 0,
    cpus: Sequence[int] | None = None,
    region: Mapping[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """Decode each image once per batch and render its views onto the canvas.

    Args:
        batch: columns ``image_id``, ``view_id``, ``view`` (`detcore.views.View`) and ``path`` (image file),
            and ``gt_boxes`` with ``region``.
        fault: testing hook, see `FAULT_ENV`.
        niceness: run at this lower CPU priority (`run_at_lower_priority`).
        cpus: and on these cores (None: wherever the worker runs).
        region: ``{"region": StoreRegion.to_dict(), "strides": [...]}`` of a region store: add
            each view's packed stored-point mask (``region`` column); None: no masks.

    Returns:
        The columns of the module docstring up to ``decode_s`` (``pixels`` included), and ``region``.
    """
    out = run_at_lower_priority(niceness, _decode_and_render, batch, fault, cpus=cpus)
    if region is not None:
        out[REGION_COLUMN] = view_region_masks(batch, region)
    return out


def view_region_masks(batch: Mapping[str, np.ndarray], region: Mapping[str, Any]) -> np.ndarray:
    """``numpy.packbits`` of every view's stored-point mask (`detcore.assign.stored_region`), object[N] of bytes."""
    from detcore.assign import stored_region
    from detcore.views import image_to_view_boxes

    settings = region["region"]
    out = np.full(len(batch["view"]), b"", dtype=object)
    for i, view in enumerate(batch["view"]):
        boxes = image_to_view_boxes(np.frombuffer(batch[GT_BOXES_COLUMN][i], dtype=np.float32).reshape(-1, 4), view)
        mask = stored_region(
            boxes, (view.canvas_h, view.canvas_w), region["strides"], topk=settings["topk"], vlr_alpha=settings["vlr_alpha"],
            vlr_diou=settings["vlr_diou"], point_offset=settings["point_offset"],
        )
        out[i] = np.packbits(mask.numpy()).tobytes()
    return out


def _decode_and_render(batch: Mapping[str, np.ndarray], fault: tuple[str, str] | None) -> dict[str, np.ndarray]:
    from detcore.images import load_image
    from detcore.views import View, content_hash, render_array

    maybe_inject_fault(fault, "decode")
    start = time.perf_counter()
    views = list(batch["view"])
    wrong = [type(view).__name__ for view in views if not isinstance(view, View)]
    if wrong:
        raise TypeError(f"decode_and_render(batch=) expects a view column of detcore.views.View. Got {sorted(set(wrong))}.")
    paths = [str(p) for p in batch["path"]]
    num_views = len(views)
    canvas_h, canvas_w = (views[0].canvas_h, views[0].canvas_w) if views else (0, 0)
    pixels = np.zeros((num_views, 3, canvas_h, canvas_w), dtype=np.float32)
    hashes = np.full(num_views, "", dtype=object)
    errors = np.full(num_views, "", dtype=object)
    regions = np.zeros((num_views, 4), dtype=np.int64)
    # The views of one image (flip twins, scales) are adjacent, so most decode once per batch.
    decoded: dict[str, tuple[np.ndarray, str] | BaseException] = {}
    for i, (view, path) in enumerate(zip(views, paths)):
        regions[i] = view.valid_region
        if path not in decoded:
            try:
                image = load_image(path, view.image_id)
                decoded[path] = (image, content_hash(image))
            except Exception as error:  # any decode failure is this image's, not the job's
                decoded[path] = error
        entry = decoded[path]
        if isinstance(entry, BaseException):
            errors[i] = describe_error(entry)
            continue
        try:
            if (view.canvas_h, view.canvas_w) != (canvas_h, canvas_w):
                raise ValueError(
                    f"decode_and_render expects one canvas per store, {canvas_h}x{canvas_w}. "
                    f"Got {view.canvas_h}x{view.canvas_w} (image_id={view.image_id} view_id={view.view_id})."
                )
            pixels[i] = render_array(entry[0], view)
            hashes[i] = entry[1]
        except Exception as error:  # e.g. the file's size changed since the views were planned
            errors[i] = describe_error(error)
    elapsed = time.perf_counter() - start
    return {
        "image_id": np.asarray([v.image_id for v in views], dtype=np.int64),
        "view_id": np.asarray([v.view_id for v in views], dtype=np.int64),
        "view": np.asarray(views, dtype=object),
        "content_hash": hashes,
        "valid_region": regions,
        "error": errors,
        "pixels": pixels,
        "decode_s": np.full(num_views, elapsed / max(num_views, 1), dtype=np.float64),
    }


def select_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when torch sees a GPU, else ``"cpu"``; others unchanged."""
    from detcore.teacher import resolve_device

    return resolve_device(device)


def device_quantizable(codec) -> bool:
    """Whether `quantize_batch` can quantize for this codec (a `TargetCodec` or its name)."""
    from label_store.codecs import parse_codec

    codec = parse_codec(codec) if isinstance(codec, str) else codec
    return codec.quantized and codec.scaling in DEVICE_SCALINGS


def quantize_batch(tensor, codec):
    """`label_store.codecs.TargetCodec.encode`'s quantization of a batch, where the tensor is.

    The same float32 arithmetic in the same order (minimum and maximum per view or per
    channel; the range over the levels in float64, rounded to float32; ``(x - offset) *
    (1 / scale)`` rounded half to even and clipped), so the codes, scales and offsets are
    the ones the writer would compute from the float32 values: a store's bytes do not
    depend on where its targets were quantized.

    Args:
        tensor: Tensor[B, C, H, W], any float dtype (computed in float32).
        codec: a quantized `TargetCodec` with ``view`` or ``channel`` scaling.
    Returns:
        A batch's `QuantizedTarget` of tensors on the tensor's device: codes uint8
        Tensor[B, C, H, W] (before the codec's prediction), scale and offset float32
        Tensors[B, Pc].
    """
    import torch

    if not device_quantizable(codec):
        raise ValueError(f"quantize_batch(codec=) expects an int codec with {DEVICE_SCALINGS} scaling. Got {codec.name!r}.")
    levels = (1 << codec.bits) - 1
    x = tensor.float()
    if codec.floor is not None:
        x = x.clamp_min(codec.floor)
    batch, channels = x.shape[:2]
    flat = x.reshape(batch, 1 if codec.scaling == "view" else channels, -1)
    lo = flat.amin(dim=2)
    scale = ((flat.amax(dim=2).double() - lo.double()) / levels).float()
    inverse = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    codes = ((flat - lo[..., None]) * inverse[..., None]).round_().clamp_(0, levels).to(torch.uint8)
    return QuantizedTarget(codes.reshape(x.shape), scale, lo)


def autocast_dtype(device: str, precision: str):
    """The autocast dtype for a device and precision name, or None for float32
    (`detcore.teacher.autocast_dtype`)."""
    from detcore.teacher import autocast_dtype as teacher_autocast_dtype

    return teacher_autocast_dtype(device, precision)


def pin_process(cores: Sequence[int]) -> None:
    """Move every thread of this process onto ``cores`` (Linux; threads started later inherit it).

    A thread that exits meanwhile, or a core the process may not use, is skipped: pinning
    is a speed-up, never a reason to fail the job.
    """
    mask = {int(c) for c in cores}
    try:
        threads = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        threads = [0]
    for tid in threads:
        try:
            os.sched_setaffinity(tid, mask)
        except OSError:
            pass


class TeacherPredictor:
    """Teacher inference as a Ray Data actor: loads the checkpoint once, then maps batches.

    Args:
        teacher_path: the detcore checkpoint.
        target_shapes: ``{name: (C, H_l, W_l)}`` of every store target, in store order.
        batch_size: images per forward pass.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        precision: ``"auto"``, ``"fp32"``, ``"bf16"`` or ``"fp16"`` (autocast; GPU only in practice).
        torch_threads: intra-op threads on the CPU (None leaves torch's default).
        transfer_dtypes: ``{name: "float16"}`` for targets whose codec stores float16
            exactly, so they cross the object store at half the size; others go as float32.
        quantize: ``{name: codec name}`` of targets to quantize here (`quantize_batch`): they
            leave as `QuantizedTarget` columns (`quantized_columns`), a quarter of the
            float32 bytes, and the first ``fidelity_views`` good views of each call also
            carry their float32 values (`ORIGINALS_COLUMN`) for the writer's fidelity
            sample.
        fidelity_views: see ``quantize``; None: the writer's default
            (`label_store.writer.DEFAULT_FIDELITY_VIEWS`).
        fault: testing hook, see `FAULT_ENV`.
        cpu_affinity: cores to keep this actor's process on (every thread of it, and the
            thread of each call), or None; see `teacher_service.ray_runtime.cpu_pinning`.
        class_mapping: `detcore.classes.ClassMapping` from the teacher's classes to the
            store's (`detcore.teacher.Teacher.use_class_mapping`), or None.
    """

    def __init__(
        self,
        teacher_path: str,
        target_shapes: Mapping[str, Sequence[int]],
        batch_size: int,
        device: str = "auto",
        precision: str = "auto",
        torch_threads: int | None = None,
        transfer_dtypes: Mapping[str, str] | None = None,
        fault: tuple[str, str] | None = None,
        cpu_affinity: Sequence[int] | None = None,
        quantize: Mapping[str, str] | None = None,
        fidelity_views: int | None = None,
        class_mapping=None,
    ) -> None:
        self.cpu_affinity = frozenset(int(c) for c in cpu_affinity) if cpu_affinity else None
        if self.cpu_affinity:
            pin_process(self.cpu_affinity)  # before torch starts its thread pools
        from detcore.teacher import load_teacher

        self.device = select_device(device)
        self.teacher = load_teacher(
            teacher_path, device=self.device, precision=precision, torch_threads=torch_threads, class_mapping=class_mapping
        )
        self.target_shapes = {name: tuple(int(s) for s in shape) for name, shape in target_shapes.items()}
        self.with_backbone = any(name.startswith("backbone/") for name in self.target_shapes)
        self.groups = tuple(g for g in TARGET_GROUPS if any(name.split("/", 1)[0] == g for name in self.target_shapes))
        self.batch_size = int(batch_size)
        self.transfer_dtypes = {name: np.dtype((transfer_dtypes or {}).get(name, "float32")) for name in self.target_shapes}
        from label_store.codecs import parse_codec
        from label_store.writer import DEFAULT_FIDELITY_VIEWS

        self.quantize = {name: parse_codec(codec) for name, codec in (quantize or {}).items()}
        unknown = sorted(set(self.quantize) - set(self.target_shapes))
        if unknown:
            raise KeyError(f"TeacherPredictor(quantize=) expects names of its targets. Got {unknown}.")
        self.fidelity_views = DEFAULT_FIDELITY_VIEWS if fidelity_views is None else int(fidelity_views)
        self.fault = fault

    def forward(self, pixels: np.ndarray) -> dict[str, Any]:
        """Tensor[B, 3, H, W] float32 canvas batch -> ``{name: Tensor[B, C, H_l, W_l]}`` on the device."""
        import torch

        images = torch.from_numpy(pixels).to(self.device, non_blocking=True)
        with torch.inference_mode():
            outputs = self.teacher.forward(images, backbone=self.with_backbone)
            produced = outputs.to_targets(self.groups)
        missing = [name for name in self.target_shapes if name not in produced]
        if missing:
            raise KeyError(f"TeacherPredictor expects the teacher to produce targets {missing}. Got {sorted(produced)}.")
        return {name: produced[name] for name in self.target_shapes}

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        if self.cpu_affinity and os.sched_getaffinity(0) != self.cpu_affinity:
            pin_process(self.cpu_affinity)  # a call on a thread started after __init__
        maybe_inject_fault(self.fault, "teacher")
        num_views = len(batch["error"])
        good = np.flatnonzero(np.asarray([e == "" for e in batch["error"]], dtype=bool))
        out = {name: np.asarray(batch[name]) for name in PASSTHROUGH_COLUMNS + ((REGION_COLUMN,) if REGION_COLUMN in batch else ())}
        out["error"] = np.array(out["error"], dtype=object)  # a writable copy: the forward may add errors
        targets = {
            name: np.zeros((num_views, *shape), dtype=self.transfer_dtypes[name])
            for name, shape in self.target_shapes.items()
            if name not in self.quantize
        }
        quantized = {}
        for name, codec in self.quantize.items():
            shape, count = self.target_shapes[name], codec.num_params(self.target_shapes[name][0])
            quantized[name] = QuantizedTarget(
                np.zeros((num_views, *shape), dtype=np.uint8), np.zeros((num_views, count), np.float32), np.zeros((num_views, count), np.float32)
            )
        originals = np.array([b""] * num_views, dtype=object) if self.quantize else None
        sampled = 0
        forward_s = np.zeros(num_views, dtype=np.float64)
        encode_s = np.zeros(num_views, dtype=np.float64)
        pixels = batch["pixels"]
        for first in range(0, len(good), self.batch_size):
            index = good[first : first + self.batch_size]
            start = time.perf_counter()
            produced = self.forward(np.ascontiguousarray(pixels[index]))
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()
            forwarded = time.perf_counter()
            finite = torch.ones(len(index), dtype=torch.bool, device=self.device)
            for name, tensor in produced.items():
                if tuple(tensor.shape[1:]) != self.target_shapes[name]:
                    raise ValueError(
                        f"TeacherPredictor expects target {name} of shape [B, {', '.join(map(str, self.target_shapes[name]))}]. "
                        f"Got {list(tensor.shape)}; the checkpoint does not match the store's target specs."
                    )
                finite &= torch.isfinite(tensor).flatten(1).all(dim=1)
                if name in self.quantize:
                    # uint8 codes: a quarter of the float32 bytes to the host and through the object store.
                    for rows, values in zip(quantized[name], quantize_batch(tensor, self.quantize[name])):
                        rows[index] = values.cpu().numpy()  # codes, scale, offset
                    continue
                # Cast on the device: a float16 transfer halves device->host and object-store bytes.
                dtype = torch.float16 if self.transfer_dtypes[name] == np.float16 else torch.float32
                targets[name][index] = tensor.to(dtype).cpu().numpy()
            # A non-finite output is that view's failure (the store refuses NaN/inf), not the job's.
            bad = set(np.flatnonzero(~finite.cpu().numpy()).tolist())
            for k in sorted(bad):
                out["error"][index[k]] = "TeacherOutputError: the teacher produced NaN or inf for this view"
            if originals is not None and sampled < self.fidelity_views:
                for k in [k for k in range(len(index)) if k not in bad][: self.fidelity_views - sampled]:
                    originals[index[k]] = b"".join(
                        produced[name][k].float().cpu().numpy().tobytes() for name in self.target_shapes if name in self.quantize
                    )
                    sampled += 1
            encoded = time.perf_counter()
            forward_s[index] = (forwarded - start) / len(index)
            encode_s[index] = (encoded - forwarded) / len(index)
        out.update(targets)
        out.update(quantized_columns(quantized))
        if originals is not None:
            out[ORIGINALS_COLUMN] = originals
        out["forward_s"] = forward_s
        out["encode_s"] = encode_s
        return out
