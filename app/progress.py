"""A job's progress, read from its training process's events (docs/CONTRACTS.md section 1).

The trainer appends one JSON line per event to the job's events.jsonl; `EventTail` reads the
complete lines appended since the last read, and `JobProgress` folds them into what the job store
keeps of a job: its progress, per-epoch metrics, best epoch and checkpoint, and thresholds.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from pydantic import ValidationError

from app.store import finite
from faceid.events import (
    EVENT_TYPES,
    Checkpoint,
    EpochEnd,
    Event,
    Faces,
    Failed,
    Finished,
    Progress,
    Start,
    parse_event,
    thresholds_of,
)

log = logging.getLogger(__name__)


@dataclass
class JobProgress:
    """What the events of one run have told us so far; `columns()` is the store update."""

    best_metric: str
    progress: Optional[dict[str, Any]] = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    best: Optional[dict[str, Any]] = None
    thresholds: Optional[dict[str, Any]] = None
    checkpoint: Optional[str] = None
    last_checkpoint: Optional[str] = None
    device: Optional[str] = None
    error: Optional[str] = None
    error_kind: Optional[str] = None
    finished: bool = False

    @classmethod
    def from_job(cls, job: dict[str, Any]) -> "JobProgress":
        return cls(
            best_metric=job["config"].get("best_metric", "acc"),
            progress=job.get("progress"),
            metrics=list(job.get("metrics") or []),
            best=job.get("best"),
            thresholds=job.get("thresholds"),
            checkpoint=job.get("checkpoint"),
            last_checkpoint=job.get("last_checkpoint"),
            device=job.get("device"),
        )

    # Fields of the events contract with a type the job's JSON promises. A value that is not a
    # number there (a trainer of another version, a custom FACEID_TRAINER_CMD) is stored as None:
    # kept as it came, one bad value would make every later GET /jobs answer 500.
    _INTS = frozenset(
        {"epoch", "epochs", "step", "steps", "steps_per_epoch", "best_epoch", "done", "total", "no_face_images"}
    )
    _NUMBERS = frozenset(
        {"time", "percent", "loss", "images_per_s", "lr", "eta_s", "best_value", "th", "th_far_1e-2", "th_far_1e-3"}
    )

    @staticmethod
    def _number(value: Any, integer: bool = False) -> Any:
        """`value` as a finite int/float (a numeric string too, as JSON of a numpy scalar can be),
        else None."""
        if isinstance(value, bool):
            return None
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                return None
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return None
        if integer:
            return int(value) if float(value).is_integer() else None
        return value

    @classmethod
    def _typed(cls, ev: dict[str, Any]) -> dict[str, Any]:
        out = dict(ev)
        for key, value in ev.items():
            if key in cls._INTS:
                out[key] = cls._number(value, integer=True)
            elif key in cls._NUMBERS:
                out[key] = cls._number(value)
        if "thresholds" in out:
            t = out["thresholds"]
            out["thresholds"] = {str(k): cls._number(v) for k, v in t.items()} if isinstance(t, dict) else None
        if not isinstance(out.get("best_metric"), (str, type(None))):
            out["best_metric"] = None
        return out

    @classmethod
    def event(cls, obj: dict[str, Any]) -> Optional[Event]:
        """One object of the events file as its model of the contract (faceid.events.parse_event),
        with every non-finite or wrongly typed number of it None (`_typed`). An object that still
        breaks the contract (a trainer of another version, a custom FACEID_TRAINER_CMD) is read as
        far as it goes, as its model built unvalidated: a field it lacks is None, one of the wrong
        type is kept for the reader to check. None for an object that is no event of the contract."""
        clean = cls._typed(finite(obj))
        kind = clean.get("event")
        model = EVENT_TYPES.get(kind) if isinstance(kind, str) else None
        if model is None:
            return None
        try:
            return parse_event(clean)
        except ValidationError:
            pass
        given = {name for name, f in model.model_fields.items() if (f.alias or name) in clean or name in clean}
        values = {(f.alias or name): None for name, f in model.model_fields.items() if name not in given}
        values.update(clean)
        values.pop("_fields_set", None)  # model_construct's own argument
        return model.model_construct(given, **values)

    def apply(self, obj: dict[str, Any]) -> None:
        ev = self.event(obj)
        # The event's own time; None when it gave none (not the model's default, the time of reading)
        when = ev.time if ev is not None and "time" in ev.model_fields_set else None
        if isinstance(ev, Start):
            self.device = ev.device if isinstance(ev.device, str) else self.device
            prev = self.progress or {}
            self.progress = {
                **prev,
                "epochs": ev.epochs,
                "steps": ev.steps_per_epoch,
                "epoch": prev.get("epoch", 0),
                "step": prev.get("step", 0),
                "percent": prev.get("percent", 0.0),
                "updated_at": when,
                "phase": "train",
                "no_face_images": ev.no_face_images,
            }
        elif isinstance(ev, Faces):  # finding the data's faces, before the first epoch
            prev = self.progress or {}
            self.progress = {
                **prev,
                "phase": "faces",
                "faces_set": ev.what if isinstance(ev.what, str) else None,
                "faces_done": ev.done,
                "faces_total": ev.total,
                "percent": prev.get("percent", 0.0),
                "updated_at": when,
            }
        elif isinstance(ev, Progress):
            prev_progress = self.progress
            self.progress = {
                k: getattr(ev, k)
                for k in ("epoch", "epochs", "step", "steps", "percent", "loss", "images_per_s", "lr", "eta_s")
            }
            self.progress.update(
                updated_at=when, phase="train", no_face_images=(prev_progress or {}).get("no_face_images")
            )
            if (prev_progress or {}).get("time_split") is not None:
                self.progress["time_split"] = (prev_progress or {})["time_split"]
        elif isinstance(ev, EpochEnd) and ev.epoch is not None:
            # The epoch's record: the fields the event gave, as the contract spells them
            record = finite(ev.model_dump(by_alias=True, exclude_unset=True, warnings=False))
            record.pop("event", None)
            # One record per epoch and completeness: an epoch a stop ended part way keeps that
            # record beside the one of its completion after a resume (a replayed event replaces)
            key = (record.get("epoch"), record.get("complete", True) is not False)
            self.metrics = [m for m in self.metrics if (m.get("epoch"), m.get("complete", True) is not False) != key]
            self.metrics.append(record)
            split = self._time_split(ev)
            if split and self.progress is not None:  # where the run's time went, as of this epoch
                self.progress = {**self.progress, "time_split": split}
            self.metrics.sort(key=lambda m: (m.get("epoch") or 0, m.get("complete", True) is not False))
            if ev.best_epoch is not None:
                keep = (self.best or {}).get("checkpoint") if (self.best or {}).get("epoch") == ev.best_epoch else None
                self.best = {
                    "epoch": ev.best_epoch,
                    "metric": self.best_metric,
                    "value": ev.best_value,
                    "checkpoint": keep or self.checkpoint,
                }
            if ev.is_best:
                # The thresholds a finished run reports (pairs_acc too, when the trainer has a
                # pairs file); a name the event gave no number for stays, as None.
                numbers = {k: self._number(v) for k, v in record.items()}
                self.thresholds = {**dict.fromkeys(("acc", "far_1e-2", "far_1e-3")), **thresholds_of(numbers)}
        elif isinstance(ev, Checkpoint):
            path = ev.path if isinstance(ev.path, str) else None
            if ev.kind == "best" and path:
                self.checkpoint = path
                if self.best is not None:
                    self.best["checkpoint"] = path
            elif ev.kind == "last" and path:
                self.last_checkpoint = path
        elif isinstance(ev, Finished):
            self.finished = True
            ckpt = ev.best_checkpoint if isinstance(ev.best_checkpoint, str) else self.checkpoint
            self.checkpoint = ckpt
            self.best = {
                "epoch": ev.best_epoch,
                "metric": ev.best_metric or self.best_metric,
                "value": ev.best_value,
                "checkpoint": ckpt,
            }
            if "thresholds" in ev.model_fields_set and isinstance(ev.thresholds, dict):
                self.thresholds = ev.thresholds
            if self.progress is not None and not ev.stopped_early:  # stopped: as far as it got
                self.progress = {**self.progress, "percent": 100.0, "eta_s": 0.0, "updated_at": when}
            split = self._time_split(ev)
            if split and self.progress is not None:
                self.progress = {**self.progress, "time_split": split}
        elif isinstance(ev, Failed):
            if isinstance(ev.error, str):
                self.error = ev.error[:2000]
            self.error_kind = ev.kind if isinstance(ev.kind, str) else "internal"

    @classmethod
    def _time_split(cls, ev: Event) -> Optional[dict[str, Any]]:
        """The TimeSplit fields an epoch or finished event gave (numbers or None), else None."""
        keys = ("setup_s", "train_s", "eval_s", "checkpoint_s", "wall_s")
        given = {k: cls._number(getattr(ev, k, None)) for k in keys if k in ev.model_fields_set}
        return given or None

    def columns(self) -> dict[str, Any]:
        return {
            "progress": self.progress,
            "metrics": self.metrics,
            "best": self.best,
            "thresholds": self.thresholds,
            "checkpoint": self.checkpoint,
            "last_checkpoint": self.last_checkpoint,
            "device": self.device,
        }


class EventTail:
    """Reads the complete JSON lines appended to an events file since `offset`."""

    MAX_LINE = 1 << 20

    def __init__(self, path: Path, offset: int = 0) -> None:
        self.path = path
        self.offset = offset
        self._partial = b""

    @property
    def consumed(self) -> int:
        """Where the first line not yet returned starts."""
        return self.offset - len(self._partial)

    def read(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read(8 << 20)
        except FileNotFoundError:
            return []
        self.offset += len(chunk)
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > self.MAX_LINE:
            self._partial = b""
        events = []
        for line in lines:
            if not line.strip():
                continue
            try:
                ev = json.loads(line)
            except ValueError:
                log.warning("skipping a malformed line in %s", self.path)
                continue
            if isinstance(ev, dict):
                events.append(ev)
        return events
