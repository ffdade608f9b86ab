"""The online teacher endpoint: FastAPI app factory.

Protocol (version 1):

``POST /v1/targets`` (bearer token)
    multipart/form-data with ``views`` = JSON list of `detcore.views.View.to_dict` dicts,
    ``images`` = one encoded image file per view in the same order, optional
    ``targets`` = comma-separated groups (``cls,box,fpn,backbone``) or names
    (``cls/p3``); default ``cls,box,fpn``. Answer 200
    ``application/vnd.distillery.targets``: a `label_store.wire` body (the store's
    per-view encoding), header ``X-Teacher-Fingerprint`` = `fingerprint_digest`.
``GET /v1/teacher`` (bearer token)
    JSON ``{fingerprint, digest, targets: [TargetSpec dicts], default_targets, limits, ...}``.
``GET|HEAD /healthz`` (alive), ``GET|HEAD /readyz`` (teacher loaded), ``GET /metrics``
(Prometheus; token as ``metrics_access`` says). ``/docs``, ``/redoc``, ``/openapi.json``:
open, behind the token, or absent, as ``ServeSettings.docs`` says (absent by default on a
non-loopback host).

Errors are RFC 9457 problem documents (`teacher_service.api.problems`): 401 token,
408 body not received within ``body_timeout_s``, 413 body, field, image file or view
count too large, 415 not multipart, 422 bad view / image / size / pixel count / target
name (naming the view index and image id; the first few offenders and their count),
503 + Retry-After when the bounded queue is full or the teacher is not loaded. A client
that goes away mid-upload is counted (``distillery_client_disconnects_total``) and
logged in one INFO line; it is not an error of the server.

Run with ``distill serve`` (uvicorn or Ray Serve), or
``uvicorn teacher_service.app:app_from_env --factory`` with ``DISTILLERY_*`` variables.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Callable

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from teacher_service.api import routes
from teacher_service.api.batching import BatchFailedError
from teacher_service.api.deps import AuthDep
from teacher_service.api.metrics import ServiceMetrics
from teacher_service.api.middleware import LimitAndMeasureMiddleware
from teacher_service.api.problems import (
    MAX_LISTED_ERRORS,
    PROBLEM_MEDIA_TYPE,
    RequestProblem,
    kind_for_status,
    problem_document,
)
from teacher_service.api.service import TargetService
from teacher_service.api.settings import ServeSettings
from teacher_service.api.teacher import OnlineTeacher

logger = logging.getLogger(__name__)

TeacherLoader = Callable[[ServeSettings], OnlineTeacher]

# Status recorded for a request whose client went away (nginx's "client closed request");
# nothing is sent, the connection is gone.
CLIENT_CLOSED_STATUS = 499


def serve_class_mapping(settings: ServeSettings, teacher_classes=None):
    """The `detcore.classes.ClassMapping` the settings ask for (None without ``annotations``).

    ``teacher_classes``: the checkpoint's classes (read from ``settings.teacher`` when None).

    Raises:
        detcore.classes.ClassMappingError: classes that do not map, or a bad class map file.
        detcore.coco.AnnotationError: an unreadable annotation file.
    """
    if settings.annotations is None:
        return None
    from detcore.classes import map_classes, read_class_map
    from detcore.coco import CocoDataset

    if teacher_classes is None:
        from detcore.checkpoint import load_checkpoint

        teacher_classes = load_checkpoint(settings.teacher)["classes"]
    dataset = CocoDataset(settings.annotations, Path(settings.annotations).parent)
    class_map = read_class_map(settings.class_map) if settings.class_map is not None else None
    return map_classes(teacher_classes, dataset.classes, class_map=class_map, allow_missing=settings.allow_missing_classes)


def load_teacher(settings: ServeSettings) -> OnlineTeacher:
    """Default loader: `OnlineTeacher.load` of ``settings.teacher`` with the settings' device,
    precision, canvas, codecs and class mapping."""
    return OnlineTeacher.load(
        settings.teacher,
        device=settings.device,
        precision=settings.precision,
        canvas_hw=settings.canvas_hw,
        codecs=settings.codecs or None,
        torch_threads=settings.torch_threads,
        class_mapping=serve_class_mapping(settings),
    )


def _problem_response(request: Request, kind: str, detail: str, errors=None, headers=None, num_errors=None) -> JSONResponse:
    request.app.state.metrics.errors.labels(kind=kind).inc()
    document = problem_document(kind, detail, errors=errors, instance=request.url.path, num_errors=num_errors)
    return JSONResponse(document, status_code=document["status"], headers=headers, media_type=PROBLEM_MEDIA_TYPE)


async def _on_problem(request: Request, error: RequestProblem) -> JSONResponse:
    return _problem_response(request, error.kind, error.detail, error.errors, error.headers, error.num_errors)


async def _on_http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    return _problem_response(request, kind_for_status(error.status_code), str(error.detail), headers=error.headers)


async def _on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    found = error.errors()
    errors = [
        {"field": ".".join(str(p) for p in e.get("loc", ())), "detail": str(e.get("msg", ""))}
        for e in found[:MAX_LISTED_ERRORS]
    ]
    return _problem_response(
        request, "invalid-request", "The request does not match the route's parameters.", errors, num_errors=len(found)
    )


async def _on_client_disconnect(request: Request, error: ClientDisconnect) -> Response:
    request.app.state.metrics.client_disconnects.inc()
    logger.info("client went away before the request body ended: %s %s", request.method, request.url.path)
    return Response(status_code=CLIENT_CLOSED_STATUS)  # uvicorn drops it: the connection is closed


async def _on_batch_failed(request: Request, error: BatchFailedError) -> JSONResponse:
    return _problem_response(request, "internal-error", str(error))


async def _on_unexpected(request: Request, error: Exception) -> JSONResponse:
    logger.exception("unexpected error on %s", request.url.path)
    return _problem_response(request, "internal-error", f"Unexpected {type(error).__name__}; see the server log.")


def create_app(settings: ServeSettings, *, teacher_loader: TeacherLoader = load_teacher) -> FastAPI:
    """Build the app; nothing is loaded until the lifespan starts.

    Args:
        settings: validated settings (unsafe ones were refused on construction).
        teacher_loader: ``settings -> OnlineTeacher``, run once in a thread at startup.
            Tests pass a loader of a tiny teacher.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        import warnings

        import anyio
        from PIL import Image

        # Pillow only warns between its limit and twice it; an upload that large is refused.
        warnings.filterwarnings("error", category=Image.DecompressionBombWarning)
        teacher = await anyio.to_thread.run_sync(teacher_loader, settings)
        service = TargetService(teacher, settings, app.state.metrics)
        service.start()
        app.state.service = service
        app.state.metrics.ready.set(1)
        try:
            yield
        finally:
            app.state.metrics.ready.set(0)
            app.state.service = None
            await service.close()

    docs_open = settings.docs == "open"
    app = FastAPI(
        title="distillery teacher",
        summary="Dense teacher targets for explicit views, in the label store's encoding.",
        version="1",
        lifespan=lifespan,
        docs_url="/docs" if docs_open else None,
        redoc_url="/redoc" if docs_open else None,
        openapi_url="/openapi.json" if docs_open else None,
    )
    app.state.settings = settings
    app.state.metrics = ServiceMetrics()
    app.state.service = None
    app.include_router(routes.probes)
    app.include_router(routes.metrics_open if settings.metrics_access == "open" else routes.metrics_with_token)
    app.include_router(routes.v1)
    if settings.docs == "token":
        app.include_router(_docs_behind_token(app))
    app.add_exception_handler(RequestProblem, _on_problem)
    app.add_exception_handler(ClientDisconnect, _on_client_disconnect)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(BatchFailedError, _on_batch_failed)
    app.add_exception_handler(Exception, _on_unexpected)
    app.add_middleware(
        LimitAndMeasureMiddleware,
        max_request_bytes=settings.max_request_bytes,
        metrics=app.state.metrics,
        body_timeout_s=settings.body_timeout_s,
    )
    return app


def _docs_behind_token(app: FastAPI) -> APIRouter:
    """/openapi.json, /docs and /redoc that answer only with the bearer token (``docs_access="token"``)."""
    from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html

    router = APIRouter(dependencies=[AuthDep], include_in_schema=False)

    @router.get("/openapi.json")
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @router.get("/docs")
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - docs")

    @router.get("/redoc")
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} - ReDoc")

    return router


def app_from_env() -> FastAPI:
    """``uvicorn teacher_service.app:app_from_env --factory``: settings from ``DISTILLERY_*``."""
    return create_app(ServeSettings())


__all__ = ["create_app", "app_from_env", "load_teacher", "ServeSettings"]
