"""Inference replicas: more server processes that answer /embed and /verify (FACEID_INFER_REPLICAS).

One server process parses every request's HTTP and multipart body, decodes its image and answers
it under one interpreter lock, and that caps it: on 2 CPU cores 16 clients got about 300 images/s
from it, while two server processes with 8 clients each got about 380 (bench/README.md); on a GPU
one process tops out at 550 to 850 requests/s while the GPU embeds 13,000 images/s. So with
FACEID_INFER_REPLICAS=N the main server starts N replicas that answer /embed, /embed/batch,
/verify, /health and /ready on FACEID_INFER_PORT (FACEID_INFER_HOST, default 127.0.0.1): each has its own
socket on that port (SO_REUSEPORT, so the kernel spreads connections over them), its own
interpreter, batching worker and copy of the model. Everything else (jobs, GET /model,
activation) stays on the main server's port, which still answers /embed and /verify too.

- A replica serves the model the main server serves: it reads the served checkpoint from the job
  database every half second (the job runner's poll interval) and loads a new one before switching to it, as the main
  server does (in flight requests finish on the old one). Until the main server has a model, it
  answers 503 with the same hint.
- The main server supervises them: a replica that exits is started again (after a pause if it
  died within seconds of its start), and they stop with the main server. A replica also stops by
  itself when the main server's process is gone.
- Each replica runs one inference worker on an equal share of the cores (OMP_NUM_THREADS, unless
  set), since the replicas are what runs passes at once. On a host with several GPUs, replicas
  take them in turn (FACEID_DEVICE cuda or auto; cuda:N puts them all on GPU N).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Optional

import anyio
from fastapi import FastAPI

import faceid
from faceid.errors import ConfigError
from faceid.omp import serving_defaults

from app import errors
from app.jobs import describe_exit
from app.middleware import APIKeyMiddleware, BodyLimitMiddleware
from app.paths import usable_cpus
from app.settings import Settings, load_settings

log = logging.getLogger(__name__)

QUICK_DEATH_S = 10.0  # a replica that dies sooner than this after its start is restarted after a pause
RESTART_PAUSE_S = 5.0


def _port_error(host: str, port: int, e: OSError, why: str = "") -> ConfigError:
    return ConfigError(f"the inference replicas cannot listen on {host}:{port} ({e.strerror or e}{why}); give "
                       "FACEID_INFER_PORT a free port (not the main server's), or set FACEID_INFER_REPLICAS=0")


def _check_free(host: str, port: int) -> None:
    """Refuse a port something already listens on, even with SO_REUSEPORT: another FaceID server's
    replicas (same user) could otherwise share it, and clients would get either server's model."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past connections in TIME_WAIT are fine
        try:
            probe.bind((host, port))
        except OSError as e:
            raise _port_error(host, port, e, "; is another server on it?") from None


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    # Handed down to accepted connections on Linux: no Nagle delay (64 ms per request without it)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise _port_error(host, port, e) from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class _Replica:
    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: Optional[subprocess.Popen] = None
        self.started = 0.0
        self.restarts = 0


