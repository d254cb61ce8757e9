"""Training jobs: the SQLite store and the runner that executes them as child processes.

A job is a row in MODELS_DIR/jobs.db and a folder MODELS_DIR/jobs/<id>/ holding config.json,
events.jsonl, output.log and the checkpoints. The runner starts queued jobs one at a time as
`<trainer_cmd> --config config.json --events_file events.jsonl` (an argument list in its own process
group, docs/CONTRACTS.md section 1), reads the events the process appends and records them, so a
crash, an out-of-memory kill or a cancel of the training process never touches the server.

States: queued -> running -> succeeded | failed | cancelled, and interrupted for a job that was
running when the server stopped; POST /jobs/{id}/resume puts such a job back in the queue with
`resume` pointing at its last.pt.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sqlite3
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from faceid.omp import training_child_env

log = logging.getLogger(__name__)

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled", "interrupted")
RESUMABLE = ("interrupted", "failed", "cancelled")
JOB_ID_LEN = 32

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    config TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    progress TEXT,
    metrics TEXT NOT NULL DEFAULT '[]',
    best TEXT,
    thresholds TEXT,
    checkpoint TEXT,
    last_checkpoint TEXT,
    device TEXT,
    error TEXT,
    error_kind TEXT,
    exit_code INTEGER,
    pid INTEGER,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    events_offset INTEGER
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
CREATE TABLE IF NOT EXISTS state (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""
_JSON_COLUMNS = ("config", "progress", "metrics", "best", "thresholds")
# The only column names ever put into SQL text; every value goes through a ? parameter.
_UPDATABLE = frozenset({"status", "config", "started_at", "finished_at", "progress", "metrics", "best",
                        "thresholds", "checkpoint", "last_checkpoint", "device", "error", "error_kind",
                        "exit_code", "pid", "cancel_requested", "attempts", "events_offset"})


class QueueFullError(Exception):
    """Too many queued jobs."""


class JobStateError(Exception):
    """An action that does not fit the job's current status (answered with 409)."""


def new_job_id() -> str:
    return uuid.uuid4().hex


def is_job_id(value: str) -> bool:
    return len(value) == JOB_ID_LEN and all(c in "0123456789abcdef" for c in value)


