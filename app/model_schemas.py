"""Response models of the served model's routes: GET /model, /embed, /embed/batch, /verify (the
job routes' models are in app/schemas.py)."""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field

from app.schemas import JOB_ID_EXAMPLE as _JOB_ID


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
