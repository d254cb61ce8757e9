"""A property-based pass over the whole API from its OpenAPI schema: no input gives a 5xx.

schemathesis generates requests for every operation (valid and invalid bodies, parameters and
multipart uploads) against the app in process with its lifespan, the fake trainer and a served
fake model. Each answer must be below 500, and 2xx answers must match the documented schema.
"""

from __future__ import annotations

import sys

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from service_helpers import FAKE_TRAINER, fake_loader, image_bytes, write_fake_checkpoint  # noqa: E402

from app.main import create_app  # noqa: E402
from app.settings import Settings  # noqa: E402


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    for split in ("train", "val"):
        folder = root / "data" / "sample" / split / "ann"
        folder.mkdir(parents=True)
        (folder / "1.jpg").write_bytes(image_bytes())
    ckpt = write_fake_checkpoint(root / "given.pt")
    app = create_app(
        Settings(
            data_dir=root / "data",
            models_dir=root / "models",
            checkpoint=ckpt,
            trainer_cmd=(sys.executable, str(FAKE_TRAINER)),
            poll_interval_s=0.02,
            cancel_grace_s=1.0,
            max_queued_jobs=20,
        ),
        verifier_loader=fake_loader,
    )
    yield schemathesis.openapi.from_asgi("/openapi.json", app)
    from schemathesis.python import asgi

    asgi.shutdown_lifespans()  # stop the runner and its jobs before tmp_path goes


OPERATIONS = [
    "POST /jobs",
    "GET /jobs",
    "GET /jobs/{job_id}",
    "POST /jobs/{job_id}/cancel",
    "POST /jobs/{job_id}/resume",
    "GET /jobs/{job_id}/logs",
    "GET /jobs/{job_id}/roc",
    "GET /model",
    "POST /models/{job_id}/activate",
    "POST /embed",
    "POST /embed/batch",
    "POST /verify",
    "GET /health",
    "GET /data",
    "GET /ready",
    "POST /galleries",
    "GET /galleries",
    "GET /galleries/{gallery}",
    "DELETE /galleries/{gallery}",
    "GET /galleries/{gallery}/people",
    "GET /galleries/{gallery}/people/{person}",
    "DELETE /galleries/{gallery}/people/{person}",
    "POST /galleries/{gallery}/people/{person}/faces",
    "DELETE /galleries/{gallery}/people/{person}/faces/{face_id}",
    "GET /galleries/{gallery}/people/{person}/faces/{face_id}/crop",
    "POST /galleries/{gallery}/embeddings",
    "POST /galleries/{gallery}/identify",
]


def test_no_server_errors(api_schema):
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import response_schema_conformance

    operations = {op.label: op for op in (r.ok() for r in api_schema.get_all_operations())}
    assert sorted(operations) == sorted(OPERATIONS)
    for label in OPERATIONS:
        operation = operations[label]

        @given(case=operation.as_strategy())
        @settings(
            max_examples=25, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
        )
        def check(case):
            case.call_and_validate(checks=[not_a_server_error, response_schema_conformance])

        check()
