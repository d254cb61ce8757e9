"""The job runner: executes queued jobs as child processes (utilities in app/processes.py).

The runner starts queued jobs one at a time as `<trainer_cmd> --config config.json --events_file
events.jsonl` (an argument list in its own process group, docs/CONTRACTS.md section 1), reads the
events the process appends (app/progress.py) and records them in the job store (app/store.py), so
a crash, an out-of-memory kill or a cancel of the training process never touches the server.

The same runner runs in the server and in each `faceid worker` (app/worker.py), all on one job
database: each records itself as the job's `worker` and renews its heartbeat while the job runs,
watches the database for a cancel asked through any process's API, and marks interrupted the jobs
of a runner whose heartbeat stopped (interrupt_stale).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from app.processes import (
    child_env,
    describe_exit,
    is_our_trainer,
    kill_group,
    process_alive,
    tail_lines,
    write_json_atomic,
)
from app.progress import EventTail, JobProgress
from app.store import INTERRUPTED_MESSAGE, JobStateError, JobStore

log = logging.getLogger(__name__)

SERVER_PREFIX = "server@"  # the worker id of a server's own runner starts so


def default_worker_id(server: bool = False) -> str:
    """hostname:pid, and `server@` before it for the runner inside a server."""
    return f"{SERVER_PREFIX if server else ''}{socket.gethostname()}:{os.getpid()}"


# -- runner ---------------------------------------------------------------------------------------


@dataclass
class _Running:
    job_id: str
    proc: subprocess.Popen
    kill_at: Optional[float] = None


class JobRunner:
    """Runs queued jobs one at a time in a background thread."""

    def __init__(
        self,
        *,
        store: JobStore,
        jobs_dir: Path,
        trainer_cmd: Iterable[str],
        cancel_grace_s: float = 30.0,
        poll_interval_s: float = 0.5,
        on_succeeded: Optional[Callable[[dict[str, Any]], None]] = None,
        worker_id: Optional[str] = None,
        lease_s: float = 30.0,
    ) -> None:
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
        self.worker_id = worker_id or default_worker_id()
        self.lease_s = lease_s
        self.heartbeat_s = lease_s / 3
        self._next_reap = 0.0
        self._claims = True
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._current: Optional[_Running] = None
        self._thread: Optional[threading.Thread] = None

    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    # -- lifecycle ----------------------------------------------------------------------------

    def recover(self) -> list[dict[str, Any]]:
        """At start: mark interrupted the jobs left running by a dead runner (a server's runner
        marks those of its previous incarnation at once, and those of other workers once their
        heartbeat is older than the lease), and stop their training processes if they outlived it
        on this host (same process group, same config file)."""
        previous = SERVER_PREFIX if self.worker_id.startswith(SERVER_PREFIX) else None
        return self._settle_interrupted(self.store.interrupt_stale(self.lease_s, previous=previous))

    def reap(self) -> list[dict[str, Any]]:
        """Mark interrupted the running jobs whose worker's heartbeat is older than the lease (a
        worker killed, or cut off from the database); every runner does this periodically."""
        self._next_reap = time.monotonic() + self.heartbeat_s
        try:
            jobs = self.store.interrupt_stale(self.lease_s)
        except Exception:  # the store is closing, or busy: the next round tries again
            log.exception("job runner: cannot check the running jobs' heartbeats")
            return []
        return self._settle_interrupted(jobs)

    def _settle_interrupted(self, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for job in jobs:
            pid = job.get("pid")
            if pid and is_our_trainer(pid, self.job_dir(job["id"]) / "config.json"):
                log.warning("job %s: stopping its training process %d, left over from the last server", job["id"], pid)
                kill_group(pid, signal.SIGTERM)
                deadline = time.monotonic() + min(self.cancel_grace_s, 10.0)
                while time.monotonic() < deadline and process_alive(pid):
                    time.sleep(0.1)
                kill_group(pid, signal.SIGKILL)
            self._catch_up(job)
            log.warning("job %s interrupted: %s", job["id"], job["error"])
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
        except Exception:
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

    def start(self, claim: bool = True) -> None:
        """Start the runner's thread; with `claim` False (an API-only server) it runs no job and
        only marks interrupted the jobs of workers whose heartbeat stopped."""
        self._claims = claim
        self._thread = threading.Thread(target=self._loop, name="faceid-job-runner", daemon=True)
        self._thread.start()

    def stop(self, timeout: Optional[float] = None) -> None:
        """Stop taking jobs; a running job gets SIGTERM (it saves last.pt), SIGKILL after the grace
        period, and ends `interrupted` so that it can be resumed."""
        self._stopping.set()
        with self._lock:
            current = self._current
            if current is not None:
                kill_group(current.proc.pid, signal.SIGTERM)
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
                    kill_group(current.proc.pid, signal.SIGTERM)
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
                job = self.store.next_queued() if self._claims else None
            except Exception:  # the store is closing
                log.exception("job runner: cannot read the queue")
                job = None
            if time.monotonic() >= self._next_reap:
                self.reap()
            if job is None:
                self._wake.wait(1.0)
                continue
            try:
                self._run(job)
            except Exception as e:  # a bug here must not leave a job running forever
                log.exception("job runner: job %s", job["id"])
                self.store.update(
                    job["id"],
                    status="failed",
                    finished_at=time.time(),
                    error=f"internal error in the job runner: {type(e).__name__}: {e}"[:2000],
                    error_kind="internal",
                )

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
        offset = events_path.stat().st_size if events_path.exists() else 0
        if not self.store.claim(job_id, events_offset=offset, worker=self.worker_id):
            return  # cancelled or claimed by another worker between next_queued and now
        # only the worker that claimed the job writes into its folder
        write_json_atomic(cfg_path, config)
        log.info("job %s: claimed by worker %s", job_id, self.worker_id)
        attempt = (self.store.get(job_id) or job)["attempts"]
        cmd = [*self.trainer_cmd, "--config", str(cfg_path), "--events_file", str(events_path)]
        env = child_env()
        with open(log_path, "ab") as out:
            out.write(f"--- attempt {attempt} started {time.strftime('%Y-%m-%dT%H:%M:%S%z')} ---\n".encode())
            out.flush()
            try:
                proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=job_dir,
                    env=env,
                    start_new_session=True,
                    close_fds=True,
                )
            except OSError as e:
                self.store.update(
                    job_id,
                    status="failed",
                    finished_at=time.time(),
                    error_kind="internal",
                    error=f"could not start the training process {cmd[0]!r}: {e.strerror or e}",
                )
                return
        log.info("job %s: started training process %d", job_id, proc.pid)
        with self._lock:
            self._current = _Running(job_id, proc)
            # A cancel or stop() that came between claim() and here found no process to signal.
            if self._stopping.is_set() or (self.store.get(job_id) or {}).get("cancel_requested"):
                kill_group(proc.pid, signal.SIGTERM)
                self._current.kill_at = time.monotonic() + self.cancel_grace_s
        self.store.update(job_id, pid=proc.pid)
        state = JobProgress.from_job(job)
        tail = EventTail(events_path, offset)
        lost = False
        next_beat = time.monotonic() + self.heartbeat_s
        try:
            while True:
                rc = proc.poll()
                if not lost:
                    self._take_events(job_id, state, tail)
                if rc is not None:
                    break
                if not lost and time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + self.heartbeat_s
                    if not self.store.heartbeat(job_id, self.worker_id):
                        # marked interrupted after a missed lease (and perhaps resumed elsewhere):
                        # the job is no longer this runner's to run or record
                        log.error(
                            "job %s: no longer running under worker %s; stopping its training", job_id, self.worker_id
                        )
                        lost = True
                        self._terminate(proc)
                    if time.monotonic() >= self._next_reap:
                        self.reap()  # other workers' jobs
                if not lost and self.store.cancel_requested(job_id):  # asked through any process's API
                    self._terminate(proc)
                with self._lock:
                    kill_at = self._current.kill_at if self._current else None
                if kill_at is not None and time.monotonic() >= kill_at:
                    log.warning("job %s: no exit %.0f s after SIGTERM; sending SIGKILL", job_id, self.cancel_grace_s)
                    kill_group(proc.pid, signal.SIGKILL)
                time.sleep(self.poll_interval_s)
        finally:
            # DataLoader workers of a killed trainer would linger in its group: end them too.
            kill_group(proc.pid, signal.SIGKILL)
            with self._lock:
                self._current = None
        if lost:
            return
        self._finish(job_id, job_dir, rc, state, log_path)

    def _terminate(self, proc: subprocess.Popen) -> None:
        """SIGTERM to the running trainer's group (it saves last.pt), SIGKILL after the grace period."""
        with self._lock:
            current = self._current
            if current is not None and current.proc is proc and current.kill_at is None:
                kill_group(proc.pid, signal.SIGTERM)
                current.kill_at = time.monotonic() + self.cancel_grace_s

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
                        self.store.update(
                            job_id,
                            status="failed",
                            finished_at=time.time(),
                            exit_code=rc,
                            pid=None,
                            checkpoint=str(ckpt),
                            error_kind="checkpoint",
                            error=f"training finished, but its checkpoint cannot be served "
                            f"({e}); the previous model stays"[:2000],
                        )
                        return
                self.store.update(
                    job_id,
                    status="succeeded",
                    finished_at=time.time(),
                    exit_code=rc,
                    pid=None,
                    checkpoint=str(ckpt),
                    error=None,
                )
                log.info("job %s succeeded: %s", job_id, ckpt)
                return
            self.store.update(
                job_id,
                status="failed",
                finished_at=now,
                exit_code=rc,
                pid=None,
                error_kind="internal",
                error=f"the training process exited without writing {ckpt.name}",
            )
            return
        if current.get("cancel_requested"):
            self.store.update(
                job_id, status="cancelled", finished_at=now, exit_code=rc, pid=None, error=None, error_kind=None
            )
            log.info("job %s cancelled", job_id)
            return
        if self._stopping.is_set():
            self.store.update(
                job_id,
                status="interrupted",
                finished_at=now,
                exit_code=rc,
                pid=None,
                error=INTERRUPTED_MESSAGE.format(id=job_id),
            )
            log.info("job %s interrupted by the server stopping", job_id)
            return
        if state.error:
            error = state.error
        else:
            last = [ln.strip() for ln in tail_lines(log_path, 20) if ln.strip() and not ln.startswith("--- attempt")]
            error = describe_exit(rc) + (f"; last output: {last[-1][:500]}" if last else "")
        self.store.update(
            job_id,
            status="failed",
            finished_at=now,
            exit_code=rc,
            pid=None,
            error=error,
            error_kind=state.error_kind or ("internal" if rc != 2 else "config"),
        )
        log.warning("job %s failed: %s", job_id, error)
