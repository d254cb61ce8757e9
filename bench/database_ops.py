"""The job database's statements per second: SQLite against PostgreSQL, side by side in one run.

What the service's processes do to the job database while jobs run: a runner renews its job's
heartbeat and reads the job's cancel flag, the progress reader writes progress, the API reads a job
and the served-model record, inference servers read that record and the galleries' change
counter, and workers claim jobs. Each is timed through the stores themselves (app/store.py,
faceid/gallery_store.py), over the loopback for PostgreSQL: `rounds` alternating blocks of each
engine, the median block reported, and the PostgreSQL/SQLite time ratio.

PostgreSQL: `--postgres URL` (an empty database), else a server started for the run from Debian's
postgresql package in a temporary folder (tests/postgres_server.py; fsync off there, so its
writes are cheaper than on a production server).

    python bench/database_ops.py
    python bench/database_ops.py --postgres postgresql://faceid@db:5432/bench --seconds 0.5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from app.store import JobStore  # noqa: E402
from faceid.gallery_store import GalleryStore  # noqa: E402


def operations(jobs: JobStore, galleries: GalleryStore) -> dict[str, Callable[[int], None]]:
    """name -> one call of it (given a counter)."""
    running = "r" * 32
    jobs.create(running, {"epochs": 1}, max_queued=10**9)
    jobs.claim(running, worker="bench")
    jobs.set_state("model", {"checkpoint": "/models/jobs/x/backbone_best.pt", "loaded_at": 1.0})
    progress = {"phase": "train", "epoch": 3, "step": 100, "steps": 200, "images_per_s": 71.5, "eta_s": 420.0}

    def claim(i: int) -> None:
        job_id = f"{i:032x}"
        jobs.create(job_id, {"epochs": 1}, max_queued=10**9)
        job = jobs.next_queued()
        assert job is not None and jobs.claim(job["id"], worker="bench")

    return {
        "heartbeat": lambda i: jobs.heartbeat(running, "bench") or None,
        "cancel flag": lambda i: jobs.cancel_requested(running) or None,
        "progress write": lambda i: jobs.update(running, progress={**progress, "step": i}),
        "GET /jobs/{id} read": lambda i: jobs.get(running) and None,
        "served-model read": lambda i: jobs.get_state("model") and None,
        "galleries' counter": lambda i: galleries.data_version() and None,
        "create + claim": claim,
    }


def block(op: Callable[[int], None], seconds: float, start: int) -> tuple[float, int]:
    """Calls per second over about `seconds`; the next counter."""
    i, t0 = start, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        op(i)
        i += 1
    return (i - start) / elapsed, i


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--postgres", default=None, help="URL of an empty PostgreSQL database (default: start one)")
    p.add_argument("--seconds", type=float, default=0.3, help="length of one timed block")
    p.add_argument("--rounds", type=int, default=5, help="alternating blocks per engine and operation")
    args = p.parse_args()

    server = None
    url = args.postgres
    if url is None:
        from postgres_server import PostgresServer

        server = PostgresServer()
        url = server.new_database()
    tmp = Path(tempfile.mkdtemp(prefix="faceid-dbops-"))
    try:
        engines = {
            "sqlite": operations(JobStore(tmp / "jobs.db"), GalleryStore(tmp / "galleries.db")),
            "postgresql": operations(JobStore(url), GalleryStore(url)),
        }
        print(f"{'operation':<22} {'SQLite /s':>11} {'PostgreSQL /s':>14} {'PG time / SQLite time':>22}")
        counters = {"sqlite": 10**6, "postgresql": 10**6}
        for name in engines["sqlite"]:
            rates: dict[str, list[float]] = {"sqlite": [], "postgresql": []}
            for _ in range(args.rounds):
                for engine, ops in engines.items():
                    rate, counters[engine] = block(ops[name], args.seconds, counters[engine])
                    rates[engine].append(rate)
            lite, pg = statistics.median(rates["sqlite"]), statistics.median(rates["postgresql"])
            print(f"{name:<22} {lite:>11,.0f} {pg:>14,.0f} {lite / pg:>21.1f}x")
    finally:
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
