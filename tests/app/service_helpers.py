"""Fakes and helpers for the service tests: a torch-free verifier, image bytes, polling."""

from __future__ import annotations

import io
import json
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Optional

import anyio
import httpx
import numpy as np
from PIL import Image

from app.settings import Settings
from faceid.errors import CheckpointError, ConfigError

FAKE_TRAINER = Path(__file__).with_name("fake_trainer.py")
sys.path.insert(0, str(FAKE_TRAINER.parent))
import fake_trainer  # noqa: E402  (the seed constants)

MODE = fake_trainer


class FakeVerifier:
    """Reads the fake trainer's JSON "checkpoints"; embeds an image as its 2x2 colour layout.
    `forward_s`: how long each forward pass takes (0: instant)."""

    forward_s = 0.0

    def __init__(self, path: Path) -> None:
        try:
            ck = json.loads(Path(path).read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            raise CheckpointError(f"cannot read checkpoint {path}: it is corrupt or missing") from None
        if not isinstance(ck, dict) or ck.get("format") != "fake":
            raise CheckpointError(f"{path} is not a FaceID checkpoint")
        self.path = str(path)
        self.ck = ck
        self.thresholds = dict(ck["thresholds"])
        self.calls: list[int] = []

    @property
    def info(self) -> dict[str, Any]:
        return {
            "checkpoint": self.path,
            "epoch": self.ck["epoch"],
            "metrics": self.ck["metrics"],
            "thresholds": self.thresholds,
            "img_size": self.ck["img_size"],
            "embedding_size": self.ck["embedding_size"],
            "arch": "fake",
            "train_mode": "arcface",
            "config": {},
        }

    def embed(self, images: list) -> np.ndarray:
        self.calls.append(len(images))
        if self.forward_s:
            time.sleep(self.forward_s)
        out = []
        for im in images:
            v = np.asarray(im.convert("RGB").resize((2, 2)), dtype=np.float32).reshape(-1) - 127.5
            out.append(v / (np.linalg.norm(v) + 1e-6))
        return np.stack(out).astype(np.float32)

    def resolve_threshold(self, threshold: Any) -> tuple[float, str]:
        if threshold is None:
            threshold = "acc"
        if isinstance(threshold, str):
            if threshold not in self.thresholds:
                raise ConfigError(f"unknown threshold {threshold!r}")
            return self.thresholds[threshold], threshold
        return float(threshold), "custom"

    def compare(self, e1: np.ndarray, e2: np.ndarray, threshold: Any = None) -> dict[str, Any]:
        th, name = self.resolve_threshold(threshold)
        sim = float(np.clip(np.dot(e1, e2), -1.0, 1.0))
        return {"similarity": sim, "threshold": th, "threshold_name": name, "match": sim >= th}


def service_settings(**fields: Any) -> Settings:
    """Settings for an app under test: the fake trainer, short grace and poll times; `fields`
    (data_dir, models_dir, anything else) override."""
    base = Settings(
        trainer_cmd=(sys.executable, str(FAKE_TRAINER)), cancel_grace_s=2.0, poll_interval_s=0.02, batch_wait_ms=1.0
    )
    return base.model_copy(update=fields)


def fake_loader(path: Path, device: str) -> FakeVerifier:
    return FakeVerifier(path)


def write_fake_checkpoint(path: Path, epoch: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {
                "format": "fake",
                "epoch": epoch,
                "embedding_size": 12,
                "img_size": 32,
                "thresholds": {"acc": 0.5, "far_1e-2": 0.8, "far_1e-3": 0.9},
                "metrics": {"acc": 0.7},
            }
        )
    )
    return path


def image_bytes(
    fmt: str = "JPEG", size: tuple[int, int] = (64, 64), color: Any = (200, 30, 40), mode: str = "RGB"
) -> bytes:
    img = Image.new(mode, size, color)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def face_like(seed: int, size: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@asynccontextmanager
async def running(app) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan running, and an httpx client talking to it in process."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://faceid.test") as client:
            yield client


async def wait_job(
    client: httpx.AsyncClient,
    job_id: str,
    until: tuple[str, ...] = ("succeeded", "failed", "cancelled", "interrupted"),
    timeout: float = 20.0,
    headers: Optional[dict] = None,
) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        r = await client.get(f"/jobs/{job_id}", headers=headers)
        assert r.status_code == 200, r.text
        job = r.json()
        if job["status"] in until:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {job['status']} after {timeout} s: {job}")
        await anyio.sleep(0.05)


async def wait_for(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await anyio.sleep(0.05)


def person_image(seed: int, noise: float = 0.0, noise_seed: int = 0) -> bytes:
    """A 'photo' of person `seed`: their own 2x2 colour layout, blown up to 64x64; `noise` shifts
    each cell a little (another photo of the same person)."""
    cells = np.random.default_rng(seed).integers(20, 236, (2, 2, 3)).astype(np.float32)
    if noise:
        cells += np.random.default_rng(1000 + noise_seed).normal(0, noise, cells.shape)
    img = Image.fromarray(np.clip(cells, 0, 255).astype(np.uint8)).resize((64, 64), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
