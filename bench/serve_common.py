"""Shared pieces of the serving benchmarks (bench/load_test.py, bench/serve_throughput.py): a
checkpoint to serve, a real uvicorn server process, concurrent httpx clients, figures.

Not a benchmark itself. The server is the production app (`uvicorn --factory
app.main:create_app`) on a free loopback port with a temporary models folder; it serves the
checkpoint given with --checkpoint, or one trained here in a few seconds (the sample, 1 epoch of 2
steps: its weights are barely trained, which does not matter for speed or memory).
"""

from __future__ import annotations

import asyncio
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

import httpx

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample"
CACHE = Path(tempfile.gettempdir()) / "faceid-bench"


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}, {cores} cores usable"


def rss_mb(pid: int) -> float:
    """Resident memory of `pid` (VmRSS of /proc/<pid>/status), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, int(round(q / 100 * (len(s) - 1)))))
    return s[k]


def sample_images(n: int) -> list[tuple[str, bytes]]:
    files = sorted((SAMPLE / "val").glob("*/*.jpg"))[:n]
    if not files:
        raise SystemExit(f"no images under {SAMPLE / 'val'}")
    return [(f.name, f.read_bytes()) for f in files]


def pythonpath() -> str:
    """PYTHONPATH for a child process: this checkout first, then whatever this process was given
    (bench/gpu_check.sh installs the service's packages into a folder named there)."""
    return os.pathsep.join([str(REPO), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]])


def ensure_checkpoint(given: Optional[str], img_size: int) -> Path:
    """--checkpoint, else a cached quick one for this img_size, else train it now (printing how
    long it took)."""
    if given:
        path = Path(given)
        if not path.is_file():
            raise SystemExit(f"--checkpoint {given}: no such file")
        return path
    out = CACHE / f"ckpt_{img_size}"
    best = out / "backbone_best.pt"
    if best.is_file():
        print(f"checkpoint: {best} (cached; delete it or pass --checkpoint to change)", flush=True)
        return best
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cmd = [
        sys.executable,
        "-m",
        "faceid.train",
        "--train",
        str(SAMPLE / "train"),
        "--val",
        str(SAMPLE / "val"),
        "--ckpt_dir",
        str(out),
        "--train_mode",
        "arcface",
        "--epochs",
        "1",
        "--img_size",
        str(img_size),
        "--batch_size",
        "16",
        "--max_steps_per_epoch",
        "2",
        "--eval_pairs",
        "200",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--quiet",
    ]
    print(f"checkpoint: training a quick one at {img_size} px into {out} ...", flush=True)
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": pythonpath()})
    if r.returncode != 0 or not best.is_file():
        raise SystemExit(f"training the checkpoint failed:\n{r.stderr[-3000:]}")
    print(f"checkpoint: trained in {time.monotonic() - t0:.0f} s", flush=True)
    return best


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The production app under uvicorn, serving `checkpoint`; `with Server(...) as s:`."""

    def __init__(
        self,
        checkpoint: Optional[Path],
        *,
        device: str = "cpu",
        env: Optional[dict[str, str]] = None,
        unset: tuple[str, ...] = (),
        data_dir: Optional[Path] = None,
        replicas: int = 0,
    ) -> None:
        self.checkpoint = checkpoint  # None: serve nothing at start (a job will make the model)
        self.data_dir = data_dir or REPO / "data"
        self.device = device
        self.extra = env or {}
        self.unset = unset
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}"  # every route (jobs, GET /model, ...)
        # With replicas (FACEID_INFER_REPLICAS), /embed and /verify go to their port; else the main one
        self.replicas = replicas
        self.infer_port = free_port() if replicas else self.port
        self.base = f"http://127.0.0.1:{self.infer_port}"
        self.replica_pids: list[int] = []
        self.tmp = Path(tempfile.mkdtemp(prefix="faceid-bench-server-"))
        self.log_path = self.tmp / "server.log"
        self.proc: Optional[subprocess.Popen] = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def pids(self) -> list[int]:
        """The main server's process and its inference replicas' (as they were at start)."""
        return [self.pid, *self.replica_pids]

    def __enter__(self) -> "Server":
        env = {k: v for k, v in os.environ.items() if not k.startswith("FACEID_") and k not in self.unset}
        env.update(
            {
                "FACEID_MODELS_DIR": str(self.tmp / "models"),
                "FACEID_DATA_DIR": str(self.data_dir),
                "FACEID_DEVICE": self.device,
                "PYTHONPATH": pythonpath(),
                **self.extra,
            }
        )
        if self.checkpoint is not None:
            env["FACEID_CHECKPOINT"] = str(self.checkpoint)
        if self.replicas:
            env.update(FACEID_INFER_REPLICAS=str(self.replicas), FACEID_INFER_PORT=str(self.infer_port))
        cmd = [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "app.main:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-level",
            "warning",
            "--no-access-log",
        ]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while True:
            try:
                r = httpx.get(self.api + ("/ready" if self.checkpoint is not None else "/health"), timeout=5)
                if r.status_code == 200 and self.replicas and self.checkpoint is not None:
                    r = httpx.get(self.base + "/ready", timeout=5)  # the replicas have loaded the model too
                if r.status_code == 200:
                    if not self.replicas:
                        return self
                    m = httpx.get(self.api + "/model", timeout=5)
                    info = (m.json().get("replicas") or {}) if m.status_code == 200 else {}
                    if info.get("ready", self.replicas) >= self.replicas:  # all of them get connections
                        self.replica_pids = info.get("pids", [])
                        return self
                if "cannot" in r.text or "failed" in r.text:
                    self.__exit__()
                    raise SystemExit(f"the server cannot serve {self.checkpoint}: {r.text}")
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise SystemExit(f"the server did not become ready:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.2)

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)


def cpu_seconds(pid: "int | list[int]", thread_prefix: str = "faceid-embed") -> tuple[float, float]:
    """(CPU seconds of process `pid`, of which in its threads whose OS name starts with
    `thread_prefix`), from /proc (Linux): the server's forward-pass thread and the OpenMP threads it
    started carry that name (app.batcher), so the rest is HTTP, parsing, decoding and answering.
    A list of pids: their sums (a server and its inference replicas)."""
    if isinstance(pid, list):
        parts = [cpu_seconds(p, thread_prefix) for p in pid]
        return sum(t for t, _ in parts), sum(n for _, n in parts)
    tick = os.sysconf("SC_CLK_TCK")

    def stat(path: Path) -> tuple[str, float]:
        text = path.read_text()
        name, fields = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :].split()
        return name, (int(fields[11]) + int(fields[12])) / tick  # utime, stime

    total = stat(Path(f"/proc/{pid}/stat"))[1]
    named = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name, t = stat(task / "stat")
        except (FileNotFoundError, ProcessLookupError):  # the thread ended meanwhile
            continue
        named += t if name.startswith(thread_prefix) else 0.0
    return total, named


def cpu_ticks() -> tuple[int, int]:
    """(all CPU ticks, stolen ticks) of the machine so far, from /proc/stat's first line; (0, 0)
    where there is none. Steal is the time the hypervisor ran something else while this VM had
    work: a block measured while it was high ran on a slower machine."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return 0, 0
    return sum(fields[:8]), (fields[7] if len(fields) > 7 else 0)


