"""What the endpoint does for one request, independent of HTTP: the FastAPI route and the
Ray Serve handle method both call `TargetService.compute` and get the same bytes.

Order of checks (cheapest first, so a refused request costs little): view count and queue
capacity, target names, every view recipe, then decoding and rendering (in a worker
thread), then the batched forward pass. All bad views of a request are reported together.
"""

from __future__ import annotations

import asyncio
import json
import numbers
from typing import Any, Sequence

import numpy as np

from detcore.views import View, ViewError
from label_store.wire import pack_targets
from teacher_service.api.batching import Announcement, DynamicBatcher
from teacher_service.api.metrics import ServiceMetrics
from teacher_service.api.problems import RequestProblem
from teacher_service.api.settings import ServeSettings
from teacher_service.api.teacher import ImageSizeMismatch, OnlineTeacher, PreparedView


def parse_views(raw: Any) -> list[Any]:
    """The ``views`` field: a JSON list (text or already parsed) of view dicts."""
    if isinstance(raw, (bytes, bytearray)):
        raw = bytes(raw).decode("utf-8", errors="replace")
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as error:
            raise RequestProblem(
                "invalid-request",
                f"views= expects a JSON list of view objects. Got invalid JSON: {error}.",
                errors=[{"field": "views", "detail": str(error)}],
            ) from None
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list):
        raise RequestProblem(
            "invalid-request",
            f"views= expects a JSON list of view objects. Got {type(raw).__name__}.",
            errors=[{"field": "views", "detail": "not a list"}],
        )
    return raw


_INT_FIELDS = ("image_id", "view_id", "canvas_h", "canvas_w", "image_h", "image_w", "offset_x", "offset_y")
_VIEW_FIELDS = frozenset((*_INT_FIELDS, "scale", "flip"))


def check_view_row(row: Any) -> None:
    """Strict JSON types for a view dict (`View.from_dict` would coerce ``"false"`` to True).

    Raises `ViewError` naming the field, the expected type and what came.
    """
    if not isinstance(row, dict):
        raise ViewError(f"View.from_dict expects an object. Got {type(row).__name__}.")
    unknown = sorted(set(row) - _VIEW_FIELDS)
    if unknown:
        raise ViewError(f"View expects only the fields {sorted(_VIEW_FIELDS)}. Got unknown {unknown}.")
    for name in _INT_FIELDS:
        if name in row and (isinstance(row[name], (bool, np.bool_)) or not isinstance(row[name], numbers.Integral)):
            raise ViewError(f"View({name}=) expects an integer. Got {row[name]!r}.")
    if "scale" in row and (isinstance(row["scale"], (bool, np.bool_)) or not isinstance(row["scale"], numbers.Real)):
        raise ViewError(f"View(scale=) expects a number. Got {row['scale']!r}.")
    if "flip" in row and not isinstance(row["flip"], (bool, np.bool_)):
        raise ViewError(f"View(flip=) expects true or false. Got {row['flip']!r}.")


