"""Request and response models of the REST API (the POST /jobs body is faceid.config.TrainConfig)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled", "interrupted"]

_JOB_ID = "3f2b9c0e5d8a4e1f9a7b6c5d4e3f2a1b"


def iso(ts: Optional[float]) -> Optional[str]:
    return None if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="seconds")


class ErrorOut(BaseModel):
    detail: str = Field(description="what went wrong and how to fix it")
    field: Optional[str] = Field(None, description="the request field at fault, when there is one")


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


class BatchingOut(BaseModel):
    max_batch_size: int = Field(description="FACEID_BATCH_MAX_SIZE: images per forward pass at most")
    wait_ms: float = Field(
        description="FACEID_BATCH_WAIT_MS: how long a batch waits for the next request under concurrent load"
    )
    workers: int = Field(description="FACEID_INFER_WORKERS as decided: forward passes that can run at once")
    batches: int = Field(description="forward passes run since the server started")
    requests: int = Field(description="/embed and /verify requests they answered")
    images: int = Field(description="images they embedded")
    mean_batch_images: Optional[float] = Field(description="images per forward pass on average (null before the first)")


class ReplicasOut(BaseModel):
    replicas: int = Field(description="FACEID_INFER_REPLICAS: extra server processes answering /embed and /verify")
    host: str = Field(description="FACEID_INFER_HOST, where they listen")
    port: int = Field(description="FACEID_INFER_PORT, the port they share")
    pids: list[int] = Field(description="the replicas' processes running now")
    restarts: int = Field(description="replicas started again after exiting, since the server started")
    ready: int = Field(
        0,
        description="replicas that have started and loaded the served model (a "
        "restarted one gets new connections once it is ready)",
    )
    connections: list[int] = Field(
        description="connections handed to each replica since the server started "
        "(the main server accepts on their port and hands each new one to the next "
        "replica that is up)"
    )


class PreparationOut(BaseModel):
    align: str = Field(
        description="arcface: the largest face found is aligned onto the ArcFace template; "
        "none: the centred crop square is resized (models trained before alignment)"
    )
    img_size: int
    crop: float
    template: Optional[str] = Field(default=None, description="the five-point template (arcface-112)")
    detector: Optional[dict[str, Any]] = Field(
        default=None, description="the face detector and its settings (name, max_side, min_face, min_score)"
    )


class FaceOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "box": [412.3, 208.9, 601.7, 447.2],
                    "landmarks": [[467.1, 309.4], [551.0, 306.2], [510.3, 354.8], [475.6, 398.0], [545.2, 395.1]],
                    "score": 0.99987,
                    "faces_found": 1,
                }
            ]
        }
    )

    box: list[float] = Field(description="x1, y1, x2, y2 in the uploaded image's pixels (after its EXIF rotation)")
    landmarks: list[list[float]] = Field(
        description="five (x, y): left eye, right eye, nose tip, left and right "
        "mouth corner (left and right as seen in the image)"
    )
    score: float = Field(description="the detector's confidence, 0 to 1")
    faces_found: int = Field(description="faces found in the image; the largest is the one used")


class ModelOut(BaseModel):
    model_config = ConfigDict(
        protected_namespaces=(),
        json_schema_extra={
            "examples": [
                {
                    "id": _JOB_ID,
                    "job_id": _JOB_ID,
                    "checkpoint": f"/srv/models/jobs/{_JOB_ID}/backbone_best.pt",
                    "source": "job",
                    "pinned": False,
                    "loaded_at": "2025-01-01T12:05:00+00:00",
                    "epoch": 2,
                    "metrics": {"acc": 0.66, "th": 0.42, "auc": 0.71, "tar_1e-2": 0.06, "tar_1e-3": 0.01},
                    "thresholds": {"acc": 0.42, "far_1e-2": 0.77, "far_1e-3": 0.85},
                    "operating_points": {
                        "acc": {"threshold": 0.42, "accuracy": 0.66, "pairs": 20000},
                        "far_1e-3": {
                            "threshold": 0.85,
                            "far": 0.001,
                            "tar": 0.01,
                            "negatives": 10000,
                            "false_accepts": 10,
                            "resolved": True,
                        },
                    },
                    "img_size": 64,
                    "crop": 1.0,
                    "embedding_size": 512,
                    "arch": "resnet50",
                    "train_mode": "arcface",
                    "batching": {
                        "max_batch_size": 16,
                        "wait_ms": 2.0,
                        "workers": 2,
                        "batches": 120,
                        "requests": 900,
                        "images": 1000,
                        "mean_batch_images": 8.33,
                    },
                }
            ]
        },
    )

    id: str = Field(description="the job id, or checkpoint-<hash> for a file served with FACEID_CHECKPOINT")
    job_id: Optional[str] = None
    checkpoint: str
    source: str = Field(description="job (newest succeeded job), activated, or env (FACEID_CHECKPOINT)")
    pinned: bool = Field(description="a pinned model is not replaced when a new job succeeds")
    loaded_at: Optional[str] = None
    epoch: Optional[int] = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    thresholds: dict[str, Optional[float]] = Field(default_factory=dict)
    operating_points: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description=(
            "each threshold with the evidence behind it: for far_1e-2 and far_1e-3 the TAR, the negative "
            "pairs that calibrated it and `resolved` (at least 10 false accepts define it: FAR 1e-3 needs "
            "10,000 negatives); for acc and pairs_acc the accuracy and the pairs"
        ),
    )
    img_size: Optional[int] = None
    crop: Optional[float] = Field(
        default=None,
        description="the centred share of each image's shorter "
        "side the model sees (resized to img_size); 1 = the whole image",
    )
    embedding_size: Optional[int] = None
    arch: Optional[str] = None
    train_mode: Optional[str] = None
    faces: Optional[PreparationOut] = Field(
        default=None, description="how uploads are made into the model's input, as its training data was"
    )
    batching: Optional[BatchingOut] = Field(
        default=None,
        description="how /embed and /verify requests have been batched since the server started (on this port)",
    )
    replicas: Optional[ReplicasOut] = Field(
        default=None, description="the inference replicas (null: none); each follows this model"
    )


class EmbedOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"embedding": [0.0123, -0.0456, "... 512 values"], "dim": 512, "model": _JOB_ID}]
        }
    )

    embedding: list[float] = Field(description="unit-norm embedding")
    dim: int
    face: Optional[FaceOut] = Field(
        default=None, description="the face that was embedded (null: the model does not align faces, or detect=false)"
    )
    model: str = Field(description="id of the model that answered (see GET /model)")


class EmbedBatchOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "embeddings": [[0.0123, -0.0456, "... 512 values"], [0.0311, 0.0022, "..."]],
                    "count": 2,
                    "dim": 512,
                    "model": _JOB_ID,
                }
            ]
        }
    )

    embeddings: list[list[float]] = Field(description="unit-norm embeddings, in the order the images were sent")
    count: int
    dim: int
    faces: list[Optional[FaceOut]] = Field(
        default_factory=list, description="the face embedded from each image, in order (null entries: no detection)"
    )
    model: str = Field(description="id of the model that answered (see GET /model)")


class VerifyOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"similarity": 0.83, "threshold": 0.42, "threshold_name": "acc", "match": True, "model": _JOB_ID}
            ]
        }
    )

    similarity: float = Field(description="cosine similarity of the two embeddings, in [-1, 1]")
    threshold: float
    threshold_name: str = Field(description="acc, far_1e-2, far_1e-3, pairs_acc, or custom for a number you sent")
    match: bool = Field(description="similarity >= threshold")
    model: str
    face1: Optional[FaceOut] = Field(
        default=None,
        description="the face compared from image1 (null: the model does not align faces, or detect=false)",
    )
    face2: Optional[FaceOut] = Field(default=None, description="the face compared from image2")


class HealthOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"status": "ok", "version": "0.1.0"}]})

    status: Literal["ok"] = "ok"
    version: str


class ReadyOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"ready": True, "model": _JOB_ID, "detail": None}]})

    ready: bool
    model: Optional[str] = None
    detail: Optional[str] = None
