"""The job store: one row per training job, and a small key-value table (the served model), in
the job database: SQLite at MODELS_DIR/jobs.db by default, or PostgreSQL when FACEID_DATABASE_URL
names one (faceid/database.py; the schema's migrations are applied when the store opens).

A job is a row here and a folder MODELS_DIR/jobs/<id>/ holding config.json, events.jsonl,
output.log and the checkpoints (app/runner.py runs it, app/progress.py reads its events).

States: queued -> running -> succeeded | failed | cancelled, and interrupted for a job that was
running when the server stopped; POST /jobs/{id}/resume puts such a job back in the queue with
`resume` pointing at its last.pt.

Several processes share the table (the server and `faceid worker`s on this or other hosts,
app/worker.py). A claim is one conditional UPDATE (queued -> running): on either engine the row is
locked by the first UPDATE and the second finds it no longer queued, so one job is claimed once
(what SELECT ... FOR UPDATE SKIP LOCKED would give, without holding a transaction open). A running
job names its `worker` and that worker renews `heartbeat_at`; a job whose heartbeat is older than
the lease is marked interrupted by whichever runner notices (interrupt_stale). Every value goes
through a ? parameter.
"""

from __future__ import annotations

import builtins
import json
import math
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Optional, Union

from faceid.database import AddColumn, Database, DatabaseOpenError, Migration
from faceid.errors import ConfigError

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled", "interrupted")
RESUMABLE = ("interrupted", "failed", "cancelled")
JOB_ID_LEN = 32
# Write transactions of the job store serialise among themselves (PostgreSQL advisory lock key).
LOCK_KEY = 0x46494A4F  # "FIJO"

