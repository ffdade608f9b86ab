"""Routes of the online endpoint (see `teacher_service.app` for the protocol)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from label_store.wire import FINGERPRINT_HEADER, MEDIA_TYPE
from teacher_service.api.deps import AuthDep, MetricsDep, ServiceDep, SettingsDep
from teacher_service.api.problems import RequestProblem, clip_text
from teacher_service.api.upload import read_targets_form

probes = APIRouter(tags=["probes"])
v1 = APIRouter(prefix="/v1", tags=["teacher"], dependencies=[AuthDep])
# /metrics: in `probes` (no token) or in `metrics_with_token`, as `ServeSettings.metrics_access` says.
metrics_open = APIRouter(tags=["probes"])
metrics_with_token = APIRouter(tags=["probes"], dependencies=[AuthDep])


async def healthz() -> dict[str, str]:
    return {"status": "alive"}


async def readyz(service: ServiceDep) -> dict[str, object]:
    return {"status": "ready", "digest": service.teacher.digest, "queue_depth": service.batcher.queue_depth}


async def metrics(metrics: MetricsDep) -> Response:
    return Response(metrics.exposition(), media_type=metrics.content_type)


def _get_and_head(router: APIRouter, path: str, endpoint, summary: str, **options) -> None:
    """GET, plus HEAD (load balancers probe with it) kept out of the OpenAPI schema."""
    router.add_api_route(path, endpoint, methods=["GET"], summary=summary, **options)
    router.add_api_route(path, endpoint, methods=["HEAD"], include_in_schema=False, **options)


_get_and_head(probes, "/healthz", healthz, "The process is alive")
_get_and_head(probes, "/readyz", readyz, "The teacher is loaded and requests are accepted")
for _router in (metrics_open, metrics_with_token):
    _get_and_head(_router, "/metrics", metrics, "Prometheus metrics", response_class=Response)


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
            f"POST /v1/targets expects multipart/form-data. Got {clip_text(content_type or 'no Content-Type', 80)!r}.",
            errors=[{"field": "content-type", "detail": clip_text(content_type, 80)}],
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
    form = await read_targets_form(
        request,
        max_images=service.max_views_per_request,
        max_field_bytes=settings.max_field_bytes,
        max_image_bytes=settings.max_image_bytes,
    )
    if form.views is None:
        raise RequestProblem(
            "invalid-request",
            "POST /v1/targets expects a text field 'views' (JSON list of view dicts). Got none.",
            errors=[{"field": "views", "detail": "missing"}],
        )
    body = await service.compute(form.views, form.images, form.targets, announcement=announcement)
    return Response(body, media_type=MEDIA_TYPE, headers={FINGERPRINT_HEADER: service.teacher.digest})
