"""The job store: one SQLite row per training job in MODELS_DIR/jobs.db, and a small key-value table.

A job is a row here and a folder MODELS_DIR/jobs/<id>/ holding config.json, events.jsonl,
output.log and the checkpoints (app/runner.py runs it, app/progress.py reads its events).

States: queued -> running -> succeeded | failed | cancelled, and interrupted for a job that was
running when the server stopped; POST /jobs/{id}/resume puts such a job back in the queue with
`resume` pointing at its last.pt.

Several processes share the table (the server and `faceid worker`s, app/worker.py): a claim is one
conditional UPDATE (queued -> running), so one job is claimed once; a running job names its
`worker` and that worker renews `heartbeat_at`, and a job whose heartbeat is older than the lease
is marked interrupted by whichever runner notices (interrupt_stale). Everything here is plain SQL
with ? parameters, so that another database can take SQLite's place behind the same methods.
"""

from __future__ import annotations

import builtins
import json
import math
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Optional

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
    worker TEXT,
    heartbeat_at REAL,
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
_UPDATABLE = frozenset(
    {
        "status",
        "config",
        "started_at",
        "finished_at",
        "progress",
        "metrics",
        "best",
        "thresholds",
        "checkpoint",
        "last_checkpoint",
        "device",
        "error",
        "error_kind",
        "exit_code",
        "pid",
        "cancel_requested",
        "attempts",
        "events_offset",
        "worker",
        "heartbeat_at",
    }
)
# Columns added after the first release, with their types: added in place to an older database
# Columns added after the first release: each one's statement, run on a database without it.
_ADDED_COLUMNS = {
    "events_offset": "ALTER TABLE jobs ADD COLUMN events_offset INTEGER",
    "worker": "ALTER TABLE jobs ADD COLUMN worker TEXT",
    "heartbeat_at": "ALTER TABLE jobs ADD COLUMN heartbeat_at REAL",
}


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
            for name, alter in _ADDED_COLUMNS.items():  # a database from before the column
                if name not in columns:
                    self._db.execute(alter)

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
                    raise QueueFullError(
                        f"{queued} jobs are already queued (the limit is {max_queued}); "
                        "wait for some to finish or cancel some"
                    )
                self._db.execute(
                    "INSERT INTO jobs (id, status, config, created_at) VALUES (?, 'queued', ?, ?)",
                    (job_id, json.dumps(config), time.time()),
                )
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
                rows = self._db.execute(
                    "SELECT * FROM jobs ORDER BY seq DESC LIMIT ? OFFSET ?", (limit, offset)
                ).fetchall()
                (total,) = self._db.execute("SELECT COUNT(*) FROM jobs").fetchone()
            else:
                rows = self._db.execute(
                    "SELECT * FROM jobs WHERE status = ? ORDER BY seq DESC LIMIT ? OFFSET ?", (status, limit, offset)
                ).fetchall()
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
        params = [
            json.dumps(finite(values[n])) if n in _JSON_COLUMNS and values[n] is not None else values[n] for n in names
        ]
        assignments = ", ".join(f"{n} = ?" for n in names)  # names come from _UPDATABLE only
        with self._lock:
            self._db.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*params, job_id))

    def _transition(self, job_id: str, allowed: Iterable[str], **values: Any) -> bool:
        """Set `values` only if the job's status is one of `allowed`; True when it was."""
        allowed = tuple(allowed)
        names = sorted(values)
        assert set(names) <= _UPDATABLE
        params = [json.dumps(values[n]) if n in _JSON_COLUMNS and values[n] is not None else values[n] for n in names]
        marks = ", ".join("?" for _ in allowed)
        assignments = ", ".join(f"{n} = ?" for n in names)
        with self._lock:
            cur = self._db.execute(
                f"UPDATE jobs SET {assignments} WHERE id = ? AND status IN ({marks})", (*params, job_id, *allowed)
            )
        return cur.rowcount == 1

    def claim(self, job_id: str, events_offset: Optional[int] = None, worker: Optional[str] = None) -> bool:
        """queued -> running, with where this run's events start in its events file and the worker
        that runs it (its first heartbeat); False when the job left the queue meanwhile (cancelled,
        or claimed by another worker: the UPDATE is conditional, so only one claim succeeds)."""
        with self._lock:
            job = self.get(job_id)
            if job is None:
                return False
            return self._transition(
                job_id,
                ("queued",),
                status="running",
                started_at=time.time(),
                finished_at=None,
                error=None,
                error_kind=None,
                exit_code=None,
                cancel_requested=0,
                attempts=job["attempts"] + 1,
                events_offset=events_offset,
                worker=worker,
                heartbeat_at=time.time(),
            )

    def cancel_queued(self, job_id: str) -> bool:
        return self._transition(job_id, ("queued",), status="cancelled", finished_at=time.time(), error=None)

    def request_cancel(self, job_id: str) -> bool:
        return self._transition(job_id, ("running",), cancel_requested=1)

    def requeue(self, job_id: str, config: dict[str, Any], max_queued: int) -> bool:
        with self._lock:
            (queued,) = self._db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued'").fetchone()
            if queued >= max_queued:
                raise QueueFullError(
                    f"{queued} jobs are already queued (the limit is {max_queued}); "
                    "wait for some to finish or cancel some"
                )
            return self._transition(
                job_id,
                RESUMABLE,
                status="queued",
                config=config,
                finished_at=None,
                error=None,
                error_kind=None,
                exit_code=None,
                pid=None,
                cancel_requested=0,
            )

    def interrupt_running(self) -> builtins.list[dict[str, Any]]:  # `list` here is JobStore.list
        """Mark jobs left `running` by a server that died as interrupted; return them."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs WHERE status = 'running'").fetchall()
            jobs = [self._to_dict(r) for r in rows]
            for job in jobs:
                self.update(
                    job["id"],
                    status="interrupted",
                    finished_at=time.time(),
                    error=INTERRUPTED_MESSAGE.format(id=job["id"]),
                )
        return jobs

    def heartbeat(self, job_id: str, worker: str) -> bool:
        """Renew the lease of `worker` on its running job; False when the job is no longer running
        under that worker (marked interrupted after a missed lease, and perhaps resumed elsewhere)."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE jobs SET heartbeat_at = ? WHERE id = ? AND status = 'running' AND worker = ?",
                (time.time(), job_id, worker),
            )
        return cur.rowcount == 1

    def cancel_requested(self, job_id: str) -> bool:
        """Whether a cancel of the job was asked for (by any process's API)."""
        with self._lock:
            row = self._db.execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bool(row and row[0])

    def interrupt_stale(self, lease_s: float, previous: Optional[str] = None) -> builtins.list[dict[str, Any]]:
        """Mark interrupted the running jobs whose worker stopped renewing its heartbeat for
        `lease_s` seconds, those with no worker (started before workers were recorded), and, with
        `previous` (a worker-id prefix), those of the workers it names whatever their heartbeat (a
        restarting server's previous incarnation); return them. Each is one conditional UPDATE, so
        a heartbeat that lands meanwhile keeps its job running."""
        now = time.time()
        pattern = None  # no previous incarnation: the LIKE below matches nothing
        if previous is not None:
            pattern = previous.replace("!", "!!").replace("%", "!%").replace("_", "!_") + "%"
        params = (now - lease_s, pattern, pattern)
        interrupted = []
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM jobs WHERE status = 'running' AND (worker IS NULL OR heartbeat_at IS NULL "
                "OR heartbeat_at < ? OR (? IS NOT NULL AND worker LIKE ? ESCAPE '!'))",
                params,
            ).fetchall()
            for row in rows:
                job = self._to_dict(row)
                worker = job["worker"]
                if worker is None or (previous is not None and worker.startswith(previous)):
                    error = INTERRUPTED_MESSAGE.format(id=job["id"])
                else:
                    error = WORKER_LOST_MESSAGE.format(id=job["id"], worker=worker, lease=f"{lease_s:g}")
                cur = self._db.execute(
                    "UPDATE jobs SET status = 'interrupted', finished_at = ?, error = ? WHERE id = ? AND "
                    "status = 'running' AND (worker IS NULL OR heartbeat_at IS NULL OR heartbeat_at < ? "
                    "OR (? IS NOT NULL AND worker LIKE ? ESCAPE '!'))",
                    (now, error, job["id"], *params),
                )
                if cur.rowcount == 1:
                    interrupted.append({**job, "status": "interrupted", "finished_at": now, "error": error})
        return interrupted

    # -- key-value state ------------------------------------------------------------------------

    def get_state(self, key: str) -> Optional[Any]:
        with self._lock:
            row = self._db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def set_state(self, key: str, value: Any) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO state (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, json.dumps(value)),
            )


INTERRUPTED_MESSAGE = (
    "the server stopped while this job was running; POST /jobs/{id}/resume continues it from its last.pt"
)
WORKER_LOST_MESSAGE = (
    "the worker {worker} running this job stopped renewing its heartbeat for {lease} s (it stopped, or "
    "lost the database); POST /jobs/{id}/resume continues it from its last.pt"
)
