"""Training jobs: submit, list, inspect, cancel, resume, read the output.

Routes are plain `def`: FastAPI runs them on its thread pool, so the SQLite and file-system work
here never blocks the event loop.
"""

from __future__ import annotations

from typing import Annotated, Any, Optional, Union

from fastapi import APIRouter, Body, Depends, HTTPException, Path, Query, Response

from app.deps import get_runner, get_settings, get_store, job_or_404
from app.paths import base_checkpoint, job_config
from app.processes import tail_lines
from app.runner import JobRunner
from app.schemas import ErrorOut, JobList, JobLogs, JobOut, JobStatus, RocOut
from app.settings import Settings
from app.store import RESUMABLE, JobStateError, JobStore, is_job_id, new_job_id
from faceid.config import TrainConfig
from faceid.teacher_files import check_teacher

router = APIRouter(tags=["jobs"])

JOB_ID = Path(description="the job id returned by POST /jobs", examples=["3f2b9c0e5d8a4e1f9a7b6c5d4e3f2a1b"])


# FastAPI's `responses=`: status code (or "default") -> the OpenAPI description of that response
Responses = dict[Union[int, str], dict[str, Any]]


def error(description: str, example: str) -> dict[str, Any]:
    return {
        "model": ErrorOut,
        "description": description,
        "content": {"application/json": {"example": {"detail": example}}},
    }


NOT_FOUND: Responses = {404: error("no such job", "no job 'abc'; GET /jobs lists the jobs")}
UNAUTHORIZED: Responses = {
    401: error(
        "FACEID_API_KEY is set and X-API-Key is missing or wrong", "missing API key: send it in the X-API-Key header"
    )
}

SAMPLE_JOB = {
    "preset": "cpu-small",
    "train": "sample/train",
    "val": "sample/val",
    "pairs_file": "sample/pairs.txt",
    "epochs": 2,
    "img_size": 64,
}
JOB_EXAMPLES = {
    "cpu-small": {"summary": "ArcFace from scratch on the shipped sample, on a CPU", "value": SAMPLE_JOB},
    "pretrained": {
        "summary": "the origin's recommended recipe (GPU)",
        "value": {
            "train_mode": "arcface",
            "pretrained": True,
            "freeze_backbone_epochs": 2,
            "epochs": 30,
            "scheduler": "cosine",
            "warmup_epochs": 3,
            "backbone_lr_scale": 0.1,
            "clip_grad_norm": 1.0,
            "arcface_s": 64,
            "arcface_m": 0.5,
            "train": "lfw/train",
            "val": "lfw/val",
        },
    },
}


@router.post(
    "/jobs",
    status_code=202,
    response_model=JobOut,
    summary="Submit a training job",
    responses={
        202: {
            "description": "queued; the Location header is the job's URL",
            "headers": {"Location": {"description": "/jobs/{id}", "schema": {"type": "string"}}},
        },
        **UNAUTHORIZED,
        413: error("body over 1 MB", "the request body is over the limit of 1048576 bytes for this route"),
        422: error(
            "invalid config or a path outside the data root",
            "train: 'sample/trian' does not exist in the data root; paths are relative to /srv/data",
        ),
        429: error(
            "too many queued jobs",
            "100 jobs are already queued (the limit is 100); wait for some to finish or cancel some",
        ),
    },
)
def submit_job(
    response: Response,
    cfg: Annotated[TrainConfig, Body(openapi_examples=JOB_EXAMPLES)],
    settings: Settings = Depends(get_settings),
    store: JobStore = Depends(get_store),
    runner: JobRunner = Depends(get_runner),
) -> JobOut:
    """The body is a TrainConfig: the same fields and defaults as `faceid train`. `train`, `val`,
    `pairs_file` and `pretrained_weights` are paths relative to the data root (FACEID_DATA_DIR);
    `init_from` is the id of a succeeded job whose model the new one fine-tunes;
    `ckpt_dir` and `resume` are managed by the service. Jobs run one at a time, in order."""
    check_teacher(cfg.distill)  # a teacher this installation lacks: 422 naming the install
    job_id = new_job_id()
    base = None
    if cfg.init_from is not None:
        cfg, base = base_checkpoint(cfg, store.get(cfg.init_from) if is_job_id(cfg.init_from) else None)
    config = job_config(
        cfg,
        data_dir=settings.data_dir,
        models_dir=settings.models_dir,
        job_dir=settings.jobs_dir / job_id,
        init_from=base,
    )
    job = store.create(job_id, config, settings.max_queued_jobs)
    runner.wake()
    response.headers["Location"] = f"/jobs/{job_id}"
    return JobOut.from_job(job)


