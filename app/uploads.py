"""Streaming multipart/form-data reading with hard limits.

FastAPI's `UploadFile` parameters read the whole body before a route runs and know no size limit
for files. Here the body is parsed as it arrives: each file is capped at FACEID_MAX_UPLOAD_MB and
reading stops at the first byte over it (413), a declared Content-Length over the limit is refused
before anything is read, and unknown, repeated or missing fields are refused with a message that
names the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AbstractSet, Any, Optional

from fastapi import HTTPException as _HTTPException
from fastapi import Request
from starlette.requests import ClientDisconnect

try:  # python-multipart >= 0.0.13
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser, parse_options_header
except ImportError:  # pragma: no cover - older releases
    from multipart.exceptions import FormParserError  # type: ignore[no-redef]  # the same API under its old name
    from multipart.multipart import MultipartParser, parse_options_header  # type: ignore[no-redef]  # likewise

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

MAX_FIELD_BYTES = 256  # a text field such as `threshold`
MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers


@dataclass
class Part:
    name: str
    filename: Optional[str] = None
    content_type: Optional[str] = None
    data: bytearray = field(default_factory=bytearray)


def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):g} MB"


class _Collector:
    """python-multipart callbacks that keep the parts in memory, each within its limit."""

    def __init__(
        self, files: set[str], fields: set[str], max_file_bytes: int, repeated: Optional[dict[str, int]] = None
    ) -> None:
        self.repeated = dict(repeated or {})  # file fields sent once or more: name -> most times
        self.files, self.fields = files | set(self.repeated), fields
        self.max_file_bytes = max_file_bytes
        self.parts: dict[str, Part] = {}
        self.lists: dict[str, list[Part]] = {name: [] for name in self.repeated}
        self.ended = False
        self._header_name = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._current: Optional[Part] = None
        self._limit = 0

    def on_part_begin(self) -> None:
        self._headers = {}
        self._current = None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._header_name.strip().lower()] = self._header_value.strip()
        self._header_name = self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        raw_name = options.get(b"name")
        if raw_name is None:
            raise HTTPException(400, "a multipart part has no name in its Content-Disposition header")
        name = raw_name.decode("utf-8", errors="replace")
        expected = sorted(self.files | self.fields)
        if name not in self.files and name not in self.fields:
            raise HTTPException(
                422, f"unexpected form field {name[:100]!r}; this route takes {', '.join(expected)}", field=name[:100]
            )
        if name in self.parts:
            raise HTTPException(422, f"form field {name!r} is sent twice; send it once", field=name)
        if name in self.lists and len(self.lists[name]) >= self.repeated[name]:
            raise HTTPException(
                422,
                f"more than {self.repeated[name]} files in form field {name!r}, the most one "
                "request may carry (FACEID_BATCH_MAX_SIZE); split them over several requests",
                field=name,
            )
        filename = options.get(b"filename")
        ctype = self._headers.get(b"content-type")
        self._current = Part(
            name=name,
            filename=filename.decode("utf-8", errors="replace")[:255] if filename else None,
            content_type=ctype.decode("latin-1")[:255] if ctype else None,
        )
        self._limit = self.max_file_bytes if name in self.files else MAX_FIELD_BYTES
        if name in self.lists:
            self.lists[name].append(self._current)
        else:
            self.parts[name] = self._current

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._current
        if part is None:
            return
        if len(part.data) + (end - start) > self._limit:
            if part.name in self.files:
                raise HTTPException(
                    413,
                    f"file {part.name!r} is larger than the upload limit of "
                    f"{_mb(self.max_file_bytes)} (FACEID_MAX_UPLOAD_MB); send a smaller image",
                    field=part.name,
                )
            raise HTTPException(
                422, f"form field {part.name!r} is too long (over {self._limit} bytes)", field=part.name
            )
        part.data += data[start:end]

    def on_part_end(self) -> None:
        self._current = None

    def on_end(self) -> None:
        self.ended = True

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self.on_part_begin,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_end": self.on_end,
        }


class HTTPException(_HTTPException):
    """An upload refused because of one form field, which `field` names (the answer's "field")."""

    def __init__(self, status_code: int, detail: str, field: Optional[str] = None) -> None:
        super().__init__(status_code, detail)
        self.field = field


async def read_form(
    request: Request,
    *,
    files: set[str],
    fields: AbstractSet[str] = frozenset(),
    required: set[str],
    max_file_bytes: int,
    repeated: Optional[dict[str, int]] = None,
) -> dict[str, Any]:
    """Parse the multipart body of `request` into {field name: Part}; a field of `repeated`
    (name -> most files) maps to the list of its Parts, in the order sent.

    Raises HTTPException: 415 not multipart/form-data, 413 a file over `max_file_bytes` or a
    Content-Length over what the fields can add up to, 400 a malformed body, 422 an unknown,
    repeated (beyond its count) or missing field.
    """
    ctype, options = parse_options_header(request.headers.get("content-type"))
    if ctype != b"multipart/form-data":
        shown = ctype.decode("latin-1")[:100] or "a request without a Content-Type"
        raise HTTPException(
            415,
            f"send the image as multipart/form-data (field "
            f"{', '.join(sorted(required))}), not {shown}; for example "
            f"curl -F {sorted(required)[0]}=@photo.jpg",
        )
    boundary = options.get(b"boundary")
    if not boundary:
        raise HTTPException(400, "the multipart Content-Type header has no boundary")
    limit = (len(files) + sum((repeated or {}).values())) * max_file_bytes + MULTIPART_OVERHEAD
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise HTTPException(400, "the Content-Length header is not a number") from None
        if length > limit:
            raise HTTPException(
                413,
                f"the request body ({_mb(length)}) is larger than the upload limit "
                f"allows ({_mb(max_file_bytes)} per image, FACEID_MAX_UPLOAD_MB)",
            )
    collector = _Collector(files, set(fields), max_file_bytes, repeated)
    try:
        parser = MultipartParser(boundary, collector.callbacks())
    except (FormParserError, ValueError) as e:
        raise HTTPException(400, f"malformed multipart body: {e}") from None
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise HTTPException(
                    413,
                    f"the request body is larger than the upload limit allows "
                    f"({_mb(max_file_bytes)} per image, FACEID_MAX_UPLOAD_MB)",
                )
            if chunk:
                parser.write(chunk)
        parser.finalize()
    except FormParserError as e:
        raise HTTPException(400, f"malformed multipart body: {str(e)[:200]}") from None
    except ClientDisconnect:
        raise HTTPException(400, "the client disconnected before the upload was complete") from None
    if not collector.ended:
        raise HTTPException(400, "the multipart body ended before its closing boundary; the upload was cut off")
    missing = sorted(required - set(collector.parts) - {n for n, parts in collector.lists.items() if parts})
    if missing:
        raise HTTPException(
            422,
            f"missing form field {', '.join(repr(m) for m in missing)}; send "
            f"the image(s) as multipart/form-data, for example "
            f"curl -F {missing[0]}=@photo.jpg",
            field=missing[0],
        )
    return {**collector.parts, **collector.lists}
