"""FastAPI dependencies: the objects the lifespan put on app.state. Tests can replace any of them
with app.dependency_overrides.

They are `async def` because they only read app.state: FastAPI runs a plain `def` dependency in
its thread pool, a thread hop per dependency per request for nothing (the server's CPU time per
/embed did not change measurably either way; the hop is latency, not work)."""

from __future__ import annotations

from fastapi import HTTPException, Request

from app.model_manager import ModelManager
from app.runner import JobRunner
from app.settings import Settings
from app.store import JobStore, is_job_id


def _state(request: Request, name: str):
    value = getattr(request.app.state, name, None)
    if value is None:
        raise HTTPException(503, "the service is starting; retry in a moment")
    return value


async def get_settings(request: Request) -> Settings:
    return _state(request, "settings")


async def get_store(request: Request) -> JobStore:
    return _state(request, "store")


async def get_runner(request: Request) -> JobRunner:
    return _state(request, "runner")


async def get_models(request: Request) -> ModelManager:
    return _state(request, "models")


def job_or_404(store: JobStore, job_id: str) -> dict:
    job = store.get(job_id) if is_job_id(job_id) else None
    if job is None:
        raise HTTPException(404, f"no job {job_id[:64]!r}; GET /jobs lists the jobs")
    return job
