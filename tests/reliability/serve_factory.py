"""The production app with the tests' fake model loader, for a real uvicorn process:

    python -m uvicorn --factory serve_factory:create_test_app --app-dir tests/reliability

Settings come from the environment (FACEID_*), as in production; checkpoints are the fake
trainer's JSON files, so no torch is imported and the server starts in a second or two.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "app"))

from service_helpers import fake_loader

from app.main import create_app


def create_test_app():
    return create_app(verifier_loader=fake_loader)
