"""One place that turns errors into answers: {"detail": "..."} with a 4xx for every user error.

FaceID's domain errors (faceid.errors) map by type; request validation errors become one readable
line that names the field (the structured list is kept under "errors", without echoing the input:
it may be huge, or a NaN that JSON cannot carry); anything unexpected is a logged 500 that says
nothing about the internals.
"""

from __future__ import annotations

import logging
from typing import Any, cast

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.paths import FieldError
from app.store import JobStateError, QueueFullError
from faceid.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    FaceIDError,
    ImageError,
    ImageTooLargeError,
    ModelNotReadyError,
)

log = logging.getLogger(__name__)

# Most specific first.
_STATUS: list[tuple[type[Exception], int]] = [
    (ImageTooLargeError, 413),
    (ImageError, 422),
    (ModelNotReadyError, 503),
    (CheckpointError, 409),
    (ConfigError, 422),
    (DataError, 422),
    (FaceIDError, 400),
    (JobStateError, 409),
    (QueueFullError, 429),
]


def status_of(exc: Exception) -> int:
    for cls, code in _STATUS:
        if isinstance(exc, cls):
            return code
    return 500


def _part(p: Any, limit: int = 64) -> str:
    """One element of an error location, cut short: a key of a request body can be a megabyte."""
    text = str(p)
    return text if len(text) <= limit else text[:limit] + "..."


def _loc(loc: Any) -> str:
    parts = [_part(p) for p in loc if p not in ("body", "query", "path", "header", "form")]
    return ".".join(parts) or "body"


def _body_parse_error(cause: Any) -> str:
    """FastAPI answers a JSON body that json.loads cannot take (other than a syntax error) with a
    bare "There was an error parsing the body"; say what was wrong."""
    if isinstance(cause, RecursionError):
        why = "it is nested too deeply"
    elif isinstance(cause, UnicodeDecodeError):
        why = "it is not valid UTF-8"
    elif cause is not None:
        why = f"{type(cause).__name__}: {str(cause)[:120]}"
    else:
        why = "it is malformed"
    return (
        f"the request body could not be parsed as JSON ({why}); send one JSON object, for "
        'example {"train": "sample/train", "val": "sample/val"}'
    )


def _not_json(err: dict[str, Any]) -> bool:
    """The body as a whole is not an object: sent as text, a form, or JSON without its header."""
    return tuple(err.get("loc", ())) == ("body",) and err.get("type") in ("model_attributes_type", "dict_type")


def _field(err: dict[str, Any]) -> str:
    """Which field an error is about; a JSON syntax error's location is a character offset."""
    return "body" if err.get("type") == "json_invalid" else _loc(err.get("loc", ()))


def validation_detail(errors: list[dict[str, Any]]) -> str:
    lines = []
    for err in errors[:5]:
        msg = err.get("msg", "invalid")
        if err.get("type") == "json_invalid":
            ctx = err.get("ctx") or {}
            msg = f"the body is not valid JSON ({ctx.get('error', 'decode error')})"
        if err.get("type") == "missing" and tuple(err.get("loc", ())) == ("body",):
            msg = "a JSON body is required"
        if _not_json(err):
            msg = "send one JSON object with the header Content-Type: application/json"
        lines.append(f"{_field(err)}: {msg}")
    more = len(errors) - 5
    return "; ".join(lines) + (f"; and {more} more" if more > 0 else "")


def install(app: FastAPI, routes_hint: str = "the routes are listed at /docs") -> None:
    """The handlers below on `app`; `routes_hint` ends the answer to a route that does not exist."""

    async def domain_error(request: Request, exc: Exception) -> JSONResponse:
        code = status_of(exc)
        body: dict[str, Any] = {"detail": str(exc)}
        field = getattr(exc, "field", None)
        if isinstance(exc, FieldError) or isinstance(field, str):
            body["field"] = field
        headers = {"Retry-After": "60"} if code in (429, 503) else None
        return JSONResponse(body, status_code=code, headers=headers)

    # Starlette's handler type takes any Exception; each handler is registered for its own class
    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        errors = list(cast(RequestValidationError, exc).errors())
        clean = [
            {
                "loc": [_part(p) for p in e.get("loc", ())],
                "msg": str(e.get("msg", ""))[:500],
                "type": str(e.get("type", "")),
            }
            for e in errors[:50]
        ]
        body: dict[str, Any] = {"detail": validation_detail(errors), "errors": clean}
        if clean:
            body["field"] = _field(errors[0])
        return JSONResponse(body, status_code=422)

    async def http_error(request: Request, error: Exception) -> JSONResponse:
        exc = cast(StarletteHTTPException, error)
        detail = str(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no route {request.method} {request.url.path[:100]}; {routes_hint}"
        elif exc.status_code == 400 and detail == "There was an error parsing the body":
            detail = _body_parse_error(exc.__cause__)
        elif exc.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path[:100]}; {routes_hint}"
        body: dict[str, Any] = {"detail": detail}
        field = getattr(exc, "field", None)
        if isinstance(field, str):
            body["field"] = field
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal server error; the server log has the details"}, status_code=500)

    for cls in (FaceIDError, JobStateError, QueueFullError):
        app.add_exception_handler(cls, domain_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