MIGRATIONS = (
    Migration(
        1,
        "jobs and the key-value state",
        (
            """CREATE TABLE IF NOT EXISTS jobs (
    seq {pk},
    id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    config TEXT NOT NULL,
    created_at {float} NOT NULL,
    started_at {float},
    finished_at {float},
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
    attempts INTEGER NOT NULL DEFAULT 0
)""",
            "CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq)",
            "CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        ),
    ),
    Migration(2, "where a run's events start", (AddColumn("jobs", "events_offset", "{bigint}"),)),
    Migration(
        3,
        "job workers and their heartbeats",
        (AddColumn("jobs", "worker", "TEXT"), AddColumn("jobs", "heartbeat_at", "{float}")),
    ),
)
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
    """The job table and a small key-value table (the served model). Thread-safe: one connection
    behind a lock (faceid.database.Database); on SQLite in WAL mode, so readers do not wait for
    the runner's writes. `target`: the SQLite file, or a postgresql:// URL. Raises
    faceid.database.DatabaseOpenError when the database cannot be opened."""

    def __init__(self, target: Union[str, Path]) -> None:
        self.path = target
        self._db = Database.open(target, "jobs", MIGRATIONS, lock_key=LOCK_KEY)

    @property
    def where(self) -> str:
        return self._db.where

    def close(self) -> None:
        self._db.close()

    # -- jobs ---------------------------------------------------------------------------------

    @staticmethod
    def _to_dict(row: dict[str, Any]) -> dict[str, Any]:
        job = dict(row)
        for name in _JSON_COLUMNS:
            if job.get(name) is not None:
                job[name] = json.loads(job[name])
        job["cancel_requested"] = bool(job["cancel_requested"])
        return job

    def _count_queued(self) -> int:
        row = self._db.one("SELECT COUNT(*) FROM jobs WHERE status = 'queued'")
        return int(row[0]) if row else 0

    def _check_queue(self, max_queued: int) -> None:
        queued = self._count_queued()
        if queued >= max_queued:
            raise QueueFullError(
                f"{queued} jobs are already queued (the limit is {max_queued}); wait for some to finish or cancel some"
            )

    def create(self, job_id: str, config: dict[str, Any], max_queued: int) -> dict[str, Any]:
        with self._db.transaction() as db:
            self._check_queue(max_queued)
            db.run(
                "INSERT INTO jobs (id, status, config, created_at) VALUES (?, 'queued', ?, ?)",
                (job_id, json.dumps(config), time.time()),
            )
        job = self.get(job_id)
        assert job is not None
        return job

    def get(self, job_id: str) -> Optional[dict[str, Any]]:
        rows = self._db.dicts("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return self._to_dict(rows[0]) if rows else None

    def list(self, status: Optional[str] = None, limit: int = 100, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
        """Jobs newest first, and the total count matching `status`."""
        where, args = ("", ()) if status is None else (" WHERE status = ?", (status,))
        rows = self._db.dicts(f"SELECT * FROM jobs{where} ORDER BY seq DESC LIMIT ? OFFSET ?", (*args, limit, offset))
        total = self._db.one(f"SELECT COUNT(*) FROM jobs{where}", args)
        return [self._to_dict(r) for r in rows], int(total[0]) if total else 0

    def next_queued(self) -> Optional[dict[str, Any]]:
        rows = self._db.dicts("SELECT * FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 1")
        return self._to_dict(rows[0]) if rows else None

    @staticmethod
    def _params(names: builtins.list[str], values: dict[str, Any]) -> builtins.list[Any]:
        return [
            json.dumps(finite(values[n])) if n in _JSON_COLUMNS and values[n] is not None else values[n] for n in names
        ]

    def update(self, job_id: str, **values: Any) -> None:
        unknown = set(values) - _UPDATABLE
        if unknown:
            raise ValueError(f"not job columns: {sorted(unknown)}")
        if not values:
            return
        names = sorted(values)
        assignments = ", ".join(f"{n} = ?" for n in names)  # names come from _UPDATABLE only
        self._db.run(f"UPDATE jobs SET {assignments} WHERE id = ?", (*self._params(names, values), job_id))

    def _transition(self, job_id: str, allowed: Iterable[str], **values: Any) -> bool:
        """Set `values` only if the job's status is one of `allowed`; True when it was."""
        allowed = tuple(allowed)
        names = sorted(values)
        assert set(names) <= _UPDATABLE
        marks = ", ".join("?" for _ in allowed)
        assignments = ", ".join(f"{n} = ?" for n in names)
        changed = self._db.run(
            f"UPDATE jobs SET {assignments} WHERE id = ? AND status IN ({marks})",
            (*self._params(names, values), job_id, *allowed),
        )
        return changed == 1

    def claim(self, job_id: str, events_offset: Optional[int] = None, worker: Optional[str] = None) -> bool:
        """queued -> running, with where this run's events start in its events file and the worker
        that runs it (its first heartbeat); False when the job left the queue meanwhile (cancelled,
        or claimed by another worker: the UPDATE is conditional, so only one claim succeeds)."""
        now = time.time()
        changed = self._db.run(
            "UPDATE jobs SET status = 'running', started_at = ?, finished_at = NULL, error = NULL, "
            "error_kind = NULL, exit_code = NULL, cancel_requested = 0, attempts = attempts + 1, "
            "events_offset = ?, worker = ?, heartbeat_at = ? WHERE id = ? AND status = 'queued'",
            (now, events_offset, worker, now, job_id),
        )
        return changed == 1

    def cancel_queued(self, job_id: str) -> bool:
        return self._transition(job_id, ("queued",), status="cancelled", finished_at=time.time(), error=None)

    def request_cancel(self, job_id: str) -> bool:
        return self._transition(job_id, ("running",), cancel_requested=1)

    def requeue(self, job_id: str, config: dict[str, Any], max_queued: int) -> bool:
        with self._db.transaction():
            self._check_queue(max_queued)
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
        interrupted = []
        for row in self._db.dicts("SELECT * FROM jobs WHERE status = 'running'"):
            job = self._to_dict(row)
            error = INTERRUPTED_MESSAGE.format(id=job["id"])
            if self._transition(job["id"], ("running",), status="interrupted", finished_at=time.time(), error=error):
                interrupted.append(job)
        return interrupted

    def heartbeat(self, job_id: str, worker: str) -> bool:
        """Renew the lease of `worker` on its running job; False when the job is no longer running
        under that worker (marked interrupted after a missed lease, and perhaps resumed elsewhere)."""
        changed = self._db.run(
            "UPDATE jobs SET heartbeat_at = ? WHERE id = ? AND status = 'running' AND worker = ?",
            (time.time(), job_id, worker),
        )
        return changed == 1

    def cancel_requested(self, job_id: str) -> bool:
        """Whether a cancel of the job was asked for (by any process's API)."""
        row = self._db.one("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,))
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
        stale = (
            "status = 'running' AND (worker IS NULL OR heartbeat_at IS NULL OR heartbeat_at < ? "
            "OR (CAST(? AS TEXT) IS NOT NULL AND worker LIKE CAST(? AS TEXT) ESCAPE '!'))"
        )
        interrupted = []
        for row in self._db.dicts(f"SELECT * FROM jobs WHERE {stale}", params):
            job = self._to_dict(row)
            worker = job["worker"]
            if worker is None or (previous is not None and worker.startswith(previous)):
                error = INTERRUPTED_MESSAGE.format(id=job["id"])
            else:
                error = WORKER_LOST_MESSAGE.format(id=job["id"], worker=worker, lease=f"{lease_s:g}")
            changed = self._db.run(
                f"UPDATE jobs SET status = 'interrupted', finished_at = ?, error = ? WHERE id = ? AND {stale}",
                (now, error, job["id"], *params),
            )
            if changed == 1:
                interrupted.append({**job, "status": "interrupted", "finished_at": now, "error": error})
        return interrupted

    # -- key-value state ------------------------------------------------------------------------

    def get_state(self, key: str) -> Optional[Any]:
        row = self._db.one("SELECT value FROM state WHERE key = ?", (key,))
        return None if row is None else json.loads(row[0])

    def set_state(self, key: str, value: Any) -> None:
        self._db.run(
            "INSERT INTO state (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, json.dumps(value)),
        )


def open_job_store(target: Union[str, Path]) -> JobStore:
    """The job store, or a ConfigError that says what to fix."""
    try:
        return JobStore(target)
    except DatabaseOpenError as e:
        if isinstance(target, Path):
            raise ConfigError(
                f"the job database {target} cannot be opened ({e}); restore it from a backup, or move it away "
                "to start with an empty job history"
            ) from None
        raise ConfigError(
            f"the job database cannot be used ({e}); check FACEID_DATABASE_URL and that the PostgreSQL "
            "server is up and accepts this user"
        ) from None


INTERRUPTED_MESSAGE = (
    "the server stopped while this job was running; POST /jobs/{id}/resume continues it from its last.pt"
)
WORKER_LOST_MESSAGE = (
    "the worker {worker} running this job stopped renewing its heartbeat for {lease} s (it stopped, or "
    "lost the database); POST /jobs/{id}/resume continues it from its last.pt"
)