def finite(value: Any) -> Any:
    """`value` with every non-finite float replaced by None (JSON has no NaN; a diverged loss must
    not turn GET /jobs/{id} into a 500)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


class JobStore:
    """SQLite job table and a small key-value table (the served model). Thread-safe: one
    connection behind a lock; WAL so readers do not wait for the runner's writes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            columns = {r["name"] for r in self._db.execute("PRAGMA table_info(jobs)")}
            if "events_offset" not in columns:  # a database from before the column
                self._db.execute("ALTER TABLE jobs ADD COLUMN events_offset INTEGER")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- jobs ---------------------------------------------------------------------------------

    @staticmethod
    def _to_dict(row: sqlite3.Row) -> dict[str, Any]:
        job = dict(row)
        for name in _JSON_COLUMNS:
            if job.get(name) is not None:
                job[name] = json.loads(job[name])
        job["cancel_requested"] = bool(job["cancel_requested"])
        return job

    def create(self, job_id: str, config: dict[str, Any], max_queued: int) -> dict[str, Any]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                (queued,) = self._db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued'").fetchone()
                if queued >= max_queued:
                    raise QueueFullError(f"{queued} jobs are already queued (the limit is {max_queued}); "
                                         "wait for some to finish or cancel some")
                self._db.execute("INSERT INTO jobs (id, status, config, created_at) VALUES (?, 'queued', ?, ?)",
                                 (job_id, json.dumps(config), time.time()))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        job = self.get(job_id)
        assert job is not None
        return job

    def get(self, job_id: str) -> Optional[dict[str, Any]]:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else self._to_dict(row)

    def list(self, status: Optional[str] = None, limit: int = 100, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
        """Jobs newest first, and the total count matching `status`."""
        with self._lock:
            if status is None:
                rows = self._db.execute("SELECT * FROM jobs ORDER BY seq DESC LIMIT ? OFFSET ?",
                                        (limit, offset)).fetchall()
                (total,) = self._db.execute("SELECT COUNT(*) FROM jobs").fetchone()
            else:
                rows = self._db.execute("SELECT * FROM jobs WHERE status = ? ORDER BY seq DESC LIMIT ? OFFSET ?",
                                        (status, limit, offset)).fetchall()
                (total,) = self._db.execute("SELECT COUNT(*) FROM jobs WHERE status = ?", (status,)).fetchone()
        return [self._to_dict(r) for r in rows], total

    def next_queued(self) -> Optional[dict[str, Any]]:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 1").fetchone()
        return None if row is None else self._to_dict(row)

    def update(self, job_id: str, **values: Any) -> None:
        unknown = set(values) - _UPDATABLE
        if unknown:
            raise ValueError(f"not job columns: {sorted(unknown)}")
        if not values:
            return
        names = sorted(values)
        params = [json.dumps(finite(values[n])) if n in _JSON_COLUMNS and values[n] is not None else values[n]
                  for n in names]
        assignments = ", ".join(f"{n} = ?" for n in names)  # names come from _UPDATABLE only
        with self._lock:
            self._db.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*params, job_id))

    def _transition(self, job_id: str, allowed: Iterable[str], **values: Any) -> bool:
        """Set `values` only if the job's status is one of `allowed`; True when it was."""
        allowed = tuple(allowed)
        names = sorted(values)
        assert set(names) <= _UPDATABLE
        params = [json.dumps(values[n]) if n in _JSON_COLUMNS and values[n] is not None else values[n]
                  for n in names]
        marks = ", ".join("?" for _ in allowed)
        assignments = ", ".join(f"{n} = ?" for n in names)
        with self._lock:
            cur = self._db.execute(f"UPDATE jobs SET {assignments} WHERE id = ? AND status IN ({marks})",
                                   (*params, job_id, *allowed))
        return cur.rowcount == 1

    def claim(self, job_id: str, events_offset: Optional[int] = None) -> bool:
        """queued -> running, with where this run's events start in its events file; False when
        the job left the queue meanwhile (cancelled)."""
        with self._lock:
            job = self.get(job_id)
            if job is None:
                return False
            return self._transition(job_id, ("queued",), status="running", started_at=time.time(),
                                    finished_at=None, error=None, error_kind=None, exit_code=None,
                                    cancel_requested=0, attempts=job["attempts"] + 1,
                                    events_offset=events_offset)

    def cancel_queued(self, job_id: str) -> bool:
        return self._transition(job_id, ("queued",), status="cancelled", finished_at=time.time(),
                                error=None)

    def request_cancel(self, job_id: str) -> bool:
        return self._transition(job_id, ("running",), cancel_requested=1)

    def requeue(self, job_id: str, config: dict[str, Any], max_queued: int) -> bool:
        with self._lock:
            (queued,) = self._db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued'").fetchone()
            if queued >= max_queued:
                raise QueueFullError(f"{queued} jobs are already queued (the limit is {max_queued}); "
                                     "wait for some to finish or cancel some")
            return self._transition(job_id, RESUMABLE, status="queued", config=config, finished_at=None,
                                    error=None, error_kind=None, exit_code=None, pid=None,
                                    cancel_requested=0)

    def interrupt_running(self) -> list[dict[str, Any]]:
        """Mark jobs left `running` by a server that died as interrupted; return them."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs WHERE status = 'running'").fetchall()
            jobs = [self._to_dict(r) for r in rows]
            for job in jobs:
                self.update(job["id"], status="interrupted", finished_at=time.time(),
                            error=INTERRUPTED_MESSAGE.format(id=job["id"]))
        return jobs

    # -- key-value state ------------------------------------------------------------------------

    def get_state(self, key: str) -> Optional[Any]:
        with self._lock:
            row = self._db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def set_state(self, key: str, value: Any) -> None:
        with self._lock:
            self._db.execute("INSERT INTO state (key, value) VALUES (?, ?) "
                             "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, json.dumps(value)))


INTERRUPTED_MESSAGE = ("the server stopped while this job was running; POST /jobs/{id}/resume "
                       "continues it from its last.pt")


# -- events ---------------------------------------------------------------------------------------

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


def tail_lines(path: Path, n: int, max_bytes: int = 4 << 20) -> list[str]:
    """The last `n` lines of a text file, reading at most `max_bytes` from its end."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            start = max(0, size - max_bytes)
            f.seek(start)
            data = f.read()
    except FileNotFoundError:
        return []
    lines = data.decode("utf-8", errors="replace").splitlines()
    if start > 0 and lines:
        lines = lines[1:]  # the first line was cut
    return lines[-n:] if n > 0 else []


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def _kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def describe_exit(rc: int, what: str = "the training process") -> str:
    """Why process `what` ended, from its return code (negative: the signal that killed it)."""
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        hint = " (the out-of-memory killer does this)" if -rc == signal.SIGKILL else ""
        return f"{what} was killed by {name}{hint}"
    if rc == 143:
        return f"{what} was stopped by SIGTERM from outside the service"
    return f"{what} exited with code {rc}"


