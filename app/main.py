"""The FastAPI application: `create_app(settings)`.

Nothing happens at import. `create_app()` builds the routes; its lifespan reads the settings (from
the environment unless given), prepares the models folder, opens the job store, recovers jobs a
dead server left running, loads the served model and starts the job runner, and on shutdown stops
the runner (a running job is interrupted, resumable).

    uvicorn --factory app.main:create_app     # what `faceid serve` runs
    uvicorn app.main:app                      # also works: `app` is built on first access

Run one server process per models folder (a lock file enforces it): the job queue and the runner
live in that process. With FACEID_RUN_JOBS=0 its runner runs no job (`faceid worker` processes do,
app/worker.py) and only watches their heartbeats, and the served model follows the jobs that
succeed in them.
"""

from __future__ import annotations

import fcntl
import logging
import os
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Optional

import anyio
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

import faceid
from app import errors
from app.galleries import GalleryService
from app.middleware import DOCS_PATHS, OPEN_PATHS, APIKeyMiddleware, BodyLimitMiddleware
from app.model_manager import ModelManager, VerifierLoader
from app.replicas import ReplicaSupervisor
from app.routes import data, galleries, health, identify, inference, jobs, models, ui
from app.runner import JobRunner, default_worker_id
from app.settings import Settings, load_settings, prepare_dirs
from app.store import open_job_store
from faceid.errors import ConfigError
from faceid.omp import serving_defaults

log = logging.getLogger("app")

DESCRIPTION = """
Train face-verification models on your own ImageFolder data and serve them.

1. `POST /jobs` with a TrainConfig (paths relative to the data root) -> 202 and a job id.
2. `GET /jobs/{id}` until `status` is `succeeded` (progress, metrics, best epoch, thresholds).
3. `POST /verify` with two images -> similarity, threshold, match. `POST /embed` -> an embedding.

With `FACEID_API_KEY` set, send it in the `X-API-Key` header on every route except `/health`.
Errors are `{"detail": "..."}` with a 4xx status that names the fix.
"""


class _ModelsDirLock:
    """An exclusive lock on MODELS_DIR/server.lock: two servers on one models folder would run
    the same queued jobs twice."""

    def __init__(self, path: os.PathLike) -> None:
        self.path = path
        self.fd: Optional[int] = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ConfigError(
                f"another FaceID server is using the models folder ({self.path}); stop it, "
                "or give this one its own FACEID_MODELS_DIR"
            ) from None
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def create_app(settings: Optional[Settings] = None, *, verifier_loader: Optional[VerifierLoader] = None) -> FastAPI:
    """The app. `settings` default: read from the environment when the app starts.
    `verifier_loader(path, device)` replaces faceid.inference.Verifier.from_checkpoint (tests)."""
    # OpenMP threads that sleep instead of spinning when idle: the server's forward passes share
    # the cores with request parsing, image decoding and a training job (see bench/README.md).
    # torch is imported later (when the lifespan loads a model), so this takes effect; an explicit
    # OMP_WAIT_POLICY or GOMP_SPINCOUNT wins. Training jobs get their own default (faceid/omp.py).
    serving_defaults()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            s = prepare_dirs(settings if settings is not None else load_settings())
        except ConfigError as e:
            log.error("error: %s", e)
            raise
        lock = _ModelsDirLock(s.models_dir / "server.lock")
        lock.acquire()
        try:
            store = open_job_store(s.jobs_database)
        except ConfigError as error:
            lock.release()
            log.error("error: %s", error)
            raise
        manager = ModelManager(s, store, loader=verifier_loader)
        runner = JobRunner(
            store=store,
            jobs_dir=s.jobs_dir,
            trainer_cmd=s.trainer_cmd,
            cancel_grace_s=s.cancel_grace_s,
            poll_interval_s=s.poll_interval_s,
            on_succeeded=manager.on_job_succeeded,
            worker_id=default_worker_id(server=True),
            lease_s=s.worker_lease_s,
        )
        replicas = ReplicaSupervisor(s) if s.infer_replicas else None
        try:
            if s.run_jobs:  # an API-only server leaves the workers' running jobs alone
                await anyio.to_thread.run_sync(runner.recover)
            await anyio.to_thread.run_sync(manager.start)
            runner.start(claim=s.run_jobs)
            manager.watch_jobs()  # jobs that succeeded in a `faceid worker`
            if replicas is not None:  # after the model: they start serving what the database names
                replicas.start()
            app.state.store, app.state.runner, app.state.models = store, runner, manager
            app.state.replicas = replicas
            app.state.galleries = GalleryService(s, manager)  # in s.galleries_database
            await anyio.to_thread.run_sync(app.state.galleries.load)
            app.state.galleries.start()
            app.state.settings = s  # last: the API-key middleware answers 503 until it is set
            log.info(
                "FaceID service ready: data %s, models %s, model %s, API key %s",
                s.data_dir,
                s.models_dir,
                manager.current.id if manager.current else "none",
                "required" if s.api_key else "off",
            )
            yield
        finally:
            app.state.settings = None
            if replicas is not None:
                await anyio.to_thread.run_sync(replicas.stop)
            await anyio.to_thread.run_sync(runner.stop)
            if getattr(app.state, "galleries", None) is not None:
                await app.state.galleries.close()
                app.state.galleries = None
            manager.close()
            store.close()
            lock.release()

    app = FastAPI(title="FaceID", version=faceid.__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = None
    app.add_middleware(BodyLimitMiddleware, get_settings=lambda: app.state.settings)
    # Added last, so it runs first: no body is read for a request without the key.
    app.add_middleware(APIKeyMiddleware, get_settings=lambda: app.state.settings)
    errors.install(app)
    for module in (jobs, data, inference, models, galleries, identify, health, ui):
        app.include_router(module.router)
    ui.mount(app)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            s = app.state.settings
            if s is not None and s.api_key:
                schema.setdefault("components", {})["securitySchemes"] = {
                    "APIKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}
                }
                schema["security"] = [{"APIKey": []}]
                for path in OPEN_PATHS | (DOCS_PATHS if s.public_docs else frozenset()):
                    for op in schema.get("paths", {}).get(path, {}).values():
                        op["security"] = []
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's way to customise the schema
    return app


_app: Optional[FastAPI] = None


def __getattr__(name: str) -> Any:
    """`app.main:app` for `uvicorn app.main:app`: built on first access, not at import."""
    global _app
    if name == "app":
        if _app is None:
            _app = create_app()
        return _app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
