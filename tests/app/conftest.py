"""Fixtures for the service tests: a data root, settings that point at the fake trainer, apps."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
from service_helpers import fake_loader, image_bytes, service_settings

from app.main import create_app
from app.settings import Settings


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """data/{train,val}/<person>/*.jpg, data/pairs.txt, and data/escape -> a folder outside."""
    root = tmp_path / "data"
    for split in ("train", "val"):
        for person in ("ann", "bob"):
            folder = root / "sample" / split / person
            folder.mkdir(parents=True)
            (folder / "1.jpg").write_bytes(image_bytes())
    (root / "sample" / "pairs.txt").write_text("1\t1\n")
    outside = tmp_path / "outside"
    (outside / "person").mkdir(parents=True)
    (root / "escape").symlink_to(outside, target_is_directory=True)
    (root / "escape_file.txt").symlink_to(tmp_path / "secret.txt")
    (tmp_path / "secret.txt").write_text("secret")
    return root


@pytest.fixture
def make_settings(tmp_path: Path, data_dir: Path) -> Callable[..., Settings]:
    return lambda **changes: service_settings(**{"data_dir": data_dir, "models_dir": tmp_path / "models", **changes})


@pytest.fixture
def make_app(make_settings: Callable[..., Settings]) -> Callable[..., Any]:
    def make(settings: Settings | None = None, **changes: Any):
        return create_app(settings or make_settings(**changes), verifier_loader=fake_loader)

    return make


JOB = {"train": "sample/train", "val": "sample/val", "epochs": 2, "img_size": 32}


@pytest.fixture
def job_body() -> dict:
    return dict(JOB)
