"""Pure ASGI middleware: request-size limit (413), body-read timeout (408) and per-route metrics.

The size limit is enforced twice: on ``Content-Length`` before the app runs, and while
the body streams in (chunked uploads, lying headers): the receive wrapper raises
`RequestProblem("request-too-large")` as soon as the count passes the limit, which the
app's exception handler turns into a 413 problem document.

Before answering 413 the rest of the body is read and dropped, up to ``drain_limit``
bytes: a client that is still uploading (httpx, requests) reads its answer only after
sending everything, and a server that closes a socket with unread data makes the kernel
reset the connection, so the client would see a broken pipe instead of the 413. Larger
bodies, and clients that sent ``Expect: 100-continue`` (they wait for our answer before
uploading), get the 413 at once.

The whole body must arrive within ``body_timeout_s`` of the request's start: a client that
declares more bytes than it sends (or trickles them) gets a 408 problem document with
``Connection: close`` instead of holding a connection and a task until it gives up.
Draining is bounded by the same deadline.
"""

from __future__ import annotations

import json
import time

import anyio

from teacher_service.api.metrics import ServiceMetrics
from teacher_service.api.problems import PROBLEM_MEDIA_TYPE, RequestProblem, problem_document


DRAIN_FACTOR = 4
DRAIN_MAX_BYTES = 256 * 1024 * 1024


async def _drain(receive, budget: int) -> bool:
    """Read and drop the rest of a request body, at most ``budget`` bytes; True if it ended."""
    while budget >= 0:
        try:
            message = await receive()
        except RequestProblem:  # the body deadline passed: answer without the rest
            return False
        if message["type"] != "http.request":
            return False
        budget -= len(message.get("body", b""))
        if not message.get("more_body", False):
            return True
    return False


class LimitAndMeasureMiddleware:
    def __init__(
        self, app, *, max_request_bytes: int, metrics: ServiceMetrics, body_timeout_s: float | None = None
    ) -> None:
        self.app = app
        self.max_request_bytes = int(max_request_bytes)
        self.body_timeout_s = body_timeout_s
        self.drain_limit = min(DRAIN_MAX_BYTES, DRAIN_FACTOR * self.max_request_bytes)
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status_holder = {"status": 500, "started": False}

        async def send_wrapper(message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = int(message["status"])
                status_holder["started"] = True
            await send(message)

        def route_label() -> str:
            route = scope.get("route")
            return getattr(route, "path", None) or "unmatched"

        body_ended = False
        deadline = None if self.body_timeout_s is None else started + self.body_timeout_s

        async def timed_receive():
            """``receive`` that gives up at the body deadline, until the body has ended (later
            calls wait for a disconnect, which is no body read)."""
            nonlocal body_ended
            if body_ended or deadline is None:
                return await receive()
            message = None
            with anyio.move_on_after(max(0.0, deadline - time.perf_counter())):
                message = await receive()
            if message is None:
                body_ended = True  # nothing more is read from this connection
                raise RequestProblem(
                    "request-timeout",
                    f"Request body expects to arrive within {self.body_timeout_s:g} s. Got "
                    f"{received} bytes by then.",
                    errors=[{"field": "body", "detail": f"{received} bytes in {self.body_timeout_s:g} s"}],
                    headers={"Connection": "close"},
                )
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_ended = True
            return message

        received = 0
        try:
            declared = _content_length(scope)
            may_drain = _header(scope, b"expect").lower() != b"100-continue"
            if declared is not None and declared > self.max_request_bytes:
                if may_drain and declared <= self.drain_limit:
                    await _drain(timed_receive, declared)
                await self._reject(send_wrapper, scope, declared)
                return

            async def receive_wrapper():
                nonlocal received
                message = await timed_receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.max_request_bytes:
                        if message.get("more_body", False) and may_drain:
                            await _drain(timed_receive, self.drain_limit - received)
                        raise RequestProblem(
                            "request-too-large",
                            f"Request body expects at most {self.max_request_bytes} bytes. Got at least {received}.",
                            errors=[{"field": "body", "detail": f">= {received} bytes"}],
                            headers={"Connection": "close"},
                        )
                return message

            try:
                await self.app(scope, receive_wrapper, send_wrapper)
            except RequestProblem as problem:  # raised outside any route (e.g. by a middleware)
                if status_holder["started"]:
                    raise
                await _send_problem(send_wrapper, problem, scope.get("path"))
                self.metrics.errors.labels(kind=problem.kind).inc()
        finally:
            self.metrics.observe_request(route_label(), scope.get("method", ""), status_holder["status"], started)

    async def _reject(self, send, scope, declared: int) -> None:
        problem = RequestProblem(
            "request-too-large",
            f"Request body expects at most {self.max_request_bytes} bytes. Got Content-Length {declared}.",
            errors=[{"field": "body", "detail": f"{declared} bytes"}],
            headers={"Connection": "close"},
        )
        self.metrics.errors.labels(kind=problem.kind).inc()
        await _send_problem(send, problem, scope.get("path"))


def _header(scope, name: bytes) -> bytes:
    for key, value in scope.get("headers", []):
        if key == name:
            return value
    return b""


def _content_length(scope) -> int | None:
    value = _header(scope, b"content-length")
    try:
        return int(value) if value else None
    except ValueError:
        return None


async def _send_problem(send, problem: RequestProblem, path: str | None) -> None:
    body = json.dumps(problem.to_dict(instance=path)).encode()
    headers = [(b"content-type", PROBLEM_MEDIA_TYPE.encode()), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in problem.headers.items()]
    await send({"type": "http.response.start", "status": problem.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
