"""A real FaceID server for end-to-end tests: `uvicorn --factory app.main:create_app` on a free
loopback port, the repository's data root, a temporary models folder, the real trainer."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def real_server(models: Path, **settings: str) -> Iterator[tuple[str, subprocess.Popen, Path]]:
    """(base URL, process, log file) of a server started for the block; FACEID_* settings given
    as keyword arguments (data_dir=..., api_key=...), the rest from the defaults."""
    log_path = models / "server.log"
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FACEID_")}
    env.update(
        FACEID_DATA_DIR=str(REPO / "data"),
        FACEID_MODELS_DIR=str(models),
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    env.update({f"FACEID_{k.upper()}": v for k, v in settings.items()})
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--factory",
                "app.main:create_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the server did not start:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)
    try:
        yield base, proc, log_path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
