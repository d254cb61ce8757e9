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

from app.store import finite

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
        return cls(best_metric=job["config"].get("best_metric", "acc"), progress=job.get("progress"),
                   metrics=list(job.get("metrics") or []), best=job.get("best"),
                   thresholds=job.get("thresholds"), checkpoint=job.get("checkpoint"),
                   last_checkpoint=job.get("last_checkpoint"), device=job.get("device"))

    # Fields of the events contract with a type the job's JSON promises. A value that is not a
    # number there (a trainer of another version, a custom FACEID_TRAINER_CMD) is stored as None:
    # kept as it came, one bad value would make every later GET /jobs answer 500.
    _INTS = frozenset({"epoch", "epochs", "step", "steps", "steps_per_epoch", "best_epoch", "done", "total",
                       "no_face_images"})
    _NUMBERS = frozenset({"time", "percent", "loss", "images_per_s", "lr", "eta_s", "best_value", "th",
                          "th_far_1e-2", "th_far_1e-3"})

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

    def apply(self, ev: dict[str, Any]) -> None:
        ev = self._typed(finite(ev))
        kind = ev.get("event")
        if kind == "start":
            self.device = ev.get("device") if isinstance(ev.get("device"), str) else self.device
            prev = self.progress or {}
            self.progress = {**prev, "epochs": ev.get("epochs"), "steps": ev.get("steps_per_epoch"),
                             "epoch": prev.get("epoch", 0), "step": prev.get("step", 0),
                             "percent": prev.get("percent", 0.0), "updated_at": ev.get("time"), "phase": "train",
                             "no_face_images": ev.get("no_face_images")}
        elif kind == "faces":  # finding the data's faces, before the first epoch
            prev = self.progress or {}
            self.progress = {**prev, "phase": "faces", "faces_set": ev.get("what") if isinstance(ev.get("what"), str)
                             else None, "faces_done": ev.get("done"), "faces_total": ev.get("total"),
                             "percent": prev.get("percent", 0.0), "updated_at": ev.get("time")}
        elif kind == "progress":
            prev_progress = self.progress
            self.progress = {k: ev.get(k) for k in ("epoch", "epochs", "step", "steps", "percent", "loss",
                                                    "images_per_s", "lr", "eta_s")}
            self.progress.update(updated_at=ev.get("time"), phase="train",
                                 no_face_images=(prev_progress or {}).get("no_face_images"))
        elif kind == "epoch" and ev.get("epoch") is not None:
            record = {k: v for k, v in ev.items() if k != "event"}
            # One record per epoch and completeness: an epoch a stop ended part way keeps that
            # record beside the one of its completion after a resume (a replayed event replaces)
            key = (record.get("epoch"), record.get("complete", True) is not False)
            self.metrics = [m for m in self.metrics if (m.get("epoch"), m.get("complete", True) is not False) != key]
            self.metrics.append(record)
            self.metrics.sort(key=lambda m: (m.get("epoch") or 0, m.get("complete", True) is not False))
            if ev.get("best_epoch") is not None:
                keep = (self.best or {}).get("checkpoint") if (self.best or {}).get("epoch") == ev["best_epoch"] else None
                self.best = {"epoch": ev["best_epoch"], "metric": self.best_metric,
                             "value": ev.get("best_value"), "checkpoint": keep or self.checkpoint}
            if ev.get("is_best"):
                self.thresholds = {"acc": ev.get("th"), "far_1e-2": ev.get("th_far_1e-2"),
                                   "far_1e-3": ev.get("th_far_1e-3")}
        elif kind == "checkpoint":
            path = ev.get("path") if isinstance(ev.get("path"), str) else None
            if ev.get("kind") == "best" and path:
                self.checkpoint = path
                if self.best is not None:
                    self.best["checkpoint"] = path
            elif ev.get("kind") == "last" and path:
                self.last_checkpoint = path
        elif kind == "finished":
            self.finished = True
            ckpt = ev.get("best_checkpoint") if isinstance(ev.get("best_checkpoint"), str) else self.checkpoint
            self.checkpoint = ckpt
            self.best = {"epoch": ev.get("best_epoch"), "metric": ev.get("best_metric") or self.best_metric,
                         "value": ev.get("best_value"), "checkpoint": ckpt}
            if isinstance(ev.get("thresholds"), dict):
                self.thresholds = ev["thresholds"]
            if self.progress is not None and not ev.get("stopped_early"):  # stopped: as far as it got
                self.progress = {**self.progress, "percent": 100.0, "eta_s": 0.0, "updated_at": ev.get("time")}
        elif kind == "failed":
            if isinstance(ev.get("error"), str):
                self.error = ev["error"][:2000]
            self.error_kind = ev.get("kind") if isinstance(ev.get("kind"), str) else "internal"

    def columns(self) -> dict[str, Any]:
        return {"progress": self.progress, "metrics": self.metrics, "best": self.best,
                "thresholds": self.thresholds, "checkpoint": self.checkpoint,
                "last_checkpoint": self.last_checkpoint, "device": self.device}


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