class ReplicaSupervisor:
    """Starts `settings.infer_replicas` replica processes, restarts those that exit, stops them.

    Each replica gets a socket of its own, bound here and then closed here: while a replica is
    down, the kernel spreads new connections over the others instead of queueing them on a socket
    nobody accepts from."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.n = settings.infer_replicas
        self._replicas: list[_Replica] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None

    def _device(self, index: int) -> str:
        """Replica `index`'s FACEID_DEVICE: on a host with several GPUs, FACEID_DEVICE cuda or auto
        spreads the replicas over them in turn (replica 0 on cuda:0, 1 on cuda:1, ...); a device
        with an index, or cpu, is every replica's."""
        device = self.settings.device
        if device in ("cuda", "auto"):
            import torch

            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if count > 1:
                return f"cuda:{index % count}"
        return device

    def _env(self, index: int) -> dict[str, str]:
        env = dict(os.environ)
        env["FACEID_DEVICE"] = self._device(index)
        root = str(Path(__file__).resolve().parent.parent)  # where the app package is, wherever we run
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["FACEID_REPLICA_PARENT"] = str(os.getpid())
        # The main server's absolute folders, so a replica reads the same job database.
        env["FACEID_MODELS_DIR"], env["FACEID_DATA_DIR"] = str(self.settings.models_dir), str(self.settings.data_dir)
        env.setdefault("OMP_NUM_THREADS", str(max(1, usable_cpus() // max(1, self.n))))
        env["FACEID_INFER_WORKERS"] = "1"  # the replicas are the passes that run at once
        return env

    def _spawn(self, r: _Replica) -> None:
        assert self.settings.infer_port is not None
        sock = _bind(self.settings.infer_host, self.settings.infer_port)
        try:
            fd = sock.fileno()
            # A session of its own: Ctrl-C on the server's terminal reaches the main server only,
            # which then stops the replicas (none is restarted meanwhile).
            env = self._env(r.index)
            r.proc = subprocess.Popen([sys.executable, "-m", "app.replicas", str(fd)], pass_fds=(fd,),
                                      env=env, stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            sock.close()  # the replica holds it now
        r.started = time.monotonic()
        log.info("inference replica %d started (pid %d, device %s) on %s:%s", r.index, r.proc.pid,
                 env["FACEID_DEVICE"], self.settings.infer_host, self.settings.infer_port)

    def start(self) -> None:
        """Start every replica; raises ConfigError when the port cannot be bound (none is left running)."""
        self._replicas = [_Replica(i) for i in range(self.n)]
        assert self.settings.infer_port is not None
        _check_free(self.settings.infer_host, self.settings.infer_port)
        try:
            for r in self._replicas:
                self._spawn(r)
        except ConfigError:
            self.stop()
            raise
        self._thread = threading.Thread(target=self._watch, name="faceid-replicas", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            for r in self._replicas:
                with self._lock:
                    if self._stop.is_set() or r.proc is None or r.proc.poll() is None:
                        continue
                    quick = time.monotonic() - r.started < QUICK_DEATH_S
                    log.error("inference replica %d (pid %d): %s; starting it again%s", r.index, r.proc.pid,
                              describe_exit(r.proc.returncode, "the replica"),
                              f" in {RESTART_PAUSE_S:.0f} s" if quick else "")
                    r.proc = None
                if quick and self._stop.wait(RESTART_PAUSE_S):
                    return
                with self._lock:
                    if self._stop.is_set():
                        return
                    r.restarts += 1
                    try:
                        self._spawn(r)
                    except (ConfigError, OSError) as e:  # tried again on the next round
                        log.error("inference replica %d cannot be started again: %s", r.index, e)

    def describe(self) -> dict[str, Any]:
        with self._lock:
            return {"replicas": self.n, "host": self.settings.infer_host, "port": self.settings.infer_port,
                    "pids": [r.proc.pid for r in self._replicas if r.proc is not None and r.proc.poll() is None],
                    "restarts": sum(r.restarts for r in self._replicas)}

    def stop(self, timeout: float = 15.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            procs = [r.proc for r in self._replicas if r.proc is not None]
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)  # uvicorn finishes the requests in flight
            deadline = time.monotonic() + timeout
            for p in procs:
                try:
                    p.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            for r in self._replicas:
                r.proc = None


# -- the replica's app ---------------------------------------------------------------------------


def create_replica_app(settings: Optional[Settings] = None, *, verifier_loader: Any = None) -> FastAPI:
    """A replica: /embed, /embed/batch, /verify, /health and /ready of the model the main server
    serves (read from the job database in FACEID_MODELS_DIR)."""
    from app.jobs import JobStore
    from app.routes import health, inference
    from app.serving import ModelManager

    serving_defaults()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        s = settings if settings is not None else load_settings()
        store = JobStore(s.db_path)
        manager = ModelManager(s, store, loader=verifier_loader)
        stop = threading.Event()
        parent = int(os.environ.get("FACEID_REPLICA_PARENT") or 0)

        def follow() -> None:
            while not stop.wait(s.poll_interval_s):
                if parent and not _alive(parent):
                    log.error("the main server (pid %d) is gone; this replica stops", parent)
                    os.kill(os.getpid(), signal.SIGTERM)
                    return
                try:
                    manager.follow()
                except Exception:  # noqa: BLE001 - a database hiccup: try again next time
                    log.exception("following the served model failed")

        await anyio.to_thread.run_sync(manager.follow)
        watcher = threading.Thread(target=follow, name="faceid-follow", daemon=True)
        watcher.start()
        app.state.store, app.state.models = store, manager
        app.state.settings = s
        try:
            yield
        finally:
            app.state.settings = None
            stop.set()
            watcher.join(timeout=5)
            manager.close()
            store.close()

    app = FastAPI(title="FaceID inference replica", version=faceid.__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = None
    app.add_middleware(BodyLimitMiddleware, get_settings=lambda: app.state.settings)
    app.add_middleware(APIKeyMiddleware, get_settings=lambda: app.state.settings)
    errors.install(app, routes_hint="this port is an inference replica's (/embed, /embed/batch, /verify, /health, "
                   "/ready); jobs, GET /model, activation and /docs are on the main server's port")
    for module in (inference, health):
        app.include_router(module.router)
    return app


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m app.replicas FD`: a replica on the listening socket FD (the main server starts it)."""
    import uvicorn

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].isdigit():
        print("usage: python -m app.replicas FD (started by the FaceID server with FACEID_INFER_REPLICAS)",
              file=sys.stderr)
        return 2
    sock = socket.socket(fileno=int(args[0]))  # its family and type from the descriptor itself
    config = uvicorn.Config("app.replicas:create_replica_app", factory=True, log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def _alive(parent: int) -> bool:
    """Whether the main server that started this replica still runs: once it is gone the replica
    is re-parented, even if another process later gets the same pid."""
    return os.getppid() == parent


if __name__ == "__main__":
    sys.exit(main())
