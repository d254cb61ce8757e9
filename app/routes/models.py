"""GET /model and POST /models/{job_id}/activate: which model answers /embed and /verify."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from starlette.concurrency import run_in_threadpool

from app.deps import get_models, get_store, job_or_404
from app.model_manager import NO_MODEL, ModelManager, ServedModel
from app.model_schemas import BatchingOut, ModelOut, ReplicasOut
from app.routes.jobs import JOB_ID, NOT_FOUND, UNAUTHORIZED, Responses, error
from app.schemas import iso
from app.store import JobStore
from faceid.metrics import operating_points

router = APIRouter(tags=["models"])

NO_MODEL_ERRORS: Responses = {503: error("no model yet", NO_MODEL)}


def model_out(served: ServedModel, request: Request, models: ModelManager) -> ModelOut:
    """The model's description, with the batching figures and the replicas (as GET /model)."""
    info = served.describe()
    out = ModelOut(
        **{**info, "loaded_at": iso(info["loaded_at"]), "operating_points": operating_points(info["metrics"])}
    )
    out.batching = BatchingOut(**models.batching())
    replicas = getattr(request.app.state, "replicas", None)
    if replicas is not None:
        out.replicas = ReplicasOut(**replicas.describe())
    return out


@router.get(
    "/model", response_model=ModelOut, summary="The served model", responses={**UNAUTHORIZED, **NO_MODEL_ERRORS}
)
def get_model(request: Request, models: ModelManager = Depends(get_models)) -> ModelOut:
    """The model /embed and /verify use: its job, checkpoint, metrics, thresholds, image size;
    how requests have been batched since the server started; the inference replicas, if any."""
    return model_out(models.require(), request, models)


@router.post(
    "/models/{job_id}/activate",
    response_model=ModelOut,
    summary="Serve a finished job's model",
    responses={
        **UNAUTHORIZED,
        **NOT_FOUND,
        409: error("the job has no usable model", "job 3f2b... is running; only a succeeded job has a model to serve"),
    },
)
async def activate(
    request: Request,
    job_id: Annotated[str, JOB_ID],
    pin: Annotated[
        bool, Query(description="keep this model when later jobs succeed (false: the next succeeded job replaces it)")
    ] = True,
    models: ModelManager = Depends(get_models),
    store: JobStore = Depends(get_store),
) -> ModelOut:
    """Loads the job's best checkpoint completely, then switches to it: requests in flight
    finish on the previous model. A checkpoint that cannot be loaded leaves the current model."""
    await run_in_threadpool(job_or_404, store, job_id)
    try:
        served = await run_in_threadpool(models.activate, job_id, pin)
    except KeyError:
        raise HTTPException(404, f"no job {job_id[:64]!r}; GET /jobs lists the jobs") from None
    return model_out(served, request, models)
