"""Request and response models of the REST API (the POST /jobs body is faceid.config.TrainConfig)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled", "interrupted"]

JOB_ID_EXAMPLE = _JOB_ID = "3f2b9c0e5d8a4e1f9a7b6c5d4e3f2a1b"


def iso(ts: Optional[float]) -> Optional[str]:
    return None if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="seconds")


class ErrorOut(BaseModel):
    detail: str = Field(description="what went wrong and how to fix it")
    field: Optional[str] = Field(None, description="the request field at fault, when there is one")


class TimeSplit(BaseModel):
    """Where the training process's time went, in seconds, as of its last evaluation (and, once
    it finished, in all)."""

    setup_s: Optional[float] = Field(
        None, description="listing, decoding and finding the data's faces, building the model, the first step"
    )
    train_s: Optional[float] = Field(None, description="the training steps")
    eval_s: Optional[float] = Field(None, description="evaluations")
    checkpoint_s: Optional[float] = Field(
        None, description="what writing checkpoints held training up (the writes run beside it)"
    )
    wall_s: Optional[float] = Field(None, description="all of it, since the training process started")


class Progress(BaseModel):
    epoch: Optional[int] = Field(None, description="current epoch, 1-based (0 before the first step)")
    epochs: Optional[int] = None
    step: Optional[int] = Field(None, description="step within the epoch, 1-based")
    steps: Optional[int] = Field(None, description="steps per epoch")
    percent: Optional[float] = Field(None, description="of the whole run, 0-100")
    loss: Optional[float] = None
    images_per_s: Optional[float] = None
    lr: Optional[float] = None
    eta_s: Optional[float] = Field(None, description="estimated seconds left")
    phase: Optional[str] = Field(
        None,
        description="faces: finding the faces of the data (before the first "
        "epoch; detections are cached for later jobs); train: training",
    )
    faces_done: Optional[int] = Field(None, description="images whose faces were found so far, in faces_set")
    faces_total: Optional[int] = Field(None, description="images of faces_set that needed detection")
    faces_set: Optional[str] = Field(None, description="--train, --val or --pairs_file")
    no_face_images: Optional[int] = Field(
        None,
        description="training and validation images left out because "
        "no face was found in them; no_face.txt in the job's folder lists them",
    )
    time_split: Optional[TimeSplit] = None
    updated_at: Optional[str] = None


class Best(BaseModel):
    epoch: Optional[int] = None
    metric: Optional[str] = Field(None, description="the config's best_metric")
    value: Optional[float] = None
    checkpoint: Optional[str] = None


class JobOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": _JOB_ID,
                    "status": "running",
                    "created_at": "2025-01-01T12:00:00+00:00",
                    "started_at": "2025-01-01T12:00:01+00:00",
                    "finished_at": None,
                    "config": {"preset": "cpu-small", "train": "/srv/data/sample/train", "epochs": 2, "...": "..."},
                    "progress": {
                        "epoch": 1,
                        "epochs": 2,
                        "step": 3,
                        "steps": 4,
                        "percent": 37.5,
                        "loss": 9.81,
                        "images_per_s": 95.2,
                        "lr": 0.0009,
                        "eta_s": 20.5,
                        "updated_at": "2025-01-01T12:00:09+00:00",
                    },
                    "metrics": [
                        {
                            "epoch": 1,
                            "train_loss": 10.2,
                            "lr": 0.001,
                            "acc": 0.64,
                            "th": 0.41,
                            "auc": 0.69,
                            "tar_1e-2": 0.05,
                            "tar_1e-3": 0.01,
                            "is_best": True,
                        }
                    ],
                    "best": {
                        "epoch": 1,
                        "metric": "acc",
                        "value": 0.64,
                        "checkpoint": f"/srv/models/jobs/{_JOB_ID}/backbone_best.pt",
                    },
                    "thresholds": {"acc": 0.41, "far_1e-2": 0.78, "far_1e-3": 0.86},
                    "checkpoint": None,
                    "error": None,
                    "error_kind": None,
                    "exit_code": None,
                    "attempts": 1,
                    "cancel_requested": False,
                    "device": "cpu",
                    "worker": "server@gpu-host-1:4242",
                }
            ]
        }
    )

    id: str
    status: JobStatus
    created_at: Optional[str] = None
    started_at: Optional[str] = None
    finished_at: Optional[str] = None
    config: dict[str, Any] = Field(
        description="the TrainConfig the training process runs with (data paths resolved, ckpt_dir = the job's folder)"
    )
    progress: Optional[Progress] = None
    metrics: list[dict[str, Any]] = Field(
        default_factory=list,
        description="one record per finished epoch (train_loss, lr, acc, th, auc, tar_1e-2, tar_1e-3, ...)",
    )
    best: Optional[Best] = None
    thresholds: Optional[dict[str, Optional[float]]] = Field(
        None,
        description="cosine thresholds of the best epoch: acc, far_1e-2, far_1e-3, and pairs_acc with a pairs file",
    )
    checkpoint: Optional[str] = Field(None, description="the best checkpoint (backbone_best.pt) once there is one")
    last_checkpoint: Optional[str] = Field(None, description="last.pt, which resume continues from")
    error: Optional[str] = None
    error_kind: Optional[str] = Field(None, description="data, config, checkpoint, cancelled or internal")
    exit_code: Optional[int] = Field(None, description="of the training process (negative: killed by that signal)")
    attempts: int = Field(0, description="how many times the job was started (resumes add one)")
    cancel_requested: bool = False
    device: Optional[str] = None
    worker: Optional[str] = Field(
        None,
        description="the runner that runs (or last ran) it: hostname:pid of a `faceid worker`, server@... a server's",
    )

    @classmethod
    def from_job(cls, job: dict[str, Any]) -> "JobOut":
        progress = job.get("progress")
        if progress:
            progress = {
                **progress,
                "updated_at": iso(progress.get("updated_at"))
                if isinstance(progress.get("updated_at"), (int, float))
                else None,
            }
        return cls(
            id=job["id"],
            status=job["status"],
            created_at=iso(job["created_at"]),
            started_at=iso(job["started_at"]),
            finished_at=iso(job["finished_at"]),
            config=job["config"],
            progress=Progress.model_validate(progress) if progress is not None else None,
            metrics=job.get("metrics") or [],
            best=job.get("best"),
            thresholds=job.get("thresholds"),
            checkpoint=job.get("checkpoint"),
            last_checkpoint=job.get("last_checkpoint"),
            error=job.get("error"),
            error_kind=job.get("error_kind"),
            exit_code=job.get("exit_code"),
            attempts=job.get("attempts") or 0,
            cancel_requested=bool(job.get("cancel_requested")),
            device=job.get("device"),
            worker=job.get("worker"),
        )


class JobList(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"jobs": ["... JobOut, newest first ..."], "total": 1, "limit": 50, "offset": 0}]
        }
    )

    jobs: list[JobOut]
    total: int = Field(description="jobs matching the filter")
    limit: int
    offset: int


class JobLogs(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": _JOB_ID,
                    "lines": [
                        "--- attempt 1 started 2025-01-01T12:00:01+0000 ---",
                        "2025-01-01 12:00:05 INFO faceid.cli: epoch 1/2 step 1/4 loss 10.2",
                    ],
                }
            ]
        }
    )

    id: str
    lines: list[str] = Field(description="the last lines of the training process's output (stdout and stderr)")


class RocOut(BaseModel):
    """The ROC curve of a job's best epoch on its sampled validation pairs, thinned for plotting
    (exact at the FAR operating points); `match = score >= threshold[i]` gives far[i], tar[i]."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "epoch": 4,
                    "far": [0.0, 0.0001, 0.001, 0.01, 1.0],
                    "tar": [0.0, 0.12, 0.31, 0.62, 1.0],
                    "threshold": [1.0, 0.71, 0.58, 0.44, -1.0],
                    "n_pos": 10000,
                    "n_neg": 10000,
                    "thresholds": {"acc": 0.31, "far_1e-2": 0.44, "far_1e-3": 0.58},
                }
            ]
        }
    )
    epoch: int
    far: list[float]
    tar: list[float]
    threshold: list[float]
    n_pos: int
    n_neg: int
    thresholds: dict[str, Optional[float]] = Field(
        default_factory=dict, description="the epoch's operating points (as the job's thresholds)"
    )


class HealthOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"status": "ok", "version": "0.1.0"}]})

    status: Literal["ok"] = "ok"
    version: str


class ReadyOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"ready": True, "model": _JOB_ID, "detail": None}]})

    ready: bool
    model: Optional[str] = None
    detail: Optional[str] = None
