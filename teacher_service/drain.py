"""`distill serve`'s graceful stop: on SIGINT or SIGTERM, finish what is in flight, refuse the rest, exit.

The first signal starts a drain: requests already being served run to their answer, new
requests are answered 503 ``draining`` (with ``Retry-After`` and ``Connection: close``, so a
client or load balancer goes elsewhere), and once nothing is in flight uvicorn shuts down
(lifespan exit: the batching queue closes, the teacher is released). The command then
exits 130 (SIGINT) or 143 (SIGTERM), as every `distill` command stopped by a signal. A
second signal skips the drain (uvicorn's own shutdown, which waits at most
``timeout_graceful_shutdown`` seconds).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import uvicorn

from teacher_service.api.problems import PROBLEM_MEDIA_TYPE, problem_document

logger = logging.getLogger("distill.serve")


class Drain:
    """Counts the HTTP requests in flight and, once draining, refuses new ones."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.signum: int | None = None
        """The signal that started the drain (None: serving)."""

    @property
    def draining(self) -> bool:
        return self.signum is not None


class DrainMiddleware:
    """ASGI middleware: counts requests in flight; a 503 ``draining`` problem for new ones while draining."""

    def __init__(self, app: Any, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.drain.draining:
            body = json.dumps(problem_document(
                "draining", "The server is shutting down; it finishes the requests in flight and takes no new ones.",
                instance=scope.get("path"),
            )).encode()
            await send({"type": "http.response.start", "status": 503, "headers": [
                (b"content-type", PROBLEM_MEDIA_TYPE.encode()), (b"content-length", str(len(body)).encode()),
                (b"retry-after", b"1"), (b"connection", b"close"),
            ]})
            await send({"type": "http.response.body", "body": body})
            return
        self.drain.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.in_flight -= 1


class DrainingServer(uvicorn.Server):
    """uvicorn's server whose first SIGINT/SIGTERM drains (`Drain`) before the usual shutdown."""

    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        super().__init__(config)
        self.drain = drain
        self._announce: int | None = None
        """Requests in flight at the signal, until the next tick logs them."""

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.drain.draining:
            super().handle_exit(sig, frame)  # a second signal: stop now
            return
        self.drain.signum = sig
        # Logged at the next tick, not here: a signal handler that writes to stderr while the
        # interrupted code is writing there too hits a reentrant write and the line is lost.
        self._announce = self.drain.in_flight

    async def on_tick(self, counter: int) -> bool:
        if self._announce is not None:
            logger.info("draining: %d request(s) in flight; new ones get 503 (signal again to stop at once)", self._announce)
            self._announce = None
        if await super().on_tick(counter):
            return True
        return self.drain.draining and self.drain.in_flight == 0


def serve_until_drained(app: Any, **config: Any) -> int | None:
    """Run ``app`` under uvicorn (``config``: `uvicorn.Config` options) until a signal's drain ends.

    Returns:
        The signal that stopped the server after a drain, or None (it stopped otherwise).
    """
    from teacher_service.api.logs import redact_access_log

    drain = Drain()
    server = DrainingServer(uvicorn.Config(DrainMiddleware(app, drain), **config), drain)
    redact_access_log()  # after Config: it (re)configures uvicorn's loggers
    server.run()
    if not server.started and not drain.draining:
        raise SystemExit(3)  # the lifespan (teacher load) failed, as `uvicorn.run` reports it
    return drain.signum