class TargetService:
    """Teacher + dynamic batcher + metrics: answers lists of (view, image bytes)."""

    def __init__(self, teacher: OnlineTeacher, settings: ServeSettings, metrics: ServiceMetrics) -> None:
        self.teacher = teacher
        self.settings = settings
        self.metrics = metrics
        self.batcher: DynamicBatcher[PreparedView, dict] = DynamicBatcher(
            teacher.forward,
            max_batch=settings.max_batch,
            max_wait_s=settings.max_wait_ms / 1000.0,
            max_queue=settings.max_queue,
            min_retry_after_s=settings.retry_after_s,
            on_batch=self._observe_batch,
            on_depth=metrics.queue_depth.set,
        )

    @property
    def max_views_per_request(self) -> int:
        """A request can never hold more views than the queue admits."""
        return self.settings.max_queue

    def start(self) -> None:
        self.batcher.start()

    async def close(self) -> None:
        await self.batcher.close()

    def _observe_batch(self, size: int, seconds: float) -> None:
        self.metrics.batch_size.observe(size)
        self.metrics.batch_duration.observe(seconds)

    def describe(self) -> dict[str, Any]:
        """``GET /v1/teacher``: fingerprint, target specs, digest, and the limits in force."""
        return {
            "fingerprint": self.teacher.fingerprint,
            "digest": self.teacher.digest,
            "targets": [spec.to_dict() for spec in self.teacher.specs],
            "default_targets": list(self.teacher.default_names),
            "groups": list(self.teacher.groups),
            "canvas_hw": list(self.teacher.canvas_hw),
            "canvases": [list(c) for c in self.teacher.canvases],
            "limits": {
                "max_batch": self.settings.max_batch,
                "max_wait_ms": self.settings.max_wait_ms,
                "max_queue": self.settings.max_queue,
                "max_views_per_request": self.max_views_per_request,
                "max_request_bytes": self.settings.max_request_bytes,
            },
        }

    def check_capacity(self, num_views: int = 1) -> None:
        self.batcher.check_capacity(num_views)

    def _views(self, raw_views: Sequence[Any]) -> list[View]:
        views: list[View] = []
        errors: list[dict[str, Any]] = []
        for index, row in enumerate(raw_views):
            image_id = row.get("image_id") if isinstance(row, dict) else None
            try:
                check_view_row(row)
                view = View.from_dict(row)
                self.teacher.check_view(view)
            except (ViewError, ValueError, TypeError, OverflowError) as error:
                errors.append({"index": index, "image_id": image_id, "field": "views", "detail": str(error)})
                continue
            views.append(view)
        if errors:
            raise RequestProblem(
                "invalid-view", f"{len(errors)} of {len(raw_views)} views are invalid: {errors[0]['detail']}", errors=errors
            )
        return views

    def _prepare(self, views: Sequence[View], images: Sequence[bytes], names: Sequence[str]) -> list[PreparedView]:
        """Decode and render every view (called in a worker thread); all failures reported."""
        from detcore.images import ImageDecodeError

        prepared: list[PreparedView] = []
        errors: list[dict[str, Any]] = []
        kinds: list[str] = []
        for index, (view, data) in enumerate(zip(views, images)):
            where = {"index": index, "image_id": view.image_id, "view_id": view.view_id, "field": "images"}
            if len(data) == 0:
                errors.append({**where, "detail": "empty file"})
                kinds.append("invalid-image")
                continue
            try:
                prepared.append(self.teacher.prepare_view(view, data, names))
            except ImageDecodeError as error:
                errors.append({**where, "detail": error.reason})
                kinds.append("invalid-image")
            except ImageSizeMismatch as error:
                errors.append({**where, "detail": str(error)})
                kinds.append("image-size-mismatch")
            except ViewError as error:
                errors.append({**where, "field": "views", "detail": str(error)})
                kinds.append("invalid-view")
        if errors:
            raise RequestProblem(
                kinds[0],
                f"{len(errors)} of {len(views)} images cannot be used: view index {errors[0]['index']} "
                f"(image_id={errors[0]['image_id']}): {errors[0]['detail']}",
                errors=errors,
            )
        return prepared

    async def compute(
        self,
        raw_views: Any,
        images: Sequence[bytes],
        targets: str | Sequence[str] | None = None,
        *,
        announcement: Announcement | None = None,
    ) -> bytes:
        """Targets of every (view, image) pair as a `label_store.wire` body.

        Args:
            raw_views: JSON text, or a list of view dicts (`View.to_dict`) or `View` objects.
            images: the encoded image file of each view, same order.
            targets: groups and/or names (comma-separated text or a list); None = defaults.
            announcement: the request's `Announcement` to the batcher, made when it arrived
                (the HTTP route makes one before reading the body); retracted here.

        Raises:
            RequestProblem: bad request (422/413) or overload (503, `Overloaded`).
            BatchFailedError: the forward pass failed (500).
        """
        announcement = announcement or self.batcher.announcement(0)
        try:
            return await self._compute(raw_views, images, targets, announcement)
        finally:
            announcement.retract()

    async def _compute(self, raw_views, images, targets, announcement: Announcement) -> bytes:
        if isinstance(raw_views, (list, tuple)):
            rows = [v.to_dict() if isinstance(v, View) else v for v in raw_views]
        else:
            rows = parse_views(raw_views)
        if len(rows) == 0:
            raise RequestProblem("invalid-request", "views= expects at least one view. Got an empty list.",
                                 errors=[{"field": "views", "detail": "empty"}])
        if len(rows) > self.max_views_per_request:
            raise RequestProblem(
                "request-too-large",
                f"views= expects at most {self.max_views_per_request} views per request. Got {len(rows)}; split the request.",
                errors=[{"field": "views", "detail": f"{len(rows)} views"}],
            )
        if len(images) != len(rows):
            raise RequestProblem(
                "invalid-request",
                f"images= expects one file per view ({len(rows)}). Got {len(images)} files.",
                errors=[{"field": "images", "detail": f"{len(images)} files for {len(rows)} views"}],
            )
        self.check_capacity(len(rows))
        specs = self.teacher.resolve_targets(targets)
        names = [spec.name for spec in specs]
        views = self._views(rows)
        canvases = sorted({(v.canvas_h, v.canvas_w) for v in views})
        if len(canvases) > 1:
            raise RequestProblem(
                "invalid-view",
                f"views= expects the views of one request on one canvas (the response holds one target shape each). "
                f"Got canvases {', '.join(f'{h}x{w}' for h, w in canvases)}; send one request per canvas.",
                errors=[{"field": "views", "detail": f"{len(canvases)} canvases"}],
            )
        specs = self.teacher.specs_for(specs, canvases[0])
        announcement.add(len(views))
        prepared = await asyncio.to_thread(self._prepare, views, list(images), names)
        # No await between retract and submit: the batcher never sees the views missing.
        announcement.retract()
        results = await self.batcher.submit(prepared)
        entries = [
            {"image_id": p.view.image_id, "view_id": p.view.view_id, "content_hash": p.content_hash, "targets": r}
            for p, r in zip(prepared, results)
        ]
        body = await asyncio.to_thread(pack_targets, entries, specs, self.teacher.fingerprint)
        self.metrics.views.inc(len(entries))
        return body
