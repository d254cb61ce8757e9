"""`faceid worker`: a job runner in a process of its own, next to an API-only server.

    FACEID_MODELS_DIR=/srv/models faceid worker

It opens the job database in FACEID_MODELS_DIR (the same folder as the server's: jobs, checkpoints
and the database live there) and runs app/runner.py's JobRunner as the server does: it claims the
queued jobs one at a time, records itself as each job's `worker` and renews its heartbeat, stops a
job cancelled through the API, and marks interrupted the jobs of workers whose heartbeat stopped
(FACEID_WORKER_LEASE_S). SIGTERM or SIGINT stops it as the server stops: its job gets SIGTERM, saves
last.pt and ends `interrupted`, resumable by any worker. It serves no model: the server follows the
jobs that succeed (app/model_manager.py, follow_jobs).
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from typing import Any, Optional

log = logging.getLogger("app.worker")


def run_worker(worker_id: Optional[str] = None) -> int:
    """Run jobs until SIGTERM or SIGINT; 0 when stopped so."""
    from app.runner import JobRunner, default_worker_id  # here: `faceid --help` stays light
    from app.settings import load_settings, prepare_dirs
    from app.store import open_job_store

    s = prepare_dirs(load_settings())
    store = open_job_store(s.jobs_database)
    runner = JobRunner(
        store=store,
        jobs_dir=s.jobs_dir,
        trainer_cmd=s.trainer_cmd,
        cancel_grace_s=s.cancel_grace_s,
        poll_interval_s=s.poll_interval_s,
        worker_id=worker_id or default_worker_id(),
        lease_s=s.worker_lease_s,
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        log.info("worker %s: %s received; stopping", runner.worker_id, signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        runner.recover()
        runner.start()
        log.info("worker %s: running the jobs of %s", runner.worker_id, s.models_dir)
        stop.wait()
        runner.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        store.close()
    log.info("worker %s: stopped", runner.worker_id)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    return run_worker(args.id)


def add_parser(sub: Any) -> None:
    w = sub.add_parser(
        "worker",
        help="run training jobs from the job database, next to a server started with FACEID_RUN_JOBS=0",
        description="Claim queued jobs from the job database in FACEID_MODELS_DIR and run them as the "
        "server's runner does (settings: the FACEID_* environment; docs/SERVICE.md, Job workers). "
        "SIGTERM or Ctrl-C stops it; its running job ends interrupted and resumable.",
    )
    w.add_argument("--id", default=None, help="this worker's name in the jobs' `worker` field (default: hostname:pid)")
    w.set_defaults(func=cmd_worker)
