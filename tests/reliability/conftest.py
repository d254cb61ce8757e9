"""Fixtures of the reliability tests (docs/RELIABILITY.md): a data root, apps with the fake trainer and the fake
or the real model loader, and a real checkpoint.

No __init__.py here, on purpose (like tests/app): a package named `tests.reliability` is not
wanted, and `app` must stay the service package. The helpers of tests/app (fake trainer, fake
verifier, `running`) and of the core tests (core_fixtures) are imported from their folders.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

HERE = Path(__file__).resolve().parent
for folder in (HERE.parent / "app", HERE.parent):  # service_helpers, fake_trainer; core_fixtures
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from service_helpers import (  # noqa: E402
    fake_loader,
    image_bytes,
    service_settings,
    write_fake_checkpoint,
)

from app.main import create_app  # noqa: E402
from app.settings import Settings  # noqa: E402


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """data/sample/{train,val}/<person>/*.jpg and data/sample/pairs.txt; data/outside is not in it."""
    root = tmp_path / "data"
    for split in ("train", "val"):
        for person in ("ann", "bob"):
            folder = root / "sample" / split / person
            folder.mkdir(parents=True)
            (folder / "1.jpg").write_bytes(image_bytes())
    (root / "sample" / "pairs.txt").write_text("1\t1\n")
    outside = tmp_path / "outside"
    (outside / "eve").mkdir(parents=True)
    (outside / "eve" / "1.jpg").write_bytes(image_bytes(color=(1, 2, 3)))
    (outside / "secret.txt").write_text("secret")
    return root


@pytest.fixture
def make_settings(tmp_path: Path, data_dir: Path) -> Callable[..., Settings]:
    return lambda **changes: service_settings(**{"data_dir": data_dir, "models_dir": tmp_path / "models", **changes})


@pytest.fixture
def make_app(make_settings: Callable[..., Settings]) -> Callable[..., Any]:
    """An app with the fake model loader (no torch)."""

    def make(settings: Settings | None = None, **changes: Any):
        return create_app(settings or make_settings(**changes), verifier_loader=fake_loader)

    return make


@pytest.fixture
def served_app(make_app, tmp_path: Path) -> Callable[..., Any]:
    """An app that serves a fake model from the start."""
    ckpt = write_fake_checkpoint(tmp_path / "given" / "backbone_best.pt")

    def make(**changes: Any):
        return make_app(checkpoint=ckpt, **changes)

    return make


@pytest.fixture(scope="session")
def real_checkpoint(tmp_path_factory) -> Path:
    """A backbone_best.pt of a tiny real faceid run (img_size 32), shared with the core tests'
    run when they are in the same session. Callers get their own copy."""
    from core_fixtures import tiny_arcface_run

    run = tiny_arcface_run(tmp_path_factory)
    return run.best


@pytest.fixture
def real_ckpt_copy(real_checkpoint: Path, tmp_path: Path) -> Callable[[str], Path]:
    def copy(name: str = "good.pt") -> Path:
        dst = tmp_path / "ckpts" / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(real_checkpoint, dst)
        return dst

    return copy


JOB = {"train": "sample/train", "val": "sample/val", "epochs": 2, "img_size": 32}


@pytest.fixture
def job_body() -> dict:
    return dict(JOB)
