"""Reading the multipart body of ``POST /v1/targets`` with a size limit per field.

`read_targets_form` streams the body through python-multipart and keeps only what the
route uses: the ``views`` text (bytes, parsed later in a worker thread), the ``targets``
text and the ``images`` files, in memory. Every limit is checked while the bytes arrive,
before anything is parsed or decoded:

- ``views`` and ``targets``: at most ``max_field_bytes`` each (413);
- each image file: at most ``max_image_bytes`` (413), at most ``max_images`` files (413);
- part headers: at most `MAX_PART_HEADER_BYTES` per part (413); other fields are ignored
  (their data is not kept), at most `MAX_OTHER_PARTS` of them (413).

A request refused here has the rest of its body read and dropped (the middleware's
``max_request_bytes`` still bounds it), so that a client that is still uploading reads
its answer instead of a reset connection. A client that goes away mid-body raises
`starlette.requests.ClientDisconnect`, which the app answers as a disconnect, not an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from starlette.requests import Request

from teacher_service.api.problems import RequestProblem, clip_text

MAX_PART_HEADER_BYTES = 16 * 1024
MAX_OTHER_PARTS = 8


@dataclass(slots=True)
class TargetsForm:
    """The fields of a ``POST /v1/targets`` body."""

    views: bytes | None = None
    """The ``views`` field as sent (JSON text); None when absent."""
    targets: str | None = None
    """The ``targets`` field (comma-separated groups or names); None when absent."""
    images: list[bytes] = field(default_factory=list)
    """The ``images`` files, in order."""


class _Part:
    __slots__ = ("name", "is_file", "data", "limit", "kept")

    def __init__(self) -> None:
        self.name = ""
        self.is_file = False
        self.data = bytearray()
        self.limit = 0
        self.kept = False


class _FormReader:
    """python-multipart callbacks that keep the three fields and enforce the limits.

    The first refusal is recorded in `problem`; after it every byte is dropped, and
    `read_targets_form` raises it once the body has ended.
    """

    def __init__(self, *, max_images: int, max_field_bytes: int, max_image_bytes: int) -> None:
        self.max_images = max_images
        self.max_field_bytes = max_field_bytes
        self.max_image_bytes = max_image_bytes
        self.form = TargetsForm()
        self.problem: RequestProblem | None = None
        self._part = _Part()
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._header_bytes = 0
        self._disposition = b""
        self._other_parts = 0

    def refuse(self, kind: str, detail: str, entry: dict) -> None:
        if self.problem is None:
            self.problem = RequestProblem(kind, detail, errors=[entry])

    # headers --------------------------------------------------------------------------
    def on_part_begin(self) -> None:
        self._part = _Part()
        self._header_bytes = 0
        self._disposition = b""

    def _count_header(self, size: int) -> bool:
        self._header_bytes += size
        if self._header_bytes > MAX_PART_HEADER_BYTES:
            self.refuse(
                "request-too-large",
                f"A multipart part expects at most {MAX_PART_HEADER_BYTES} bytes of headers. Got more.",
                {"field": "part headers", "detail": f"> {MAX_PART_HEADER_BYTES} bytes"},
            )
            return False
        return self.problem is None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        if self._count_header(end - start):
            self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        if self._count_header(end - start):
            self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if bytes(self._header_name).lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_name = bytearray()
        self._header_value = bytearray()

    def on_headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        if self.problem is not None:
            return
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            self.refuse(
                "malformed-request",
                'A multipart part expects a Content-Disposition header with a name. Got none.',
                {"field": "body", "detail": "part without a name"},
            )
            return
        part = self._part
        part.name = options[b"name"].decode("utf-8", errors="replace")
        part.is_file = b"filename" in options
        form = self.form
        if part.name == "images":
            if not part.is_file:
                self.refuse("invalid-request",
                            f"images= expects files. Got a text field at position {len(form.images)}.",
                            {"index": len(form.images), "field": "images", "detail": "text instead of file"})
                return
            if len(form.images) >= self.max_images:
                # The limit is on views per request (one image each), as `TargetService` checks it.
                self.refuse("request-too-large",
                            f"views= expects at most {self.max_images} views per request. Got more than "
                            f"{self.max_images} image files (one per view); split the request.",
                            {"field": "views", "detail": f"> {self.max_images} image files"})
                return
            part.limit, part.kept = self.max_image_bytes, True
        elif part.name in ("views", "targets"):
            if part.is_file:
                self.refuse("invalid-request", f"{part.name}= expects a text field. Got a file.",
                            {"field": part.name, "detail": "file instead of text"})
                return
            if getattr(form, part.name) is not None:
                self.refuse("invalid-request", f"{part.name}= expects one field. Got several.",
                            {"field": part.name, "detail": "repeated"})
                return
            part.limit, part.kept = self.max_field_bytes, True
        else:
            self._other_parts += 1
            if self._other_parts > MAX_OTHER_PARTS:
                self.refuse("request-too-large",
                            f"POST /v1/targets expects the fields views, images, targets and at most "
                            f"{MAX_OTHER_PARTS} others. Got more.",
                            {"field": clip_text(part.name, 64), "detail": "too many fields"})

    # data -----------------------------------------------------------------------------
    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        if self.problem is not None or not part.kept:
            return
        if len(part.data) + (end - start) > part.limit:
            where = {"field": part.name, "detail": f"> {part.limit} bytes"}
            what = "a text field"
            if part.name == "images":
                where["index"] = len(self.form.images)
                what = f"image file at position {len(self.form.images)}"
            self.refuse("request-too-large",
                        f"{part.name}= expects at most {part.limit} bytes per {'file' if part.is_file else 'field'}. "
                        f"Got more ({what}).", where)
            return
        part.data += data[start:end]

    def on_part_end(self) -> None:
        part = self._part
        if self.problem is not None or not part.kept:
            return
        if part.name == "images":
            self.form.images.append(bytes(part.data))
        elif part.name == "views":
            self.form.views = bytes(part.data)
        else:
            self.form.targets = bytes(part.data).decode("utf-8", errors="replace")
        part.data = bytearray()

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self.on_part_begin,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
        }


async def read_targets_form(
    request: Request, *, max_images: int, max_field_bytes: int, max_image_bytes: int
) -> TargetsForm:
    """Read the whole multipart body of ``request`` under the limits above.

    Raises:
        RequestProblem: 400 malformed body, 413 a field, file or part over its limit,
            422 a field of the wrong kind (text for images, a file for views).
        starlette.requests.ClientDisconnect: the client went away before the body ended.
    """
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header

    _, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if not boundary:
        raise RequestProblem("malformed-request", "multipart/form-data expects a boundary parameter. Got none.",
                             errors=[{"field": "content-type", "detail": "no boundary"}])
    reader = _FormReader(max_images=max_images, max_field_bytes=max_field_bytes, max_image_bytes=max_image_bytes)
    parser = MultipartParser(boundary, reader.callbacks())
    malformed: str | None = None
    async for chunk in request.stream():
        if malformed is not None:
            continue  # drop the rest of a body that cannot be parsed
        try:
            parser.write(chunk)
        except MultipartParseError as error:
            malformed = clip_text(str(error), 120)
    if reader.problem is not None:
        raise reader.problem
    if malformed is None and parser.state != MultipartState.END:
        malformed = "the body ends before the closing boundary"
    if malformed is not None:
        raise RequestProblem("malformed-request",
                             f"POST /v1/targets expects a well-formed multipart body. Got: {malformed}.",
                             errors=[{"field": "body", "detail": malformed}])
    return reader.form


__all__ = ["TargetsForm", "read_targets_form", "MAX_PART_HEADER_BYTES", "MAX_OTHER_PARTS"]
