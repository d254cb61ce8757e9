"""GET /health (the process answers) and GET /ready (a model is loaded)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

import faceid
from app.model_manager import NO_MODEL
from app.schemas import HealthOut, ReadyOut

router = APIRouter(tags=["health"])


@router.get("/health", response_model=HealthOut, summary="Liveness: the server answers")
async def health() -> HealthOut:
    """Always open, even with FACEID_API_KEY set; does no work."""
    return HealthOut(version=faceid.__version__)


@router.get(
    "/ready",
    response_model=ReadyOut,
    summary="Readiness: a model is loaded",
    responses={
        503: {
            "model": ReadyOut,
            "description": "no model yet",
            "content": {"application/json": {"example": {"ready": False, "model": None, "detail": NO_MODEL}}},
        }
    },
)
async def ready(request: Request):
    """200 when /embed and /verify can answer, 503 (with the reason) before."""
    models = getattr(request.app.state, "models", None)
    served = models.current if models is not None else None
    if served is None:
        detail = "the service is starting"
        if models is not None:
            try:
                models.require()
            except Exception as e:  # ModelNotReadyError: its message says how to get a model
                detail = str(e)
        return JSONResponse(
            ReadyOut(ready=False, detail=detail).model_dump(), status_code=503, headers={"Retry-After": "60"}
        )
    return ReadyOut(ready=True, model=served.id)
