"""FastAPI dependencies and their ``Annotated`` aliases.

Everything a route needs comes from ``request.app.state`` (filled by the lifespan), so a
test swaps any of it with ``app.dependency_overrides[get_service] = ...``.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from teacher_service.api.metrics import ServiceMetrics
from teacher_service.api.problems import RequestProblem
from teacher_service.api.service import TargetService
from teacher_service.api.settings import ServeSettings
from teacher_service.api.teacher import OnlineTeacher


def get_settings(request: Request) -> ServeSettings:
    return request.app.state.settings


def get_metrics(request: Request) -> ServiceMetrics:
    return request.app.state.metrics


def get_service(request: Request) -> TargetService:
    service = getattr(request.app.state, "service", None)
    if service is None:
        raise RequestProblem("not-ready", "The teacher is not loaded yet.", headers={"Retry-After": "1"})
    return service


def get_teacher(service: Annotated[TargetService, Depends(get_service)]) -> OnlineTeacher:
    return service.teacher


SettingsDep = Annotated[ServeSettings, Depends(get_settings)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]
ServiceDep = Annotated[TargetService, Depends(get_service)]
TeacherDep = Annotated[OnlineTeacher, Depends(get_teacher)]


def require_token(request: Request, settings: SettingsDep) -> None:
    """401 unless ``Authorization: Bearer <settings.token>`` (skipped when auth is disabled)."""
    if settings.auth_disabled:
        return
    header = request.headers.get("authorization", "")
    scheme, _, credentials = header.partition(" ")
    expected = settings.token.get_secret_value() if settings.token is not None else ""
    challenge = {"WWW-Authenticate": 'Bearer realm="distillery"'}
    if not header:
        raise RequestProblem("unauthorized", "Authorization expects 'Bearer <token>'. Got no Authorization header.",
                             headers=challenge)
    if scheme.lower() != "bearer" or not credentials:
        raise RequestProblem("unauthorized", f"Authorization expects the Bearer scheme. Got {scheme or 'nothing'!r}.",
                             headers=challenge)
    if not hmac.compare_digest(credentials.strip().encode(), expected.encode()):
        raise RequestProblem("unauthorized", "Authorization expects the server's bearer token. Got a different token.",
                             headers={"WWW-Authenticate": 'Bearer realm="distillery", error="invalid_token"'})


AuthDep = Depends(require_token)
