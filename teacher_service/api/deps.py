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
    """401 unless ``Authorization: Bearer <settings.token>`` (skipped when auth is disabled).

    The answer never repeats the header: a client that sends the token without its scheme
    (``Authorization: <token>``) or with a tab after it must not find the token in a
    reply or a log. Tokens in the query string are never read.
    """
    if settings.auth_disabled:
        return
    header = request.headers.get("authorization", "")
    scheme, credentials = _split_authorization(header)
    expected = settings.token.get_secret_value() if settings.token is not None else ""
    challenge = {"WWW-Authenticate": 'Bearer realm="distillery"'}
    if not header:
        raise RequestProblem("unauthorized", "Authorization expects 'Bearer <token>'. Got no Authorization header.",
                             headers=challenge)
    if scheme.lower() != "bearer" or not credentials:
        got = "no credentials after the scheme" if scheme.lower() == "bearer" else "another scheme or no scheme"
        raise RequestProblem("unauthorized", f"Authorization expects 'Bearer <token>'. Got {got} "
                             f"({len(header)} characters, not repeated here).", headers=challenge)
    if not hmac.compare_digest(credentials.encode(), expected.encode()):
        raise RequestProblem("unauthorized", "Authorization expects the server's bearer token. Got a different token.",
                             headers={"WWW-Authenticate": 'Bearer realm="distillery", error="invalid_token"'})


def _split_authorization(header: str) -> tuple[str, str]:
    """``"Bearer <token>"`` -> ``("Bearer", "<token>")``; any run of spaces or tabs separates them."""
    parts = header.strip().split(None, 1)
    if len(parts) < 2:
        return (parts[0] if parts else "", "")
    return (parts[0], parts[1].strip())


AuthDep = Depends(require_token)
