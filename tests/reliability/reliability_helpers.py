"""Helpers of the reliability tests: crafted image files, a real uvicorn server process, process
inspection. (Not named conftest/helpers: tests/app's modules share sys.path with these.)"""

from __future__ import annotations

import io
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Optional

import httpx
import numpy as np
from PIL import Image

from app.processes import process_alive as alive  # noqa: F401  (the tests' name for it)

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


# -- images ---------------------------------------------------------------------------------------

QUADRANTS = ((230, 20, 20), (20, 230, 20), (20, 20, 230), (230, 230, 20))


def quadrant_image(size: tuple[int, int] = (64, 48)) -> Image.Image:
    """Four strongly different colour blocks: any rotation or flip changes the 2x2 layout that the
    fake verifier embeds."""
    w, h = size
    arr = np.zeros((h, w, 3), np.uint8)
    arr[: h // 2, : w // 2] = QUADRANTS[0]
    arr[: h // 2, w // 2 :] = QUADRANTS[1]
    arr[h // 2 :, : w // 2] = QUADRANTS[2]
    arr[h // 2 :, w // 2 :] = QUADRANTS[3]
    return Image.fromarray(arr)


def encode(img: Image.Image, fmt: str = "PNG", **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height, with a tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + png_chunk(b"IEND", b"")
    )


def jpeg_bomb(width: int, height: int) -> bytes:
    """A small real JPEG whose SOF0 header is rewritten to declare width x height."""
    data = bytearray(encode(Image.new("RGB", (16, 16), (90, 90, 90)), "JPEG", quality=50))
    i = 2
    while i < len(data):
        marker, length = data[i + 1], struct.unpack(">H", data[i + 2 : i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            data[i + 5 : i + 9] = struct.pack(">HH", height, width)
            return bytes(data)
        i += 2 + length
    raise AssertionError("no SOF marker")


def bmp_bomb(width: int, height: int) -> bytes:
    """A BMP header declaring width x height (24 bit) followed by a few bytes of pixels."""
    header = struct.pack("<2sIHHI", b"BM", 54 + 64, 0, 0, 54)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return header + info + b"\0" * 64


def gif_bomb(width: int, height: int) -> bytes:
    """A GIF (refused format) whose screen descriptor declares width x height."""
    data = bytearray(encode(Image.new("P", (8, 8)), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)
    return bytes(data)


def exif_oriented(img: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", quality=95, exif=exif.tobytes())


def sixteen_bit_png(low: int, high: int, size: tuple[int, int] = (64, 48)) -> bytes:
    """16-bit greyscale: the left half `low`, the right half `high` (0..65535)."""
    w, h = size
    arr = np.full((h, w), low, np.uint16)
    arr[:, w // 2 :] = high
    return encode(Image.fromarray(arr), "PNG")


# -- processes --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class ServerProcess:
    """`python -m uvicorn --factory <factory>` on a free loopback port, its output in a log file.

    The default factory is serve_factory:create_test_app (the real app with the fake model
    loader); app.main:create_app is the production app."""

    def __init__(
        self,
        env: dict[str, str],
        log_path: Path,
        factory: str = "serve_factory:create_test_app",
        user_cmd_prefix: Optional[list[str]] = None,
    ) -> None:
        self.env = env
        self.log_path = log_path
        self.factory = factory
        self.prefix = user_cmd_prefix or []
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: Optional[subprocess.Popen] = None

    def command(self) -> list[str]:
        return [
            *self.prefix,
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            self.factory,
            "--app-dir",
            str(HERE),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-level",
            "warning",
        ]

    def start(self, wait: bool = True, timeout: float = 60) -> "ServerProcess":
        env = {k: v for k, v in os.environ.items() if not k.startswith("FACEID_")}
        env.update(self.env)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        if wait:
            self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert self.proc is not None
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"the server did not start:\n{self.log()[-3000:]}")
            time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.base, timeout=kwargs.pop("timeout", 30), **kwargs)

    def kill(self) -> None:
        """SIGKILL: the server dies without running its shutdown."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self, timeout: float = 30) -> Optional[int]:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode
