"""The teacher as the online endpoint runs it: decode, render, forward, slice per view.

Legend: B views in a batch, K classes, R reg_max, C channels, canvas H x W.

`OnlineTeacher` wraps a loaded `detcore.teacher.Teacher` with what the endpoint needs to answer:
the canvas every view must use, the target specs (the same `label_store` specs a store
of this teacher holds), the fingerprint and its digest. `prepare_view` (any thread) turns
uploaded bytes plus a view into the normalised canvas; `forward` (the single batcher
thread) runs one batch and returns per-view float32 arrays without the batch dimension.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from detcore.views import View, ViewError, content_hash, render_array
from label_store.schema import DEFAULT_STORED_GROUPS, TARGET_GROUPS
from label_store.wire import fingerprint_digest
from teacher_service.api.problems import MAX_LISTED_ERRORS, RequestProblem, clip_text, short_repr

logger = logging.getLogger(__name__)

DEFAULT_GROUPS = DEFAULT_STORED_GROUPS


@dataclass(frozen=True, slots=True)
class PreparedView:
    """One view ready for the forward pass."""

    view: View
    """The recipe (validated, teacher canvas)."""
    content_hash: str
    """`detcore.views.content_hash` of the decoded source pixels."""
    canvas: np.ndarray
    """float32 ``[3, H, W]``: `detcore.views.render_array` of the view."""
    names: tuple[str, ...]
    """Target names to return for this view."""


def group_of(name: str) -> str:
    """``cls/p3`` -> ``cls``; ``backbone/c3`` -> ``backbone``."""
    return name.split("/", 1)[0]


def decode_image_bytes(
    data: bytes, image_id: int | None, *, check_header: Callable[[int, int], None] | None = None
) -> np.ndarray:
    """Decode an upload with `detcore.images.decode_image_bytes`: the policy of `load_image`,
    so the same file gives the pixels (and content hash) the precompute job saw.

    ``check_header(height, width)`` runs on the header's size before any pixel is decoded.
    Returns uint8 ``[h, w, 3]`` RGB. Raises `detcore.images.ImageDecodeError`.
    """
    from detcore.images import decode_image_bytes as decode

    return decode(data, image_id=image_id, name="<upload>", check_header=check_header)


def check_image_header(view: View, height: int, width: int, max_pixels: int | None) -> None:
    """Refuse an upload from its header alone: more than ``max_pixels`` pixels, or sides that
    are not the view's (in either order: EXIF orientation, applied later, may swap them).

    Raises `ImageTooLarge` or `ImageSizeMismatch`.
    """
    where = f"image_id={view.image_id} view_id={view.view_id}"
    if max_pixels is not None and height * width > max_pixels:
        raise ImageTooLarge(
            f"Image expects at most {max_pixels} pixels. Got a file whose header says {width}x{height} "
            f"= {height * width} pixels ({where}); it was not decoded."
        )
    if sorted((height, width)) != sorted((view.image_h, view.image_w)):
        raise ImageSizeMismatch(
            f"View(image_h=, image_w=) expects the uploaded image to be {view.image_h}x{view.image_w}. "
            f"Got a file whose header says {height}x{width} ({where}); it was not decoded."
        )


class OnlineTeacher:
    """A loaded teacher plus the contract of its answers (canvas, specs, fingerprint).

    Args:
        model: a `detcore.teacher.Teacher` on ``device``.
        device: torch device string.
        canvas_hw: the store canvas ``(H, W)``; views use it or, for portrait images, its
            transpose (`label_store.schema.default_canvases`).
        specs: `label_store.TargetSpec` of every target the teacher can produce, in order.
        fingerprint: the teacher fingerprint dict (`detcore.teacher.Teacher.fingerprint`).
        default_groups: groups answered when a request names none.
    """

    def __init__(
        self,
        model: Any,
        *,
        device: str,
        canvas_hw: tuple[int, int],
        specs: Sequence[Any],
        fingerprint: dict[str, Any],
        default_groups: Sequence[str] = DEFAULT_GROUPS,
    ) -> None:
        self.model = model
        self.device = device
        from label_store.schema import default_canvases

        self.canvas_hw = (int(canvas_hw[0]), int(canvas_hw[1]))
        self.canvases = default_canvases(self.canvas_hw)
        self.specs = list(specs)
        self.fingerprint = dict(fingerprint)
        self.digest = fingerprint_digest(self.fingerprint)
        self._by_name = {spec.name: spec for spec in self.specs}
        self.groups = tuple(g for g in TARGET_GROUPS if any(group_of(s.name) == g for s in self.specs))
        self.default_names = tuple(s.name for s in self.specs if group_of(s.name) in default_groups)

    # loading -------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        checkpoint: str | Path,
        *,
        device: str = "auto",
        precision: str = "auto",
        canvas_hw: tuple[int, int] | None = None,
        codecs: dict[str, str] | None = None,
        torch_threads: int | None = None,
        class_mapping=None,
    ) -> "OnlineTeacher":
        """Load a checkpoint; specs and fingerprint are built as the precompute job builds a store's.

        Args:
            checkpoint: `detcore.checkpoint` file.
            device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``.
            precision: autocast as in precompute: ``auto`` (bf16/fp16 on GPU, fp32 on CPU),
                ``fp32``, ``bf16``, ``fp16``.
            canvas_hw: the canvas views must use; None: the checkpoint's.
            codecs: codec overrides by target group (``{"fpn": "int8-channel"}``), the
                same as the store's so that the bytes are the same.
            torch_threads: intra-op threads on the CPU (None: torch's default).
            class_mapping: `detcore.classes.ClassMapping` from the teacher's classes to the
                store's categories (`serve_class_mapping`), or None for the teacher's own.
        """
        import torch

        from detcore.teacher import load_teacher
        from label_store import TeacherFingerprint
        from teacher_service.pipeline_stages import select_device

        device = select_device(device)
        teacher = load_teacher(
            str(checkpoint), device=device, precision=precision, torch_threads=torch_threads, class_mapping=class_mapping
        )
        fingerprint = teacher.fingerprint()
        canvas_hw = tuple(int(v) for v in (canvas_hw or fingerprint["canvas_hw"]))
        # The store records the canvas it was made for; an endpoint for that store must too.
        fingerprint["canvas_hw"] = list(canvas_hw)
        # Normalised exactly as a store's manifest holds it, so that the digests agree.
        fingerprint = TeacherFingerprint.from_dict(fingerprint).to_dict()
        # Every group the teacher gives, edge distances only where there are no distributions.
        groups = tuple(g for g in teacher.available_groups if g != "edges" or "box" not in teacher.available_groups)
        unknown = [name for name in (codecs or {}) if name not in groups]
        if unknown:
            raise ValueError(f"OnlineTeacher.load(codecs=) expects target groups from {list(groups)}. Got {unknown}.")
        specs = teacher.target_specs(groups, canvas_hw, codecs=codecs)
        transformed = [spec.name for spec in specs if spec.target_codec.needs_basis]
        if transformed:
            from label_store.schema import BASIS_FREE_CODECS

            raise ValueError(
                f"OnlineTeacher.load(codecs=) expects codecs that need no fitted basis: the endpoint has no store to fit "
                f"one on. Got transform codecs (pca-std<k>) for {transformed}; a read-through trainer re-encodes the "
                f"targets with its store's own basis, so serve them with another codec (the endpoint's defaults: "
                f"{', '.join(f'{group} {codec}' for group, codec in BASIS_FREE_CODECS.items())})."
            )
        # One warm-up pass at the real canvas: level shapes, and the allocator.
        with torch.inference_mode():
            probe = teacher.forward(torch.zeros(1, 3, *canvas_hw, device=device), backbone="backbone" in groups)
        shapes = {name: tuple(t.shape[1:]) for name, t in probe.to_targets(groups).items()}
        for spec in specs:
            if tuple(spec.shape) != shapes.get(spec.name):
                raise ValueError(
                    f"OnlineTeacher.load expects the model to produce {spec.name} of shape {tuple(spec.shape)}. "
                    f"Got {shapes.get(spec.name)} (checkpoint={checkpoint})."
                )
        logger.info("teacher %s loaded on %s: canvas %s, %d targets", checkpoint, device, canvas_hw, len(specs))
        return cls(teacher, device=device, canvas_hw=canvas_hw, specs=specs, fingerprint=fingerprint)

    # request side --------------------------------------------------------------------
    def resolve_targets(self, requested: str | Sequence[str] | None) -> list[Any]:
        """The specs a request asks for: groups (``cls``) and/or names (``cls/p3``), comma-separated.

        Raises `RequestProblem` ("unknown-target") naming every unknown entry.
        """
        if requested is None or (isinstance(requested, str) and requested.strip() == ""):
            names = set(self.default_names)
        else:
            items = requested.split(",") if isinstance(requested, str) else list(requested)
            names: set[str] = set()
            unknown: list[str] = []  # the first few only: an answer never grows with the input
            num_unknown = 0
            for raw in items:
                item = str(raw).strip()
                if item in self.groups:
                    names.update(s.name for s in self.specs if group_of(s.name) == item)
                elif item in self._by_name:
                    names.add(item)
                else:
                    num_unknown += 1
                    if len(unknown) < MAX_LISTED_ERRORS:
                        unknown.append(clip_text(item, 64))
            if num_unknown or not names:
                got = (f"{num_unknown} unknown of {len(items)} entries, first {unknown}" if num_unknown
                       else f"no target among {len(items)} entries {short_repr(items)}")
                raise RequestProblem(
                    "unknown-target",
                    f"targets= expects groups {list(self.groups)} or names {list(self._by_name)}. Got {got}.",
                    errors=[{"field": "targets", "value": item, "detail": "unknown target group or name"} for item in unknown],
                    num_errors=num_unknown,
                )
        return [spec for spec in self.specs if spec.name in names]

    def check_view(self, view: View) -> None:
        """Raise `ViewError` unless ``view`` is valid and uses one of this teacher's canvases."""
        view.validate()
        if (view.canvas_h, view.canvas_w) not in self.canvases:
            raise ViewError(
                f"View(canvas=) expects a teacher canvas, {' or '.join(f'{h}x{w}' for h, w in self.canvases)}. "
                f"Got {view.canvas_h}x{view.canvas_w} (image_id={view.image_id} view_id={view.view_id})."
            )

    def specs_for(self, specs: Sequence[Any], canvas_hw: tuple[int, int]) -> list[Any]:
        """``specs`` with the level shapes of ``canvas_hw`` (one of `canvases`)."""
        from label_store.schema import canvas_targets

        return list(specs) if tuple(canvas_hw) == self.canvas_hw else list(canvas_targets(specs, canvas_hw))

    def prepare_view(
        self, view: View, data: bytes, names: Sequence[str], *, max_pixels: int | None = None
    ) -> PreparedView:
        """Check the header's size against the view and ``max_pixels``, decode ``data``,
        check the decoded size against the view, render. Thread-safe.

        Raises `detcore.images.ImageDecodeError`, `ImageTooLarge` or `detcore.views.ViewError`
        (`ImageSizeMismatch`).
        """
        pixels = decode_image_bytes(
            data, view.image_id, check_header=lambda h, w: check_image_header(view, h, w, max_pixels)
        )
        if pixels.shape[:2] != (view.image_h, view.image_w):
            raise ImageSizeMismatch(
                f"View(image_h=, image_w=) expects the uploaded image to be {view.image_h}x{view.image_w}. "
                f"Got {pixels.shape[0]}x{pixels.shape[1]} (image_id={view.image_id} view_id={view.view_id})."
            )
        return PreparedView(view, content_hash(pixels), render_array(pixels, view), tuple(names))

    # batcher side --------------------------------------------------------------------
    def forward(self, batch: Sequence[PreparedView]) -> list[dict[str, np.ndarray]]:
        """One forward pass over a batch; per view, name -> float32 ``[C, H_l, W_l]``."""
        import torch

        wanted = {n for item in batch for n in item.names}
        groups = tuple(g for g in TARGET_GROUPS if any(group_of(n) == g for n in wanted))
        # One forward per canvas: a landscape and a portrait view do not stack.
        members_per_canvas: dict[tuple[int, ...], list[int]] = {}
        for i, item in enumerate(batch):
            members_per_canvas.setdefault(tuple(item.canvas.shape), []).append(i)
        out: list[dict[str, np.ndarray]] = [{} for _ in batch]
        for members in members_per_canvas.values():
            images = torch.from_numpy(np.stack([batch[i].canvas for i in members])).to(self.device)
            with torch.inference_mode():
                outputs = self.model.forward(images, backbone="backbone" in groups)
                arrays = {name: t.float().cpu().numpy() for name, t in outputs.to_targets(groups).items() if name in wanted}
            for row, i in enumerate(members):
                out[i] = {name: arrays[name][row] for name in batch[i].names}
        return out


class ImageSizeMismatch(ViewError):
    """The uploaded image's size (header or decoded) differs from the size recorded in its view."""


class ImageTooLarge(ValueError):
    """The uploaded image's header declares more pixels than the endpoint decodes."""


__all__ = [
    "OnlineTeacher", "PreparedView", "ImageSizeMismatch", "ImageTooLarge", "check_image_header", "decode_image_bytes",
    "group_of",
]
