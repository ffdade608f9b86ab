"""Routes of the online endpoint (see `teacher_service.app` for the protocol)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from label_store.wire import FINGERPRINT_HEADER, MEDIA_TYPE
from teacher_service.api.deps import AuthDep, MetricsDep, ServiceDep, SettingsDep
from teacher_service.api.problems import RequestProblem

probes = APIRouter(tags=["probes"])
v1 = APIRouter(prefix="/v1", tags=["teacher"], dependencies=[AuthDep])


@probes.get("/healthz", summary="The process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "alive"}


@probes.get("/readyz", summary="The teacher is loaded and requests are accepted")
async def readyz(service: ServiceDep) -> dict[str, object]:
    return {"status": "ready", "digest": service.teacher.digest, "queue_depth": service.batcher.queue_depth}


@probes.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(metrics: MetricsDep) -> Response:
    return Response(metrics.exposition(), media_type=metrics.content_type)


@v1.get("/teacher", summary="Fingerprint and target schema of the served teacher")
async def teacher(service: ServiceDep) -> JSONResponse:
    return JSONResponse(service.describe(), headers={FINGERPRINT_HEADER: service.teacher.digest})


@v1.post(
    "/targets",
    summary="Teacher targets of a batch of views",
    response_class=Response,
    responses={200: {"content": {MEDIA_TYPE: {}}, "description": "label_store.wire body"}},
)
async def targets(request: Request, service: ServiceDep, settings: SettingsDep) -> Response:
    """multipart/form-data: ``views`` (JSON list of view dicts), ``images`` (one file per
    view, same order), optional ``targets`` (comma-separated groups or names)."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise RequestProblem(
            "unsupported-media-type",
            f"POST /v1/targets expects multipart/form-data. Got {content_type or 'no Content-Type'!r}.",
            errors=[{"field": "content-type", "detail": content_type}],
        )
    # Refuse before reading the body when the queue is already full.
    service.check_capacity(1)
    # From now on a partial batch may wait (max_wait_ms) for this request's views.
    announcement = service.batcher.announcement(1)
    try:
        return await _targets(request, service, settings, announcement)
    finally:
        announcement.retract()


async def _targets(request: Request, service, settings, announcement) -> Response:
    try:
        form = await request.form(
            max_files=service.max_views_per_request,
            max_fields=8,
            max_part_size=settings.max_request_bytes,
        )
    except StarletteHTTPException as error:
        detail = str(error.detail)
        kind = "request-too-large" if "Too many files" in detail or "maximum size" in detail else "malformed-request"
        raise RequestProblem(kind, f"POST /v1/targets expects a well-formed multipart body. Got: {detail}.",
                             errors=[{"field": "body", "detail": detail}]) from None
    try:
        views_field = form.get("views")
        if views_field is None or isinstance(views_field, UploadFile):
            raise RequestProblem(
                "invalid-request",
                "POST /v1/targets expects a text field 'views' (JSON list of view dicts). Got "
                + ("none." if views_field is None else "a file."),
                errors=[{"field": "views", "detail": "missing" if views_field is None else "file instead of text"}],
            )
        targets_field = form.get("targets")
        if isinstance(targets_field, UploadFile):
            raise RequestProblem("invalid-request", "targets= expects text. Got a file.",
                                 errors=[{"field": "targets", "detail": "file instead of text"}])
        images: list[bytes] = []
        for index, item in enumerate(form.getlist("images")):
            if not isinstance(item, UploadFile):
                raise RequestProblem(
                    "invalid-request",
                    f"images= expects files. Got a text field at position {index}.",
                    errors=[{"index": index, "field": "images", "detail": "text instead of file"}],
                )
            images.append(await item.read())
        body = await service.compute(views_field, images, targets_field, announcement=announcement)
    finally:
        await form.close()
    return Response(body, media_type=MEDIA_TYPE, headers={FINGERPRINT_HEADER: service.teacher.digest})
