"""An inference server: the app that answers /embed, /embed/batch, /verify, galleries' identify,
/health and /ready with the model the main (API) server serves, as the job database says, and
the galleries as galleries.db holds them (read only: app.galleries.GalleryFollower). It runs two
ways:

- as a replica (app/replicas.py starts and supervises it), with the uvicorn server below serving
  the connections the main server hands it down a Unix socket:

      python -m app.replica_app FD      # FD: that socket; the main server starts it so

- on its own, with `FACEID_ROLE=inference faceid serve --port P`: any number of them, on this host
  or others that see the same models folder, behind any HTTP load balancer.

- It serves the model the job database says the main server serves, read every half second (the
  job runner's poll interval) and loaded before it switches (in flight requests finish on the old
  one); until the main server has a model, it answers 503 with the same hint.
- It stops by itself when the main server's process is gone.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import socket
import sys
import threading
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Optional, cast

import anyio
from fastapi import FastAPI

import faceid
from app import errors
from app.galleries import GalleryFollower
from app.middleware import APIKeyMiddleware, BodyLimitMiddleware
from app.model_manager import ModelManager
from app.routes import health, identify, inference
from app.settings import Settings, load_settings
from app.store import open_job_store
from faceid.omp import serving_defaults

log = logging.getLogger(__name__)


def create_replica_app(settings: Optional[Settings] = None, *, verifier_loader: Any = None) -> FastAPI:
    """A replica: /embed, /embed/batch, /verify, /health and /ready of the model the main server
    serves (read from the job database in FACEID_MODELS_DIR)."""
    serving_defaults()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        s = settings if settings is not None else load_settings()
        store = open_job_store(s.jobs_database)
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
                except Exception:
                    log.exception("following the served model failed")

        await anyio.to_thread.run_sync(manager.follow)
        watcher = threading.Thread(target=follow, name="faceid-follow", daemon=True)
        watcher.start()
        galleries = GalleryFollower(s, manager)  # read only: the API server enrols and re-embeds
        await anyio.to_thread.run_sync(galleries.load)
        galleries.start()
        app.state.store, app.state.models, app.state.galleries = store, manager, galleries
        app.state.settings = s
        try:
            yield
        finally:
            app.state.settings = None
            stop.set()
            watcher.join(timeout=5)
            await galleries.close()
            app.state.galleries = None
            manager.close()
            store.close()

    app = FastAPI(
        title="FaceID inference replica",
        version=faceid.__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.settings = None
    app.add_middleware(BodyLimitMiddleware, get_settings=lambda: app.state.settings)
    app.add_middleware(APIKeyMiddleware, get_settings=lambda: app.state.settings)
    errors.install(
        app,
        routes_hint="this is an inference server (/embed, /embed/batch, /verify, /galleries/{g}/identify, "
        "/health, /ready); jobs, GET /model, the rest of galleries, activation and /docs are on the main server",
    )
    for module in (inference, identify, health):
        app.include_router(module.router)
    return app


def _replica_server_class() -> type:
    import uvicorn

    class ReplicaServer(uvicorn.Server):
        """uvicorn serving the connections the main server hands down `channel` (a Unix socket: one
        byte and one descriptor per accepted connection) instead of a listening socket of its own.
        Each becomes a connection of uvicorn's own HTTP protocol, so keep-alive, limits and the
        graceful stop (requests in flight finish) are uvicorn's. The channel's end (the main
        server gone) stops the replica."""

        def __init__(self, config: "uvicorn.Config", channel: socket.socket) -> None:
            super().__init__(config)
            self.channel = channel

        async def startup(self, sockets: Optional[list] = None) -> None:
            await super().startup(sockets=[])  # the app's lifespan (the model loaded); no listener
            if self.should_exit:
                return
            try:
                self.channel.send(b"r")  # ready: the main server hands connections to replicas that are
            except OSError:
                self.should_exit = True  # the main server is gone
                return
            loop = asyncio.get_running_loop()
            config = self.config
            # uvicorn types it as a bare asyncio.Protocol class; its HTTP protocols take these arguments
            protocol_class = cast("Callable[..., asyncio.Protocol]", config.http_protocol_class)
            self._protocol = functools.partial(
                protocol_class, config=config, server_state=self.server_state, app_state=self.lifespan.state
            )
            self.channel.setblocking(False)
            loop.add_reader(self.channel.fileno(), self._receive, loop)

        def _receive(self, loop: asyncio.AbstractEventLoop) -> None:
            while True:
                try:
                    data, fds, _, _ = socket.recv_fds(self.channel, 16, 16)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as e:
                    data, fds = b"", []
                    log.error("the main server's channel failed: %s", e)
                if not data and not fds:  # the main server closed its end: it stops, so does this replica
                    loop.remove_reader(self.channel.fileno())
                    self.should_exit = True
                    return
                for fd in fds:
                    os.set_inheritable(fd, False)  # a process this one starts must not hold a client open
                    conn = socket.socket(fileno=fd)
                    conn.setblocking(False)
                    loop.create_task(self._adopt(loop, conn))

        async def _adopt(self, loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
            try:
                await loop.connect_accepted_socket(self._protocol, conn)
            except OSError as e:  # the client left before it was adopted
                log.debug("a handed connection could not be served: %s", e)
                conn.close()

        async def shutdown(self, sockets: Optional[list] = None) -> None:
            if self.channel.fileno() >= 0:
                try:
                    asyncio.get_running_loop().remove_reader(self.channel.fileno())
                except (ValueError, OSError):
                    pass
            await super().shutdown(sockets=sockets)
            self.channel.close()

    return ReplicaServer


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m app.replica_app FD`: a replica fed the connections the main server accepts on the
    replicas' port, down the Unix socket FD (the main server starts it)."""
    import uvicorn

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].isdigit():
        print(
            "usage: python -m app.replica_app FD (started by the FaceID server with FACEID_INFER_REPLICAS)",
            file=sys.stderr,
        )
        return 2
    channel = socket.socket(fileno=int(args[0]))  # its family and type from the descriptor itself
    channel.set_inheritable(False)
    config = uvicorn.Config("app.replica_app:create_replica_app", factory=True, log_level="warning", access_log=False)
    _replica_server_class()(config, channel).run()
    return 0


def _alive(parent: int) -> bool:
    """Whether the main server that started this replica still runs: once it is gone the replica
    is re-parented, even if another process later gets the same pid."""
    return os.getppid() == parent


if __name__ == "__main__":
    sys.exit(main())
