"""ASGI middleware: the API key check and the request body limit.

Both are plain ASGI (no BaseHTTPMiddleware), so they answer before any of the body is read: a
client without the key, or one announcing a body over the limit, costs us only its headers.
"""

from __future__ import annotations

import hmac
import json
from typing import Callable, Optional

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.settings import Settings

API_KEY_HEADER = "x-api-key"
OPEN_PATHS = frozenset({"/health", "/"})  # "/" is the page: it holds no data and asks for the key
OPEN_PREFIXES = ("/ui/",)  # the page's static files
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
UPLOAD_PATHS = frozenset({"/embed", "/verify"})
BATCH_PATH = "/embed/batch"  # up to FACEID_BATCH_MAX_SIZE images
GALLERY_PREFIX = "/galleries/"
GALLERY_UPLOADS = ("/faces", "/identify")
JSON_BODY_LIMIT = 1024 * 1024  # POST /jobs bodies are a few KB

SettingsGetter = Callable[[], Optional[Settings]]


async def _send_json(send: Send, status: int, body: dict, headers: Optional[list] = None) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class APIKeyMiddleware:
    """With FACEID_API_KEY set, every path but /health (and the docs with FACEID_PUBLIC_DOCS) needs
    the header X-API-Key; 401 otherwise. Constant-time comparison; the key is never echoed."""

    def __init__(self, app: ASGIApp, get_settings: SettingsGetter) -> None:
        self.app = app
        self.get_settings = get_settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        settings = self.get_settings()
        if settings is None:
            await _send_json(
                send, 503, {"detail": "the service is starting; retry in a moment"}, [(b"retry-after", b"5")]
            )
            return
        path = scope.get("path", "")
        if (
            settings.api_key is None
            or path in OPEN_PATHS
            or path.startswith(OPEN_PREFIXES)
            or (settings.public_docs and path in DOCS_PATHS)
        ):
            await self.app(scope, receive, send)
            return
        given = b""
        for name, value in scope.get("headers", []):
            if name == API_KEY_HEADER.encode():
                given = value
                break
        expected = settings.api_key.encode()
        if not given or not hmac.compare_digest(given, expected):
            detail = (
                "missing API key: send it in the X-API-Key header"
                if not given
                else "wrong API key in the X-API-Key header"
            )
            await _send_json(send, 401, {"detail": detail}, [(b"www-authenticate", b"APIKey")])
            return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Refuse request bodies over the limit: early from Content-Length, else while streaming
    (413). Upload routes get room for their images; their own parser caps each file."""

    def __init__(self, app: ASGIApp, get_settings: SettingsGetter) -> None:
        self.app = app
        self.get_settings = get_settings

    def _limit(self, path: str) -> int:
        settings = self.get_settings()
        if path in UPLOAD_PATHS and settings is not None:
            return 2 * settings.max_upload_bytes + 1024 * 1024
        if path == BATCH_PATH and settings is not None:
            return settings.batch_max_size * settings.max_upload_bytes + 1024 * 1024
        if path.startswith(GALLERY_PREFIX) and path.endswith(GALLERY_UPLOADS) and settings is not None:
            return 16 * settings.max_upload_bytes + 1024 * 1024  # enrolment: up to 16 photos
        if path.startswith(GALLERY_PREFIX) and path.endswith("/embeddings"):
            return 32 * 1024 * 1024  # up to 1000 imported embeddings as JSON
        return JSON_BODY_LIMIT

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self._limit(scope.get("path", ""))
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _send_json(send, 400, {"detail": "the Content-Length header is not a number"})
                    return
                if declared > limit:
                    await _send_json(
                        send,
                        413,
                        {
                            "detail": f"the request body ({declared} bytes) is over "
                            f"the limit of {limit} bytes for this route"
                        },
                    )
                    return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # FastAPI re-raises an HTTPException met while reading the body.
                    raise HTTPException(413, f"the request body is over the limit of {limit} bytes for this route")
            return message

        await self.app(scope, limited_receive, send)
