"""What the endpoint does for one request, independent of HTTP: the FastAPI route and the
Ray Serve handle method both call `TargetService.compute` and get the same bytes.

Order of checks (cheapest first, so a refused request costs little): the ``views`` JSON
(parsed in a worker thread, never on the event loop), view count and queue capacity,
target names, every view recipe, then decoding and rendering (`DecodePool`: at most
``decode_workers`` requests decode at once; each image's header is checked against its
view and the pixel limit before it is decoded), then the batched forward pass. Bad views
are reported together: the first few by index and image id, and their count.
"""

from __future__ import annotations

import asyncio
import json
import numbers
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import numpy as np

from detcore.views import View, ViewError
from label_store.wire import pack_targets
from teacher_service.api.batching import Announcement, DynamicBatcher
from teacher_service.api.metrics import ServiceMetrics
from teacher_service.api.problems import MAX_LISTED_ERRORS, RequestProblem, short_repr
from teacher_service.api.settings import ServeSettings
from teacher_service.api.teacher import ImageSizeMismatch, ImageTooLarge, OnlineTeacher, PreparedView


def parse_views(raw: Any) -> list[Any]:
    """The ``views`` field: a JSON list (text or already parsed) of view dicts.

    Pathological JSON is a 422 like any other bad JSON: nesting deeper than the
    interpreter's recursion limit, and integers beyond Python's digit limit for int-string
    conversion (``sys.get_int_max_str_digits``).
    """
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
        except RecursionError:
            raise RequestProblem(
                "invalid-request",
                "views= expects a JSON list of view objects. Got JSON nested too deeply to parse.",
                errors=[{"field": "views", "detail": "nested too deeply"}],
            ) from None
        except ValueError as error:  # an integer beyond the int-string conversion digit limit
            limit = sys.get_int_max_str_digits()
            raise RequestProblem(
                "invalid-request",
                f"views= expects numbers of at most {limit} digits. Got a longer one ({type(error).__name__}).",
                errors=[{"field": "views", "detail": f"a number of more than {limit} digits"}],
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
    unknown = [key for key in row if key not in _VIEW_FIELDS]
    if unknown:
        raise ViewError(
            f"View expects only the fields {sorted(_VIEW_FIELDS)}. Got {len(unknown)} unknown, "
            f"first {[short_repr(key) for key in unknown[:MAX_LISTED_ERRORS]]}."
        )
    for name in _INT_FIELDS:
        if name in row and (isinstance(row[name], (bool, np.bool_)) or not isinstance(row[name], numbers.Integral)):
            raise ViewError(f"View({name}=) expects an integer. Got {short_repr(row[name])}.")
    if "scale" in row and (isinstance(row["scale"], (bool, np.bool_)) or not isinstance(row["scale"], numbers.Real)):
        raise ViewError(f"View(scale=) expects a number. Got {short_repr(row['scale'])}.")
    if "flip" in row and not isinstance(row["flip"], (bool, np.bool_)):
        raise ViewError(f"View(flip=) expects true or false. Got {short_repr(row['flip'])}.")


def _image_id_of(row: Any) -> Any:
    """The ``image_id`` of a view dict as an error entry names it: an int, or a short repr."""
    image_id = row.get("image_id") if isinstance(row, dict) else None
    if image_id is None or (isinstance(image_id, int) and not isinstance(image_id, bool) and abs(image_id) < 2**63):
        return image_id
    return short_repr(image_id)


class DecodePool:
    """Threads of their own for decoding and rendering uploads: at most ``num_workers`` requests
    decode at once (one image at a time each), whatever the number of requests in flight, so
    decoded pixels in memory stay bounded and the default thread pool stays free."""

    def __init__(self, num_workers: int) -> None:
        if num_workers < 1:
            raise ValueError(f"DecodePool(num_workers=) expects >= 1. Got {num_workers}.")
        self.num_workers = int(num_workers)
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self.running = 0
        """Jobs decoding now (never more than ``num_workers``)."""
        self.waiting = 0
        """Jobs submitted and not started yet."""

    def start(self) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=self.num_workers, thread_name_prefix="decode")

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def _job(self, fn: Callable[..., Any], args: tuple) -> Any:
        with self._lock:
            self.waiting -= 1
            self.running += 1
        try:
            return fn(*args)
        finally:
            with self._lock:
                self.running -= 1

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in one of the pool's threads."""
        if self._executor is None:
            raise RequestProblem("not-ready", "The endpoint is not started (or is shutting down).")
        with self._lock:
            self.waiting += 1
        try:
            future = self._executor.submit(self._job, fn, args)
        except BaseException:
            self._unwait()
            raise
        # A job cancelled before it started (its request went away, or shutdown) never runs `_job`.
        future.add_done_callback(lambda done: self._unwait() if done.cancelled() else None)
        return await asyncio.wrap_future(future)

    def _unwait(self) -> None:
        with self._lock:
            self.waiting -= 1


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
        self.decode_pool = DecodePool(settings.decode_workers)

    @property
    def max_views_per_request(self) -> int:
        """A request can never hold more views than the queue admits."""
        return self.settings.max_queue

    def start(self) -> None:
        self.decode_pool.start()
        self.batcher.start()

    async def close(self) -> None:
        await self.batcher.close()
        self.decode_pool.close()

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
                "max_field_bytes": self.settings.max_field_bytes,
                "max_image_bytes": self.settings.max_image_bytes,
                "max_image_pixels": self.settings.max_image_pixels,
            },
        }

    def check_capacity(self, num_views: int = 1) -> None:
        self.batcher.check_capacity(num_views)

    def _views(self, raw_views: Sequence[Any]) -> list[View]:
        views: list[View] = []
        errors: list[dict[str, Any]] = []  # the first few; num_errors counts them all
        num_errors = 0
        for index, row in enumerate(raw_views):
            try:
                check_view_row(row)
                view = View.from_dict(row)
                self.teacher.check_view(view)
            except (ViewError, ValueError, TypeError, OverflowError) as error:
                num_errors += 1
                if len(errors) < MAX_LISTED_ERRORS:
                    errors.append({"index": index, "image_id": _image_id_of(row), "field": "views", "detail": str(error)})
                continue
            views.append(view)
        if num_errors:
            raise RequestProblem(
                "invalid-view",
                f"{num_errors} of {len(raw_views)} views are invalid: view index {errors[0]['index']}: {errors[0]['detail']}",
                errors=errors,
                num_errors=num_errors,
            )
        return views

    def _prepare(self, views: Sequence[View], images: Sequence[bytes], names: Sequence[str]) -> list[PreparedView]:
        """Decode and render every view (called in a worker thread); all failures reported."""
        from detcore.images import ImageDecodeError

        prepared: list[PreparedView] = []
        errors: list[dict[str, Any]] = []
        kinds: list[str] = []
        max_pixels = self.settings.max_image_pixels
        for index, (view, data) in enumerate(zip(views, images)):
            where = {"index": index, "image_id": view.image_id, "view_id": view.view_id, "field": "images"}
            if len(data) == 0:
                errors.append({**where, "detail": "empty file"})
                kinds.append("invalid-image")
                continue
            try:
                prepared.append(self.teacher.prepare_view(view, data, names, max_pixels=max_pixels))
            except ImageDecodeError as error:
                errors.append({**where, "detail": error.reason})
                kinds.append("invalid-image")
            except ImageTooLarge as error:
                errors.append({**where, "detail": str(error)})
                kinds.append("image-too-large")
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
                errors=errors[:MAX_LISTED_ERRORS],
                num_errors=len(errors),
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
        else:  # a JSON text: parsed in a worker thread, so that other requests go on meanwhile
            rows = await asyncio.to_thread(parse_views, raw_views)
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
        prepared = await self.decode_pool.run(self._prepare, views, list(images), names)
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