@router.get("/jobs", response_model=JobList, summary="List jobs, newest first", responses={**UNAUTHORIZED})
def list_jobs(
    status: Annotated[Optional[JobStatus], Query(description="only jobs in this state")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
    store: JobStore = Depends(get_store),
) -> JobList:
    jobs, total = store.list(status=status, limit=limit, offset=offset)
    return JobList(jobs=[JobOut.from_job(j) for j in jobs], total=total, limit=limit, offset=offset)


@router.get(
    "/jobs/{job_id}",
    response_model=JobOut,
    summary="A job: status, progress, metrics, best, error",
    responses={**UNAUTHORIZED, **NOT_FOUND},
)
def get_job(job_id: Annotated[str, JOB_ID], store: JobStore = Depends(get_store)) -> JobOut:
    """Updated while the job runs, at least every `progress_step_pct` of an epoch."""
    return JobOut.from_job(job_or_404(store, job_id))


@router.post(
    "/jobs/{job_id}/cancel",
    response_model=JobOut,
    summary="Cancel a queued or running job",
    responses={
        200: {"description": "the job was queued and is now cancelled"},
        202: {
            "description": "the job is running: its process got SIGTERM (SIGKILL after "
            "FACEID_CANCEL_GRACE_S); the status becomes cancelled when it exits"
        },
        **UNAUTHORIZED,
        **NOT_FOUND,
        409: error("the job already ended", "job 3f2b... is succeeded; only queued or running jobs can be cancelled"),
    },
)
def cancel_job(
    job_id: Annotated[str, JOB_ID],
    response: Response,
    store: JobStore = Depends(get_store),
    runner: JobRunner = Depends(get_runner),
) -> JobOut:
    job_or_404(store, job_id)
    outcome = runner.cancel(job_id)
    response.status_code = 200 if outcome == "cancelled" else 202
    return JobOut.from_job(job_or_404(store, job_id))


@router.post(
    "/jobs/{job_id}/resume",
    status_code=202,
    response_model=JobOut,
    summary="Resume a job from its last.pt",
    responses={
        **UNAUTHORIZED,
        **NOT_FOUND,
        409: error(
            "not resumable",
            "job 3f2b... has no last.pt to resume from (it stopped before "
            "its first epoch ended); submit it again with POST /jobs",
        ),
        429: error("too many queued jobs", "100 jobs are already queued (the limit is 100)"),
    },
)
def resume_job(
    job_id: Annotated[str, JOB_ID],
    settings: Settings = Depends(get_settings),
    store: JobStore = Depends(get_store),
    runner: JobRunner = Depends(get_runner),
) -> JobOut:
    """An interrupted (the server stopped while it ran), failed or cancelled job goes back into
    the queue and continues from the last finished epoch, in the same folder."""
    job = job_or_404(store, job_id)
    if job["status"] not in RESUMABLE:
        raise JobStateError(
            f"job {job_id} is {job['status']}; only an interrupted, failed or cancelled job can be resumed"
        )
    last = runner.job_dir(job_id) / "last.pt"
    if not last.is_file():
        raise JobStateError(
            f"job {job_id} has no last.pt to resume from (it stopped before its first "
            "epoch ended); submit it again with POST /jobs"
        )
    if not store.requeue(job_id, {**job["config"], "resume": str(last)}, settings.max_queued_jobs):
        raise JobStateError(f"job {job_id} changed state meanwhile; GET /jobs/{job_id} and retry")
    runner.wake()
    return JobOut.from_job(job_or_404(store, job_id))


@router.get(
    "/jobs/{job_id}/logs",
    response_model=JobLogs,
    summary="The tail of a job's output",
    responses={**UNAUTHORIZED, **NOT_FOUND},
)
def job_logs(
    job_id: Annotated[str, JOB_ID],
    tail: Annotated[int, Query(ge=1, le=10_000, description="how many lines")] = 200,
    store: JobStore = Depends(get_store),
    runner: JobRunner = Depends(get_runner),
) -> JobLogs:
    job_or_404(store, job_id)
    return JobLogs(id=job_id, lines=tail_lines(runner.job_dir(job_id) / "output.log", tail))


@router.get(
    "/jobs/{job_id}/roc",
    response_model=RocOut,
    summary="The ROC curve of a job's best epoch",
    responses={
        **UNAUTHORIZED,
        404: error(
            "no such job, or no evaluated epoch yet",
            "job 3f2b... has no ROC yet: it is written when an epoch is evaluated",
        ),
    },
)
def job_roc(
    job_id: Annotated[str, JOB_ID], store: JobStore = Depends(get_store), runner: JobRunner = Depends(get_runner)
) -> RocOut:
    """The trainer writes `roc.json` into the job's folder with each new best epoch."""
    job_or_404(store, job_id)
    path = runner.job_dir(job_id) / "roc.json"
    try:
        return RocOut.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        raise HTTPException(404, f"job {job_id} has no ROC yet: it is written when an epoch is evaluated") from None
    except ValueError:  # written by another version, or cut short: say so rather than 500
        raise HTTPException(
            404, f"job {job_id}'s roc.json cannot be read; it is written again with the next best epoch"
        ) from None
