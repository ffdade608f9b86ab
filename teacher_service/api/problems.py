"""Errors of the online endpoint as RFC 9457 problem documents.

Every error answer is ``application/problem+json``::

    {"type": "urn:distillery:problem:invalid-image", "title": "Image cannot be decoded",
     "status": 422, "detail": "...", "errors": [{"index": 1, "image_id": 7, "field": "images",
     "detail": "..."}]}

``errors`` names each offending view (its position in the request and its image id) or
request field, so that a client can drop exactly the bad items and resend the rest. An
answer never grows with the input: ``errors`` lists at most `MAX_LISTED_ERRORS` entries and
``num_errors`` counts them all; texts are clipped (`clip_text`) and values quoted short
(`short_repr`).
`RequestProblem` is also what the Ray Serve handle method raises, so handle callers and
HTTP callers see the same information.
"""

from __future__ import annotations

import reprlib
from typing import Any

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_TYPE_PREFIX = "urn:distillery:problem:"
MAX_LISTED_ERRORS = 5
"""Most ``errors`` entries in one answer; ``num_errors`` counts all of them."""
MAX_DETAIL_CHARS = 600
MAX_ENTRY_CHARS = 240

_short = reprlib.Repr()
_short.maxstring = _short.maxother = _short.maxlong = 40
_short.maxlist = _short.maxtuple = _short.maxdict = _short.maxset = 4
_short.maxlevel = 2


def short_repr(value: Any) -> str:
    """``repr(value)`` cut to a few dozen characters and two levels of nesting (never the whole input)."""
    try:
        return _short.repr(value)
    except (ValueError, RecursionError):  # ints beyond the digit limit, pathological nesting
        return f"<{type(value).__name__}>"


def clip_text(text: str, limit: int = MAX_ENTRY_CHARS) -> str:
    """``text`` cut to ``limit`` characters, marked with how much was left out."""
    text = str(text)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"

# kind -> (status, title). The kind is the last part of the type URI and the `kind` label of
# the errors metric.
PROBLEM_KINDS: dict[str, tuple[int, str]] = {
    "malformed-request": (400, "Malformed request"),
    "unauthorized": (401, "Missing or invalid bearer token"),
    "not-found": (404, "Not found"),
    "method-not-allowed": (405, "Method not allowed"),
    "request-timeout": (408, "Request body not received in time"),
    "request-too-large": (413, "Request too large"),
    "unsupported-media-type": (415, "Unsupported media type"),
    "invalid-request": (422, "Invalid request"),
    "invalid-view": (422, "Invalid view"),
    "invalid-image": (422, "Image cannot be decoded"),
    "image-size-mismatch": (422, "Image size differs from the view"),
    "image-too-large": (422, "Image exceeds the pixel limit"),
    "unknown-target": (422, "Unknown target group or name"),
    "internal-error": (500, "Internal error"),
    "overloaded": (503, "Server overloaded"),
    "not-ready": (503, "Teacher not loaded yet"),
    "draining": (503, "Server shutting down"),
}


class RequestProblem(ValueError):
    """A request the endpoint refuses; carries everything its problem document shows.

    Attributes:
        kind: key of `PROBLEM_KINDS` (decides status, title and type URI).
        detail: a sentence for humans, naming what was expected and what came.
        errors: per-item entries (``index``, ``image_id``, ``field``, ``detail``).
        headers: extra response headers (``Retry-After``, ``WWW-Authenticate``).
        num_errors: how many offending items there are when ``errors`` lists only the first
            few (default: ``len(errors)``).
    """

    def __init__(
        self,
        kind: str,
        detail: str,
        *,
        errors: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
        num_errors: int | None = None,
    ) -> None:
        if kind not in PROBLEM_KINDS:
            raise ValueError(f"RequestProblem(kind=) expects one of {sorted(PROBLEM_KINDS)}. Got {kind!r}.")
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.errors = list(errors or [])
        self.headers = dict(headers or {})
        self.num_errors = len(self.errors) if num_errors is None else int(num_errors)

    @property
    def status(self) -> int:
        return PROBLEM_KINDS[self.kind][0]

    def to_dict(self, instance: str | None = None) -> dict[str, Any]:
        return problem_document(self.kind, self.detail, errors=self.errors, instance=instance, num_errors=self.num_errors)

    def __reduce__(self):
        # Keeps kind, errors and headers when the error crosses a Ray process boundary.
        return (_rebuild_problem, (self.kind, self.detail, self.errors, self.headers, self.num_errors))


def _rebuild_problem(kind, detail, errors, headers, num_errors=None) -> RequestProblem:
    return RequestProblem(kind, detail, errors=errors, headers=headers, num_errors=num_errors)


class Overloaded(RequestProblem):
    """The bounded queue is full: answer 503 with Retry-After instead of queueing."""

    def __init__(self, detail: str, retry_after_s: int) -> None:
        super().__init__("overloaded", detail, headers={"Retry-After": str(int(retry_after_s))})
        self.retry_after_s = int(retry_after_s)

    def __reduce__(self):
        return (Overloaded, (self.detail, self.retry_after_s))


def problem_document(
    kind: str,
    detail: str,
    *,
    errors: list[dict[str, Any]] | None = None,
    instance: str | None = None,
    num_errors: int | None = None,
) -> dict[str, Any]:
    """The RFC 9457 document of ``kind``; ``errors`` cut to `MAX_LISTED_ERRORS` entries
    (``num_errors`` keeps the count) and every text clipped, whatever the caller passed."""
    status, title = PROBLEM_KINDS[kind]
    errors = list(errors or [])
    listed = [
        {key: clip_text(value) if isinstance(value, str) else value for key, value in entry.items()}
        for entry in errors[:MAX_LISTED_ERRORS]
    ]
    document: dict[str, Any] = {
        "type": PROBLEM_TYPE_PREFIX + kind,
        "title": title,
        "status": status,
        "detail": clip_text(detail, MAX_DETAIL_CHARS),
        "errors": listed,
        "num_errors": max(len(errors), num_errors or 0),
    }
    if instance is not None:
        document["instance"] = instance
    return document


def kind_for_status(status: int) -> str:
    """The generic kind of an HTTP status raised by the framework itself (404, 405, 400 ...)."""
    for kind, (kind_status, _) in PROBLEM_KINDS.items():
        if kind_status == status and kind not in {
            "invalid-view", "invalid-image", "image-size-mismatch", "image-too-large", "unknown-target"
        }:
            return kind
    return "internal-error" if status >= 500 else "malformed-request"
