"""The OpenAPI document: every route is there, with an example, and errors are documented."""

from __future__ import annotations

import json

import pytest
from service_helpers import running

pytestmark = pytest.mark.anyio

ROUTES = [
    ("post", "/jobs"),
    ("get", "/jobs"),
    ("get", "/jobs/{job_id}"),
    ("post", "/jobs/{job_id}/cancel"),
    ("post", "/jobs/{job_id}/resume"),
    ("get", "/jobs/{job_id}/logs"),
    ("get", "/jobs/{job_id}/roc"),
    ("get", "/model"),
    ("post", "/models/{job_id}/activate"),
    ("post", "/embed"),
    ("post", "/embed/batch"),
    ("post", "/verify"),
    ("get", "/health"),
    ("get", "/ready"),
    ("get", "/data"),
    ("post", "/galleries"),
    ("get", "/galleries"),
    ("get", "/galleries/{gallery}"),
    ("delete", "/galleries/{gallery}"),
    ("get", "/galleries/{gallery}/people"),
    ("get", "/galleries/{gallery}/people/{person}"),
    ("delete", "/galleries/{gallery}/people/{person}"),
    ("post", "/galleries/{gallery}/people/{person}/faces"),
    ("delete", "/galleries/{gallery}/people/{person}/faces/{face_id}"),
    ("get", "/galleries/{gallery}/people/{person}/faces/{face_id}/crop"),
    ("post", "/galleries/{gallery}/embeddings"),
    ("post", "/galleries/{gallery}/identify"),
]


def _has_example(node) -> bool:
    text = json.dumps(node)
    return '"example"' in text or '"examples"' in text


async def test_every_route_documented_with_an_example(make_app):
    async with running(make_app()) as client:
        schema = (await client.get("/openapi.json")).json()
    components = schema["components"]["schemas"]
    served = {(method, path) for path, ops in schema["paths"].items() for method in ops}
    assert served == set(ROUTES), "a route was added or removed: update ROUTES"
    for method, path in ROUTES:
        op = schema["paths"][path][method]
        assert op.get("summary"), path
        found = _has_example(op.get("requestBody", {})) or _has_example(op["responses"])
        if not found:  # the example may sit on the referenced response model
            refs = [r.split("/")[-1] for r in json.dumps(op["responses"]).split('"$ref": "')[1:]]
            found = any(_has_example(components[ref.split('"')[0]]) for ref in refs)
        found = found or any(_has_example(p) for p in op.get("parameters", []))
        assert found, f"{method.upper()} {path} has no example"
    body = schema["paths"]["/jobs"]["post"]["requestBody"]["content"]["application/json"]
    assert "cpu-small" in body["examples"]
    verify = schema["paths"]["/verify"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert set(verify["properties"]) == {"image1", "image2", "threshold", "detect", "min_face"}
    assert set(verify["required"]) == {"image1", "image2"}
    for code in ("413", "415", "422", "503"):
        assert code in schema["paths"]["/verify"]["post"]["responses"]