def steal_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    """Share of the CPU time between two `cpu_ticks()` that was stolen (nan without /proc/stat)."""
    total = after[0] - before[0]
    return (after[1] - before[1]) / total if total > 0 else float("nan")


async def run_clients(
    n: int, seconds: float, one: Callable[[httpx.AsyncClient, int, int], Awaitable[Any]], client: httpx.AsyncClient
) -> float:
    """`n` tasks calling `one(client, task, i)` back to back for `seconds`; returns the wall time."""
    stop_at = time.perf_counter() + seconds

    async def worker(task: int) -> None:
        i = 0
        while time.perf_counter() < stop_at:
            await one(client, task, i)
            i += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(t) for t in range(n)))
    return time.perf_counter() - t0


def async_client(base: str, connections: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=base,
        timeout=60,
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
    )


class RawClient:
    """A lean HTTP/1.1 keep-alive client for load generation: one asyncio stream per task, each
    request's bytes built once, the response read by its Content-Length. It exists because the
    clients share the machine with the server: httpx spent about 3 ms of CPU per /embed request
    here, as much as the server's own HTTP and decoding work, which the benchmark would otherwise
    count against the server. Answers are still checked (status and the JSON body)."""

    def __init__(self, base: str) -> None:
        host_port = base.split("://", 1)[1].rstrip("/")
        self.host, port = host_port.rsplit(":", 1)
        self.port = int(port)
        self._streams: dict[int, tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}
        self.heads: dict[int, bytes] = {}  # the last response head of each task

    @staticmethod
    def multipart(
        path: str, files: "dict[str, tuple[str, bytes, str]] | list[tuple[str, tuple[str, bytes, str]]]", host: str
    ) -> bytes:
        """The request's bytes; `files` as {field: (filename, data, type)}, or a list of
        (field, (filename, data, type)) to send a field more than once."""
        boundary = "faceidbenchboundary7d1c"
        body = b""
        for field, (name, data, ctype) in files.items() if isinstance(files, dict) else files:
            body += (
                (
                    f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
                    f"Content-Type: {ctype}\r\n\r\n"
                ).encode()
                + data
                + b"\r\n"
            )
        body += f"--{boundary}--\r\n".encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        return head + body

    async def send(self, task: int, request: bytes) -> tuple[int, bytes]:
        """Send prepared `request` bytes on task `task`'s connection; (status, body)."""
        if task not in self._streams:
            self._streams[task] = await asyncio.open_connection(self.host, self.port)
        reader, writer = self._streams[task]
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        self.heads[task] = head
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        return status, await reader.readexactly(length)

    def server_timing(self, task: int) -> dict[str, float]:
        """The `Server-Timing` header of task `task`'s last response as {name: milliseconds}."""
        for line in self.heads.get(task, b"").split(b"\r\n")[1:]:
            if line[:14].lower() == b"server-timing:":
                out = {}
                for part in line[14:].decode().split(","):
                    name, *params = part.strip().split(";")
                    for prm in params:
                        if prm.startswith("dur="):
                            out[name] = float(prm[4:])
                return out
        return {}

    async def close(self) -> None:
        for _, writer in self._streams.values():
            writer.close()
        self._streams.clear()
