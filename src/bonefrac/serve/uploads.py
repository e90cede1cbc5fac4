"""Uploads read into memory, with limits, and every way a request body can be wrong turned into a 4xx with a reason.

Starlette's own form parser spools every file over 1 MB to a temporary file on disk; an X-ray is personal data, and
nothing of it should reach the disk unless the operator asked for that (ServeSettings.save_uploads). So the
multipart body is parsed here, with python-multipart's streaming parser (the one Starlette uses), into bytes in
memory, and the size limit is enforced while the body streams in: an oversized upload is refused after at most the
limit has been read, never buffered whole.

    read_form(request, max_file_bytes=..., max_files=..., max_body_bytes=..., max_fields=..., max_field_bytes=...)
        -> Form([Upload(name, data)], {field: value}), or UploadError(status, reason)
    TimeoutMiddleware(app, seconds)                            503 with a reason when a request takes too long
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import anyio
from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartState, parse_options_header
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MULTIPART_OVERHEAD = 64 * 1024  # part headers and boundaries, on top of the files themselves


class UploadError(Exception):
    """A request the API refuses: the HTTP status, the reason the client is told, and headers (Retry-After)."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None):
        self.status = status
        self.reason = reason
        self.headers = headers or {}
        super().__init__(reason)


class Admission:
    """At most `limit` requests at once between reading their body and their answer: the server's memory for
    uploads in flight is bounded by limit x the body cap, whatever arrives. One more gets 503 with Retry-After at
    once, before its body is read. Used from the event loop only, so a plain counter is enough."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_flight = 0

    @contextmanager
    def slot(self) -> Iterator[None]:
        if self.in_flight >= self.limit:
            raise UploadError(503, f"the server is busy ({self.limit} requests in progress, its limit); try again "
                                   "in a few seconds", headers={"Retry-After": "5"})
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1


@dataclass
class Upload:
    """One file of a multipart body: the name the client gave it and its bytes."""

    name: str
    data: bytes


@dataclass(frozen=True)
class Form:
    """A multipart body: its files in order, and its plain fields (parts without a file name) as text."""

    uploads: list[Upload]
    fields: dict[str, str]


@dataclass
class _Part:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    data: bytearray = field(default_factory=bytearray)
    filename: str | None = None
    name: str = ""  # the part's form field name


def _megabytes(n: int) -> str:
    return f"{n / 1e6:g} MB"


async def read_form(request: Request, *, max_file_bytes: int, max_files: int, max_body_bytes: int | None = None,
                    max_fields: int | None = None, max_field_bytes: int | None = None) -> Form:
    """The file parts of a multipart/form-data body, in order, and its named fields without a file name as text.

    The body is counted as it streams in, whether its length was declared or it comes chunked: at most
    min(max_body_bytes, max_files × max_file_bytes + part headers) bytes are read, whatever the parts are.
    Raises UploadError: 415 when the body is not multipart/form-data, 413 when the body is over that, a file is over
    `max_file_bytes`, there are more than `max_files` files or `max_fields` fields (parts without a file name), or a
    field is over `max_field_bytes`, 400 when the multipart body is malformed, 422 when it holds no file.
    None: no limit of that kind beyond the others.
    """
    kind, options = parse_options_header(request.headers.get("content-type", ""))
    if kind != b"multipart/form-data":
        shown = kind.decode("latin-1") or "none"
        raise UploadError(415, f"send the image as multipart/form-data (a part named file), not {shown}")
    boundary = options.get(b"boundary")
    if not boundary:
        raise UploadError(400, "malformed multipart body: the Content-Type has no boundary")
    declared = request.headers.get("content-length", "")
    body_limit = max_files * max_file_bytes + MULTIPART_OVERHEAD
    limit = f"{_megabytes(body_limit)} ({max_files} × {_megabytes(max_file_bytes)} and part headers)"
    if max_body_bytes is not None and max_body_bytes < body_limit:
        body_limit, limit = max_body_bytes, f"{_megabytes(max_body_bytes)} (all parts together)"
    if declared.isdigit() and int(declared) > body_limit:
        raise UploadError(413, f"request body of {_megabytes(int(declared))} is over the limit of {limit}")
    field_limit = max_file_bytes if max_field_bytes is None else max_field_bytes

    parts: list[_Part] = []
    header: list[bytes] = [b"", b""]  # the header field and value being read

    def on_part_begin() -> None:
        parts.append(_Part())

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header[0] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header[1] += data[start:end]

    def on_header_end() -> None:
        parts[-1].headers[header[0].lower()] = header[1]
        header[:] = [b"", b""]

    def on_headers_finished() -> None:
        _, disposition = parse_options_header(parts[-1].headers.get(b"content-disposition", b""))
        parts[-1].name = disposition.get(b"name", b"").decode("utf-8", errors="replace")
        if b"filename" in disposition:
            parts[-1].filename = disposition[b"filename"].decode("utf-8", errors="replace")
            if sum(part.filename is not None for part in parts) > max_files:
                raise UploadError(413, f"more than {max_files} file{'s' * (max_files != 1)} in one request")
        elif max_fields is not None and sum(part.filename is None for part in parts) > max_fields:
            raise UploadError(413, f"more than {max_fields} form field{'s' * (max_fields != 1)} in one request")

    def on_part_data(data: bytes, start: int, end: int) -> None:
        part = parts[-1]
        part.data += data[start:end]
        if part.filename is not None and len(part.data) > max_file_bytes:
            raise UploadError(413, f"file {part.filename!r} is over the upload limit of {_megabytes(max_file_bytes)}")
        if part.filename is None and len(part.data) > field_limit:
            raise UploadError(413, f"a form field is over the limit of {field_limit:,} bytes")

    callbacks = {
        "on_part_begin": on_part_begin,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished,
        "on_part_data": on_part_data,
    }
    parser = MultipartParser(boundary, callbacks)
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > body_limit:  # a chunked body, or one longer than it declared
                raise UploadError(413, f"request body is over the limit of {limit}")
            parser.write(chunk)
        parser.finalize()
    except FormParserError as err:
        raise UploadError(400, f"malformed multipart body ({err})") from err
    except ClientDisconnect as err:  # nobody is left to answer; a 400 keeps it out of the server's error log
        raise UploadError(400, "the client disconnected before the body was complete") from err
    if parser.state != MultipartState.END:
        raise UploadError(400, "malformed multipart body: it ends before its closing boundary")
    uploads = [Upload(part.filename or "upload", bytes(part.data)) for part in parts if part.filename is not None]
    if not uploads:
        raise UploadError(422, "no file in the request: send multipart/form-data with the image in a part named file")
    fields = {part.name: part.data.decode("utf-8", errors="replace") for part in parts
              if part.filename is None and part.name}
    return Form(uploads, fields)


class TimeoutMiddleware:
    """Answer 503 with a reason when a request (upload and inference together) takes longer than `seconds`.

    Covers a client that sends its body slowly as well as a queue of inferences that has grown too long. The
    cancellation reaches the request's model call, which stops before its next step (app.Service.predict); the
    client is told to retry.
    """

    def __init__(self, app: ASGIApp, seconds: float):
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracking(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        with anyio.move_on_after(self.seconds) as scope_timer:
            await self.app(scope, receive, send_tracking)
        if scope_timer.cancelled_caught and not started:
            response = JSONResponse(
                {"detail": f"request took longer than {self.seconds:g} s; try again later"},
                status_code=503,
                headers={"Retry-After": "5"},
            )
            await response(scope, receive, send)
