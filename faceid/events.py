"""The training events contract (docs/CONTRACTS.md 1): one pydantic model per event.

The trainer builds these and writes them as JSON lines (`Event.to_json()`); the CLI renders them;
the service's job runner reads them back with `parse_event`. This module imports only pydantic, so
tools that speak the contract (the runner, test stand-ins) need no torch.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


class Event(BaseModel):
    """Fields every event has. Unknown fields are kept: a newer trainer may send more."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    time: float = Field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        """The JSON object of one events-file line (metric names as the contract spells them)."""
        return self.model_dump(by_alias=True, exclude_none=False)


class Faces(Event):
    """Finding and aligning the data's faces, before `start` (only with align arcface)."""

    event: Literal["faces"] = "faces"
    what: str  # --train, --val, --pairs_file
    done: int  # images detected so far, of those not in the face cache
    total: int


class Start(Event):
    event: Literal["start"] = "start"
    epochs: int
    steps_per_epoch: int
    device: str
    amp: str
    world_size: int = 1
    start_epoch: int = 1
    train_images: Optional[int] = None
    train_identities: Optional[int] = None
    val_images: Optional[int] = None
    skipped_images: Optional[int] = None
    no_face_images: Optional[int] = None  # left out: no face found
    config: dict[str, Any] = Field(default_factory=dict)  # the resolved TrainConfig


class Progress(Event):
    event: Literal["progress"] = "progress"
    epoch: int  # 1-based
    epochs: int
    step: int  # 1-based within the epoch
    steps: int
    percent: float  # of the whole run, 0-100
    loss: float
    images_per_s: float
    lr: float
    eta_s: float


class TimeSplit(Event):
    """Where this training process's time went so far, in seconds: setup (listing and decoding the
    data, finding faces, building the model, and the first step, where cuDNN searches its kernels),
    train (the steps), eval (evaluations), checkpoint (what writing checkpoints and run files held
    the steps up; the writes themselves run beside them), and wall (all of it since the process
    started). None from trainers that do not say."""

    setup_s: Optional[float] = None
    train_s: Optional[float] = None
    eval_s: Optional[float] = None
    checkpoint_s: Optional[float] = None
    wall_s: Optional[float] = None


class EpochEnd(TimeSplit):
    """An evaluated epoch's record: the metrics of the validation set (and of the pairs file, if
    any). Epochs that eval_every or eval_every_min skip have none."""

    event: Literal["epoch"] = "epoch"
    epoch: int
    global_step: int  # optimizer steps so far
    train_loss: float
    lr: float
    acc: float
    th: float
    auc: float
    tar_1e2: float = Field(alias="tar_1e-2")
    tar_1e3: float = Field(alias="tar_1e-3")
    th_far_1e2: float = Field(alias="th_far_1e-2")
    th_far_1e3: float = Field(alias="th_far_1e-3")
    pairs_acc: Optional[float] = None
    pairs_th: Optional[float] = None
    margin: Optional[float] = None  # the ArcFace margin of the epoch
    complete: bool = True  # false: a stop ended the epoch after `epoch_steps` of its steps
    epoch_steps: Optional[int] = None
    is_best: bool = False
    best_epoch: int
    best_value: float
    epoch_time_s: Optional[float] = None

    def thresholds(self) -> dict[str, float]:
        return thresholds_of(self.to_json())


class Checkpoint(Event):
    event: Literal["checkpoint"] = "checkpoint"
    kind: Literal["best", "last"]
    path: str
    epoch: int


class Finished(TimeSplit):
    event: Literal["finished"] = "finished"
    best_epoch: int
    best_metric: str
    best_value: float
    best_checkpoint: Optional[str] = None
    thresholds: dict[str, float] = Field(default_factory=dict)
    stopped_early: bool = False  # a stop or the time limit ended the run


FAILURE_KINDS = ("data", "config", "checkpoint", "cancelled", "internal")


class Failed(Event):
    event: Literal["failed"] = "failed"
    error: str  # one line
    kind: str = "internal"  # one of FAILURE_KINDS


TrainerEvent = Annotated[
    Union[Faces, Start, Progress, EpochEnd, Checkpoint, Finished, Failed], Field(discriminator="event")
]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(TrainerEvent)
EVENT_TYPES = {
    cls.model_fields["event"].default: cls for cls in (Faces, Start, Progress, EpochEnd, Checkpoint, Finished, Failed)
}


def parse_event(obj: dict[str, Any]) -> Event:
    """One events-file object as its model; pydantic's ValidationError if it breaks the contract."""
    return _ADAPTER.validate_python(obj)


def thresholds_of(metrics: dict[str, Any]) -> dict[str, float]:
    """The named cosine thresholds of an epoch's metrics: what a checkpoint and a job serve with."""
    out = {"acc": metrics.get("th")}
    for far in ("1e-2", "1e-3"):
        out[f"far_{far}"] = metrics.get(f"th_far_{far}")
    if metrics.get("pairs_th") is not None:
        out["pairs_acc"] = metrics["pairs_th"]
    return {k: float(v) for k, v in out.items() if v is not None}
