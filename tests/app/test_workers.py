"""Job workers in processes of their own: an API-only server (FACEID_RUN_JOBS=0), `faceid worker`
processes and stateless inference servers on one models folder, with the fake trainer (each job
about a second) and the fake verifier (the server loads the fake trainer's checkpoints). The whole
set runs twice: on the models folder's SQLite files, and on a real PostgreSQL server
(FACEID_DATABASE_URL; tests/postgres_server.py), as the deployment examples in deploy/ run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import httpx
import pytest
from real_server import REPO, _free_port
from service_helpers import FAKE_TRAINER, MODE, image_bytes, person_image

from app.store import JobStore
from faceid.gallery_store import GalleryStore

HERE = Path(__file__).resolve().parent
LEASE_S = 3.0
# A stateless inference server with the tests' verifier loader, as `FACEID_ROLE=inference faceid serve`
# starts one.
INFERENCE = (
    "import sys, uvicorn; sys.path.insert(0, {here!r}); from service_helpers import fake_loader; "
    "from app.replica_app import create_replica_app; uvicorn.run(create_replica_app(verifier_loader=fake_loader), "
    "host='127.0.0.1', port={port}, log_level='warning')"
)

# An API-only server with the tests' verifier loader, as `faceid serve` starts one.
SERVER = (
    "import sys, uvicorn; sys.path.insert(0, {here!r}); from service_helpers import fake_loader; "
    "from app.main import create_app; uvicorn.run(create_app(verifier_loader=fake_loader), host='127.0.0.1', "
    "port={port}, log_level='warning')"
)


def wait(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


class Cluster:
    """One API-only server and `faceid worker` processes on one models folder."""

    def __init__(self, tmp: Path, database_url: Optional[str] = None) -> None:
        self.tmp = tmp
        self.models = tmp / "models"
        data = tmp / "data"
        for split in ("train", "val"):
            for person in ("ann", "bob"):
                (data / "sample" / split / person).mkdir(parents=True)
                (data / "sample" / split / person / "1.jpg").write_bytes(image_bytes())
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FACEID_")}
        self.env.update(
            FACEID_DATA_DIR=str(data),
            FACEID_MODELS_DIR=str(self.models),
            # each step 0.1 s: a job takes about a second, so that both workers get some
            FACEID_TRAINER_CMD=f"{sys.executable} {FAKE_TRAINER} --step_s 0.1",
            FACEID_WORKER_LEASE_S=str(LEASE_S),
            FACEID_CANCEL_GRACE_S="5",
            PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        )
        self.database_url = database_url
        if database_url:
            self.env["FACEID_DATABASE_URL"] = database_url
        self.workers: dict[str, subprocess.Popen] = {}
        self.inference: dict[str, subprocess.Popen] = {}  # base URL -> process
        self.logs: list[Path] = []
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.client = httpx.Client(base_url=self.base, timeout=30)
        self.start_server()

    def start_server(self) -> None:
        """The API-only server (again, after stop_server: the same port and models folder)."""
        self.server = self._spawn(
            "server", [sys.executable, "-c", SERVER.format(here=str(HERE), port=self.port)], FACEID_RUN_JOBS="0"
        )

        def up() -> bool:
            assert self.server.poll() is None, self.log_tail()
            try:
                return self.client.get("/health").status_code == 200
            except httpx.TransportError:
                return False

        wait(up, 60, "the API-only server")

    def stop_server(self) -> None:
        self.server.terminate()
        rc = self.server.wait(timeout=30)
        # uvicorn shuts down gracefully, then exits by the signal it caught (-15)
        assert rc in (0, -signal.SIGTERM), f"rc {rc}\n{self.log_tail()}"

    def _spawn(self, name: str, cmd: list[str], **env: str) -> subprocess.Popen:
        log = self.tmp / f"{name}.log"
        self.logs.append(log)
        with open(log, "ab") as out:
            return subprocess.Popen(cmd, cwd=REPO, env={**self.env, **env}, stdout=out, stderr=subprocess.STDOUT)

    def start_worker(self) -> str:
        """A `faceid worker`; its id (hostname:pid)."""
        n = len(self.logs)
        proc = self._spawn(
            f"worker{n}", [sys.executable, "-c", "import sys; from faceid.cli import main; sys.exit(main())", "worker"]
        )
        worker_id = f"{socket.gethostname()}:{proc.pid}"
        self.workers[worker_id] = proc
        return worker_id

    def start_inference(self) -> str:
        """A stateless inference server on the same models folder; its base URL once it answers."""
        port = _free_port()
        base = f"http://127.0.0.1:{port}"
        proc = self._spawn(
            f"inference{len(self.logs)}",
            [sys.executable, "-c", INFERENCE.format(here=str(HERE), port=port)],
            FACEID_ROLE="inference",
        )
        self.inference[base] = proc

        def up() -> bool:
            assert proc.poll() is None, self.log_tail()
            try:
                return httpx.get(base + "/health", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        wait(up, 60, f"the inference server on {base}")
        return base

    def ensure_workers(self, n: int = 2) -> list[str]:
        for worker_id, proc in list(self.workers.items()):
            if proc.poll() is not None:
                del self.workers[worker_id]
        while len(self.workers) < n:
            self.start_worker()
        return list(self.workers)

    def submit(self, **changes: object) -> str:
        body = {"train": "sample/train", "val": "sample/val", "epochs": 2, "img_size": 32, **changes}
        r = self.client.post("/jobs", json=body)
        assert r.status_code == 202, r.text
        return r.json()["id"]

    def job(self, job_id: str) -> dict:
        r = self.client.get(f"/jobs/{job_id}")
        assert r.status_code == 200, r.text
        return r.json()

    def wait_job(self, job_id: str, until: tuple[str, ...], timeout: float = 30) -> dict:
        seen: dict = {}

        def done() -> bool:
            seen.update(self.job(job_id))
            return seen["status"] in until

        try:
            wait(done, timeout, f"job {job_id} to be {until}")
        except AssertionError:
            raise AssertionError(f"job {job_id}: {seen}\n{self.log_tail()}") from None
        return seen

    def log_tail(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in self.logs if p.exists())

    def close(self) -> None:
        self.client.close()
        procs = [*self.workers.values(), *self.inference.values(), self.server]
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def cluster(request, tmp_path_factory) -> Iterator[Cluster]:
    url = request.getfixturevalue("postgres").new_database() if request.param == "postgresql" else None
    c = Cluster(tmp_path_factory.mktemp("workers"), database_url=url)
    try:
        c.ensure_workers(2)
        yield c
    finally:
        c.close()


def test_two_workers_share_three_jobs_and_run_each_once(cluster):
    workers = cluster.ensure_workers(2)
    ids = [cluster.submit() for _ in range(3)]
    jobs = [cluster.wait_job(job_id, ("succeeded", "failed", "cancelled", "interrupted")) for job_id in ids]
    assert [j["status"] for j in jobs] == ["succeeded"] * 3, jobs
    assert all(j["attempts"] == 1 for j in jobs)
    assert {j["worker"] for j in jobs} == set(workers), [j["worker"] for j in jobs]
    for job_id in ids:  # one training process each: one attempt in its log, one start event
        folder = cluster.models / "jobs" / job_id
        assert (folder / "output.log").read_text().count("--- attempt") == 1
        events = [json.loads(line) for line in (folder / "events.jsonl").read_text().splitlines()]
        assert [e["event"] for e in events].count("start") == 1


def test_the_api_only_server_serves_a_job_that_succeeded_in_a_worker(cluster):
    cluster.ensure_workers(2)
    job_id = cluster.submit()
    job = cluster.wait_job(job_id, ("succeeded", "failed"))
    assert job["status"] == "succeeded" and job["worker"] in cluster.workers

    def served() -> bool:
        r = cluster.client.get("/model")
        return r.status_code == 200 and r.json()["id"] == job_id

    wait(served, 8, f"GET /model to name job {job_id}")
    model = cluster.client.get("/model").json()
    assert model["checkpoint"] == job["checkpoint"] and model["source"] == "job"
    r = cluster.client.post(
        "/verify",
        files={"image1": ("a.jpg", image_bytes(), "image/jpeg"), "image2": ("b.jpg", image_bytes(), "image/jpeg")},
    )
    assert r.status_code == 200 and r.json()["match"] is True, r.text


def test_stateless_inference_servers_answer_with_the_newest_model_within_seconds(cluster):
    servers = [cluster.start_inference(), cluster.start_inference()]
    cluster.ensure_workers(2)
    pair = {"image1": ("a.jpg", image_bytes(), "image/jpeg"), "image2": ("b.jpg", image_bytes(), "image/jpeg")}
    for job_round in range(2):  # a model, then a newer one: each server switches to it
        job_id = cluster.submit()
        job = cluster.wait_job(job_id, ("succeeded", "failed"))
        assert job["status"] == "succeeded", job
        t_done = time.monotonic()
        for base in servers:

            def answers(base: str = base, job_id: str = job_id) -> bool:
                r = httpx.post(base + "/verify", files=pair, timeout=10)
                return r.status_code == 200 and r.json()["model"] == job_id

            wait(answers, 10, f"{base} to answer with job {job_id} (round {job_round + 1})")
        assert time.monotonic() - t_done < 10
    # what they do not serve, they say where to find
    r = httpx.get(servers[0] + "/jobs", timeout=10)
    assert r.status_code == 404 and "on the main server" in r.json()["detail"], r.text

    # galleries: enrolled through the API server, identified by every inference server
    assert cluster.client.post("/galleries", json={"name": "staff"}).status_code == 201
    for p in range(3):
        photos = [("images", (f"{s}.png", person_image(p, 6, s), "image/png")) for s in range(2)]
        r = cluster.client.post(f"/galleries/staff/people/person_{p}/faces", files=photos)
        assert r.status_code == 201, r.text
    probe = {"image": ("probe.png", person_image(1, 6, 99), "image/png")}

    def named(base: str, who: object) -> bool:
        r = httpx.post(base + "/galleries/staff/identify", files=probe, timeout=10)
        return r.status_code == 200 and r.json()["person"] == who

    for base in servers:
        wait(lambda base=base: named(base, "person_1"), 10, f"{base} to identify person_1")
    # a deletion through the API server reaches them too
    assert cluster.client.delete("/galleries/staff/people/person_1").status_code == 200
    for base in servers:
        wait(lambda base=base: named(base, None), 10, f"{base} to forget person_1")


def test_nothing_is_lost_when_the_api_server_restarts(cluster):
    cluster.ensure_workers(2)
    before = cluster.submit()
    cluster.wait_job(before, ("succeeded",))
    wait(lambda: cluster.client.get("/model").json().get("id") == before, 30, "the model served")
    assert cluster.client.post("/galleries", json={"name": "kept"}).status_code == 201
    photos = [("images", (f"{s}.png", person_image(7, 6, s), "image/png")) for s in range(2)]
    assert cluster.client.post("/galleries/kept/people/person_7/faces", files=photos).status_code == 201
    jobs = [cluster.submit() for _ in range(3)]  # queued or running in the workers while the API is down
    listed = {j["id"]: j for j in cluster.client.get("/jobs?limit=1000").json()["jobs"]}

    cluster.stop_server()
    cluster.start_server()

    after = {j["id"]: j for j in cluster.client.get("/jobs?limit=1000").json()["jobs"]}
    assert set(listed) <= set(after)
    assert after[before]["status"] == "succeeded" and after[before]["metrics"] == listed[before]["metrics"]
    for job_id in jobs:  # each runs once, in a worker, whatever the API server did meanwhile
        done = cluster.wait_job(job_id, ("succeeded", "failed", "interrupted"))
        assert done["status"] == "succeeded" and done["attempts"] == 1, done
    probe = {"image": ("probe.png", person_image(7, 6, 99), "image/png")}
    r = cluster.client.post("/galleries/kept/identify", files=probe)
    assert r.status_code == 200 and r.json()["person"] == "person_7", r.text
    # and the server, back, serves the job that succeeded last
    newest = max((cluster.job(j) for j in jobs), key=lambda j: j["finished_at"])["id"]
    wait(lambda: cluster.client.get("/model").json().get("id") == newest, 30, f"the model of job {newest}")


def test_a_cancel_through_the_api_stops_the_job_in_its_worker(cluster):
    cluster.ensure_workers(2)
    job_id = cluster.submit(seed=MODE.SLOW)
    job = cluster.wait_job(job_id, ("running",))
    wait(lambda: cluster.job(job_id)["progress"], 15, "the job's first progress")
    r = cluster.client.post(f"/jobs/{job_id}/cancel")
    assert r.status_code == 202 and r.json()["cancel_requested"] is True, r.text
    done = cluster.wait_job(job_id, ("cancelled", "failed", "succeeded", "interrupted"), timeout=20)
    assert done["status"] == "cancelled", done
    assert done["worker"] == job["worker"] and done["worker"] in cluster.workers
    assert (cluster.models / "jobs" / job_id / "last.pt").exists()  # the trainer stopped on SIGTERM
    assert cluster.workers[done["worker"]].poll() is None  # the worker goes on


def test_a_killed_workers_job_ends_interrupted_and_another_worker_resumes_it(cluster):
    cluster.ensure_workers(2)
    job_id = cluster.submit(seed=MODE.SLOW)
    job = cluster.wait_job(job_id, ("running",))
    wait(lambda: cluster.job(job_id)["progress"], 15, "the job's first progress")
    victim = job["worker"]
    cluster.workers[victim].send_signal(signal.SIGKILL)
    cluster.workers[victim].wait()
    killed_at = time.monotonic()
    interrupted = cluster.wait_job(job_id, ("interrupted", "failed", "succeeded", "cancelled"), timeout=LEASE_S + 15)
    assert interrupted["status"] == "interrupted", interrupted
    assert time.monotonic() - killed_at >= LEASE_S - 1.5  # not before its lease ran out
    assert victim in interrupted["error"] and "resume" in interrupted["error"]
    # its orphaned trainer was stopped on this host, and saved last.pt
    wait(lambda: (cluster.models / "jobs" / job_id / "last.pt").exists(), 10, "last.pt")
    r = cluster.client.post(f"/jobs/{job_id}/resume")
    assert r.status_code == 202, r.text
    done = cluster.wait_job(job_id, ("succeeded", "failed", "cancelled", "interrupted"), timeout=30)
    assert done["status"] == "succeeded", done
    assert done["worker"] != victim and done["worker"] in cluster.workers and done["attempts"] == 2


def test_a_worker_stopped_with_sigterm_interrupts_its_job_resumably(cluster):
    cluster.ensure_workers(2)
    job_id = cluster.submit(seed=MODE.SLOW)
    cluster.wait_job(job_id, ("running",))
    wait(lambda: cluster.job(job_id)["progress"], 15, "the job's first progress")
    worker = cluster.job(job_id)["worker"]
    proc = cluster.workers[worker]
    proc.terminate()
    assert proc.wait(timeout=20) == 0
    job = cluster.job(job_id)  # interrupted by the worker itself, before it exited: no lease to wait for
    assert job["status"] == "interrupted" and job["last_checkpoint"], job
    assert (cluster.models / "jobs" / job_id / "last.pt").exists()
    cluster.ensure_workers(2)
    assert cluster.client.post(f"/jobs/{job_id}/resume").status_code == 202
    done = cluster.wait_job(job_id, ("succeeded", "failed", "cancelled", "interrupted"), timeout=30)
    assert done["status"] == "succeeded" and done["worker"] != worker, done


def test_jobs_and_galleries_live_in_the_database_the_url_names(cluster):
    cluster.client.post("/galleries", json={"name": "where"})
    job_id = cluster.submit()
    listed = {j["id"] for j in cluster.client.get("/jobs").json()["jobs"]}
    assert job_id in listed
    files = {p.name for p in cluster.models.glob("*.db")}
    store = JobStore(cluster.database_url or cluster.models / "jobs.db")
    try:
        assert {j["id"] for j in store.list()[0]} == listed
    finally:
        store.close()
    gallery = GalleryStore(cluster.database_url or cluster.models / "galleries.db")
    try:
        assert "where" in gallery.gallery_names()
    finally:
        gallery.close()
    assert files == (set() if cluster.database_url else {"jobs.db", "galleries.db"})


# -- the store across processes -------------------------------------------------------------------


def test_a_lease_interrupts_only_jobs_without_a_recent_heartbeat(tmp_path):
    store = JobStore(tmp_path / "jobs.db")
    for job_id, worker in (("a" * 32, "host:1"), ("b" * 32, "host:2"), ("c" * 32, "server@host:3")):
        store.create(job_id, {}, 10)
        assert store.claim(job_id, worker=worker)
        assert not store.claim(job_id, worker="other")  # running already
    store.update("b" * 32, heartbeat_at=time.time() - 100)
    assert store.heartbeat("a" * 32, "host:1") and not store.heartbeat("a" * 32, "host:2")
    assert [j["id"] for j in store.interrupt_stale(30)] == ["b" * 32]
    assert "host:2" in store.get("b" * 32)["error"] and not store.heartbeat("b" * 32, "host:2")
    # a restarting server: its previous incarnation's job at once, the worker's still running one not
    assert [j["id"] for j in store.interrupt_stale(30, previous="server@")] == ["c" * 32]
    assert store.get("a" * 32)["status"] == "running"
    store.close()


def test_an_older_database_gets_the_worker_columns(tmp_path):
    import sqlite3

    db = sqlite3.connect(tmp_path / "jobs.db")
    db.execute(
        "CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, status TEXT NOT NULL, "
        "config TEXT NOT NULL, created_at REAL NOT NULL, started_at REAL, finished_at REAL, progress TEXT, "
        "metrics TEXT NOT NULL DEFAULT '[]', best TEXT, thresholds TEXT, checkpoint TEXT, last_checkpoint TEXT, "
        "device TEXT, error TEXT, error_kind TEXT, exit_code INTEGER, pid INTEGER, "
        "cancel_requested INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0)"
    )
    db.execute("INSERT INTO jobs (id, status, config, created_at) VALUES (?, 'running', '{}', 0)", ("d" * 32,))
    db.commit()
    db.close()
    store = JobStore(tmp_path / "jobs.db")
    job = store.get("d" * 32)
    assert job["worker"] is None and job["heartbeat_at"] is None and job["events_offset"] is None
    # left running by a server from before workers: interrupted at the next start, whatever the lease
    assert [j["id"] for j in store.interrupt_stale(3600)] == ["d" * 32]
    store.close()


# -- a trainer whose runner is gone ---------------------------------------------------------------

RUNNER = """
import os, subprocess, sys
env = {**os.environ, "FACEID_RUNNER_PID": str(os.getpid())}
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], env=env)
print(child.pid, flush=True)
child.wait()
"""
TRAINER = """
import signal, sys, threading
from faceid.cli_train import watch_runner
got, stop = [], threading.Event()
watch_runner(got, stop, period_s=0.05)
open(sys.argv[1] + ".started", "w").close()
stopped = stop.wait(60)
open(sys.argv[1], "w").write("stopped" if stopped and got == [signal.SIGTERM] else "timed out")
"""


def test_a_trainer_stops_and_saves_when_its_runner_is_killed(tmp_path):
    """The job runner's child (faceid.cli_train) watches the runner: a `faceid worker` killed with
    SIGKILL leaves no trainer writing into a job another worker may resume; it stops as SIGTERM
    stops it (after the step, saving last.pt)."""
    result = tmp_path / "result"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    runner = subprocess.Popen(
        [sys.executable, "-c", RUNNER, TRAINER, str(result)], env=env, stdout=subprocess.PIPE, text=True
    )
    trainer_pid = int(runner.stdout.readline())
    wait(lambda: Path(str(result) + ".started").exists(), 30, "the trainer to start watching")
    assert not result.exists()
    runner.kill()
    runner.wait()
    wait(result.exists, 10, "the trainer to notice its runner is gone")
    assert result.read_text() == "stopped"
    from app.processes import process_alive

    wait(lambda: not process_alive(trainer_pid), 10, "the trainer to exit")  # a zombie counts as gone


def test_a_trainer_started_by_anything_else_does_not_watch(monkeypatch):
    import threading

    from faceid.cli_train import watch_runner

    stop = threading.Event()
    for value in ("", "not-a-pid", str(os.getpid())):  # unset, garbage, a process that is not the parent
        monkeypatch.setenv("FACEID_RUNNER_PID", value)
        watch_runner([], stop, period_s=0.01)
    assert not any(t.name == "faceid-runner-watch" for t in threading.enumerate())
    assert not stop.is_set()
