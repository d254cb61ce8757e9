"""FACEID_API_KEY: every route but /health needs X-API-Key; the key is never echoed."""

from __future__ import annotations

import logging

import pytest
from service_helpers import face_like, running

pytestmark = pytest.mark.anyio

KEY = "s3cret-key-0123456789"


@pytest.mark.parametrize(
    "method,path",
    [
        ("GET", "/jobs"),
        ("POST", "/jobs"),
        ("GET", f"/jobs/{'0' * 32}"),
        ("POST", f"/jobs/{'0' * 32}/cancel"),
        ("POST", f"/jobs/{'0' * 32}/resume"),
        ("GET", f"/jobs/{'0' * 32}/logs"),
        ("GET", "/model"),
        ("POST", f"/models/{'0' * 32}/activate"),
        ("POST", "/embed"),
        ("POST", "/verify"),
        ("GET", "/ready"),
        ("GET", "/docs"),
        ("GET", "/openapi.json"),
        ("GET", "/redoc"),
        ("GET", "/no-such-route"),
    ],
)
async def test_routes_need_the_key(make_app, method, path, caplog):
    caplog.set_level(logging.DEBUG)
    async with running(make_app(api_key=KEY)) as client:
        r = await client.request(method, path)
        assert r.status_code == 401, r.text
        assert "X-API-Key" in r.json()["detail"]
        r = await client.request(method, path, headers={"X-API-Key": KEY[:-1] + "x"})
        assert r.status_code == 401 and "wrong" in r.json()["detail"]
        r = await client.request(method, path, headers={"X-API-Key": KEY})
        assert r.status_code != 401
        assert KEY not in r.text and all(KEY not in v for v in r.headers.values())
    assert KEY not in caplog.text


async def test_health_is_open(make_app):
    async with running(make_app(api_key=KEY)) as client:
        r = await client.get("/health")
        assert r.status_code == 200 and r.json()["status"] == "ok"


async def test_no_body_is_read_without_the_key(make_app):
    read = 0

    async def body():
        nonlocal read
        for _ in range(100):
            read += 1
            yield b"x" * 65536

    async with running(make_app(api_key=KEY)) as client:
        r = await client.post("/embed", content=body(), headers={"content-type": "multipart/form-data; boundary=a"})
        assert r.status_code == 401
        assert read <= 2


async def test_public_docs_option(make_app):
    async with running(make_app(api_key=KEY, public_docs=True)) as client:
        assert (await client.get("/docs")).status_code == 200
        schema = (await client.get("/openapi.json")).json()
        assert schema["components"]["securitySchemes"]["APIKey"] == {
            "type": "apiKey",
            "in": "header",
            "name": "X-API-Key",
        }
        assert schema["paths"]["/health"]["get"]["security"] == []
        assert (await client.get("/jobs")).status_code == 401


async def test_key_with_non_ascii_header_is_401_not_500(make_app):
    async with running(make_app(api_key=KEY)) as client:
        r = await client.get("/jobs", headers={"X-API-Key": "caf\u00e9".encode("latin-1")})
        assert r.status_code == 401


async def test_without_a_key_everything_is_open(make_app):
    async with running(make_app()) as client:
        assert (await client.get("/jobs")).status_code == 200
        assert (await client.get("/openapi.json")).status_code == 200
        r = await client.post("/embed", files={"image": ("a.png", face_like(1))})
        assert r.status_code == 503