# -- runner ---------------------------------------------------------------------------------------

@dataclass
class _Running:
    job_id: str
    proc: subprocess.Popen
    kill_at: Optional[float] = None


class JobRunner:
    """Runs queued jobs one at a time in a background thread."""

    def __init__(self, *, store: JobStore, jobs_dir: Path, trainer_cmd: Iterable[str],
                 cancel_grace_s: float = 30.0, poll_interval_s: float = 0.5,
                 on_succeeded: Optional[Callable[[dict[str, Any]], None]] = None) -> None:
        self.store = store
        self.jobs_dir = jobs_dir
        self.trainer_cmd = list(trainer_cmd)
        if self.trainer_cmd and os.sep in self.trainer_cmd[0] and not os.path.isabs(self.trainer_cmd[0]):
            # A relative program path (sys.executable is one when PATH holds a relative folder, such as
            # PATH=.venv/bin:$PATH) means the server's folder; the process starts in the job's folder.
            self.trainer_cmd[0] = os.path.abspath(self.trainer_cmd[0])
        self.cancel_grace_s = cancel_grace_s
        self.poll_interval_s = poll_interval_s
        self.on_succeeded = on_succeeded
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._current: Optional[_Running] = None
        self._thread: Optional[threading.Thread] = None

    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    # -- lifecycle ----------------------------------------------------------------------------

    def recover(self) -> list[dict[str, Any]]:
        """At start: mark jobs left running by a dead server as interrupted, and stop their
        training processes if they outlived it (same process group, same config file)."""
        jobs = self.store.interrupt_running()
        for job in jobs:
            pid = job.get("pid")
            if pid and _is_our_trainer(pid, self.job_dir(job["id"]) / "config.json"):
                log.warning("job %s: stopping its training process %d, left over from the last server",
                            job["id"], pid)
                _kill_group(pid, signal.SIGTERM)
                deadline = time.monotonic() + min(self.cancel_grace_s, 10.0)
                while time.monotonic() < deadline and process_alive(pid):
                    time.sleep(0.1)
                _kill_group(pid, signal.SIGKILL)
            self._catch_up(job)
            log.warning("job %s was running when the server stopped; marked interrupted", job["id"])
        return jobs

    def _catch_up(self, job: dict[str, Any]) -> None:
        """Apply the events a dead server left unread: the last progress, and what its trainer did
        when it was stopped (an evaluated epoch, a new best checkpoint, last.pt), so that the job's
        metrics, best and thresholds describe the files in its folder."""
        if job.get("events_offset") is None:
            return
        try:
            state = JobProgress.from_job(job)
            tail = EventTail(self.job_dir(job["id"]) / "events.jsonl", int(job["events_offset"]))
            count = 0
            while True:  # to the end: one read takes at most 8 MB
                before = tail.offset
                n = self._take_events(job["id"], state, tail)
                count += n
                if not n and tail.offset == before:
                    break
            if count:
                log.info("job %s: %d events of its last run read after the restart", job["id"], count)
        except Exception:  # noqa: BLE001 - an unreadable events file must not stop the server's start
            log.exception("job %s: the events of its last run could not be read", job["id"])

    def _take_events(self, job_id: str, state: JobProgress, tail: "EventTail") -> int:
        """Apply the complete events appended since the tail's last read; store the job's columns
        and how far its events are read. Returns how many there were."""
        events = tail.read()
        for ev in events:
            state.apply(ev)
        if events:
            self.store.update(job_id, events_offset=tail.consumed, **state.columns())
        return len(events)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="faceid-job-runner", daemon=True)
        self._thread.start()

    def stop(self, timeout: Optional[float] = None) -> None:
        """Stop taking jobs; a running job gets SIGTERM (it saves last.pt), SIGKILL after the grace
        period, and ends `interrupted` so that it can be resumed."""
        self._stopping.set()
        with self._lock:
            current = self._current
            if current is not None:
                _kill_group(current.proc.pid, signal.SIGTERM)
                current.kill_at = time.monotonic() + self.cancel_grace_s
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout if timeout is not None else self.cancel_grace_s + 10)

    def wake(self) -> None:
        self._wake.set()

    def cancel(self, job_id: str) -> str:
        """'cancelled' (it was queued) or 'cancelling' (SIGTERM sent to its process group).
        Raises JobStateError when the job is neither queued nor running."""
        if self.store.cancel_queued(job_id):
            return "cancelled"
        if self.store.request_cancel(job_id):
            with self._lock:
                current = self._current
                if current is not None and current.job_id == job_id:
                    _kill_group(current.proc.pid, signal.SIGTERM)
                    if current.kill_at is None:
                        current.kill_at = time.monotonic() + self.cancel_grace_s
            self._wake.set()
            return "cancelling"
        job = self.store.get(job_id)
        status = job["status"] if job else "unknown"
        raise JobStateError(f"job {job_id} is {status}; only queued or running jobs can be cancelled")

    # -- the loop -----------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                job = self.store.next_queued()
            except Exception:  # the store is closing
                log.exception("job runner: cannot read the queue")
                job = None
            if job is None:
                self._wake.wait(1.0)
                continue
            try:
                self._run(job)
            except Exception as e:  # a bug here must not leave a job running forever
                log.exception("job runner: job %s", job["id"])
                self.store.update(job["id"], status="failed", finished_at=time.time(),
                                  error=f"internal error in the job runner: {type(e).__name__}: {e}"[:2000],
                                  error_kind="internal")

    def _run(self, job: dict[str, Any]) -> None:
        job_id = job["id"]
        job_dir = self.job_dir(job_id)
        job_dir.mkdir(parents=True, exist_ok=True)
        cfg_path = job_dir / "config.json"
        events_path = job_dir / "events.jsonl"
        log_path = job_dir / "output.log"
        config = dict(job["config"])
        if "crop" in config and "align" not in config:
            # stored whole before the option existed: the job resumes as it started, unaligned
            config["align"] = "none"
        _write_json_atomic(cfg_path, config)
        offset = events_path.stat().st_size if events_path.exists() else 0
        if not self.store.claim(job_id, events_offset=offset):  # a dead server's unread events start there
            return  # cancelled between next_queued and now
        attempt = (self.store.get(job_id) or job)["attempts"]
        cmd = [*self.trainer_cmd, "--config", str(cfg_path), "--events_file", str(events_path)]
        env = _child_env()
        with open(log_path, "ab") as out:
            out.write(f"--- attempt {attempt} started {time.strftime('%Y-%m-%dT%H:%M:%S%z')} ---\n".encode())
            out.flush()
            try:
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                        cwd=job_dir, env=env, start_new_session=True, close_fds=True)
            except OSError as e:
                self.store.update(job_id, status="failed", finished_at=time.time(), error_kind="internal",
                                  error=f"could not start the training process {cmd[0]!r}: {e.strerror or e}")
                return
        log.info("job %s: started training process %d", job_id, proc.pid)
        with self._lock:
            self._current = _Running(job_id, proc)
            # A cancel or stop() that came between claim() and here found no process to signal.
            if self._stopping.is_set() or (self.store.get(job_id) or {}).get("cancel_requested"):
                _kill_group(proc.pid, signal.SIGTERM)
                self._current.kill_at = time.monotonic() + self.cancel_grace_s
        self.store.update(job_id, pid=proc.pid)
        state = JobProgress.from_job(job)
        tail = EventTail(events_path, offset)
        try:
            while True:
                rc = proc.poll()
                self._take_events(job_id, state, tail)
                if rc is not None:
                    break
                with self._lock:
                    kill_at = self._current.kill_at if self._current else None
                if kill_at is not None and time.monotonic() >= kill_at:
                    log.warning("job %s: no exit %.0f s after SIGTERM; sending SIGKILL", job_id,
                                self.cancel_grace_s)
                    _kill_group(proc.pid, signal.SIGKILL)
                time.sleep(self.poll_interval_s)
        finally:
            # DataLoader workers of a killed trainer would linger in its group: end them too.
            _kill_group(proc.pid, signal.SIGKILL)
            with self._lock:
                self._current = None
        self._finish(job_id, job_dir, rc, state, log_path)

    def _settle(self, job_id: str, state: JobProgress, done: bool) -> None:
        """The progress a finished job shows: all of it when it succeeded (a time limit that ended
        it early included), else as far as it got, with no time left to wait for."""
        if state.progress:
            extra = {"percent": 100.0, "eta_s": 0.0} if done else {"eta_s": None}
            self.store.update(job_id, progress={**state.progress, **extra})

    def _finish(self, job_id: str, job_dir: Path, rc: int, state: JobProgress, log_path: Path) -> None:
        current = self.store.get(job_id) or {}
        now = time.time()
        self._settle(job_id, state, done=rc == 0)
        if rc == 0:
            ckpt = Path(state.checkpoint) if state.checkpoint else job_dir / "backbone_best.pt"
            if ckpt.is_file():
                # Serve the model first, then report success: a client that sees `succeeded` can
                # call /verify at once. A checkpoint that fails to load leaves the old model.
                if self.on_succeeded is not None:
                    try:
                        self.on_succeeded({**current, "checkpoint": str(ckpt)})
                    except Exception as e:
                        # Not `succeeded`: that status promises the model is served.
                        log.error("job %s: its checkpoint cannot be served: %s", job_id, e)
                        self.store.update(job_id, status="failed", finished_at=time.time(), exit_code=rc,
                                          pid=None, checkpoint=str(ckpt), error_kind="checkpoint",
                                          error=f"training finished, but its checkpoint cannot be served "
                                                f"({e}); the previous model stays"[:2000])
                        return
                self.store.update(job_id, status="succeeded", finished_at=time.time(), exit_code=rc,
                                  pid=None, checkpoint=str(ckpt), error=None)
                log.info("job %s succeeded: %s", job_id, ckpt)
                return
            self.store.update(job_id, status="failed", finished_at=now, exit_code=rc, pid=None,
                              error_kind="internal",
                              error=f"the training process exited without writing {ckpt.name}")
            return
        if current.get("cancel_requested"):
            self.store.update(job_id, status="cancelled", finished_at=now, exit_code=rc, pid=None,
                              error=None, error_kind=None)
            log.info("job %s cancelled", job_id)
            return
        if self._stopping.is_set():
            self.store.update(job_id, status="interrupted", finished_at=now, exit_code=rc, pid=None,
                              error=INTERRUPTED_MESSAGE.format(id=job_id))
            log.info("job %s interrupted by the server stopping", job_id)
            return
        if state.error:
            error = state.error
        else:
            last = [ln.strip() for ln in tail_lines(log_path, 20) if ln.strip() and not ln.startswith("--- attempt")]
            error = describe_exit(rc) + (f"; last output: {last[-1][:500]}" if last else "")
        self.store.update(job_id, status="failed", finished_at=now, exit_code=rc, pid=None, error=error,
                          error_kind=state.error_kind or ("internal" if rc != 2 else "config"))
        log.warning("job %s failed: %s", job_id, error)


def _child_env() -> dict[str, str]:
    """The server's environment minus its secrets and its own OpenMP wait default (training
    spins briefly instead, faceid/omp.py), with the faceid package importable."""
    env = training_child_env({k: v for k, v in os.environ.items() if k != "FACEID_API_KEY"})
    import faceid

    root = str(Path(faceid.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def process_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, exited but not yet reaped by its parent, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _is_our_trainer(pid: int, config_path: Path) -> bool:
    """True when process `pid` still runs with this job's config file (guards against pid reuse)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return str(config_path).encode() in cmdline
