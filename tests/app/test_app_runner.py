"""The job runner with the fake trainer: success, failures, crashes, cancel, restart and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest
from service_helpers import FAKE_TRAINER, MODE, running, wait_for, wait_job

from app.paths import job_config
from app.processes import process_alive, tail_lines
from app.progress import EventTail, JobProgress
from app.store import JobStore
from faceid.config import TrainConfig
from faceid.events import EpochEnd, thresholds_of

pytestmark = pytest.mark.anyio


async def test_failure_carries_the_trainers_error(make_app, job_body):
    async with running(make_app()) as client:
        job = (await client.post("/jobs", json={**job_body, "seed": MODE.DATA_ERROR})).json()
        done = await wait_job(client, job["id"])
        assert done["status"] == "failed"
        assert done["error"] == "--train /nowhere has no identity folders; give an ImageFolder root"
        assert done["error_kind"] == "data" and done["exit_code"] == 2


async def test_crash_without_event_reports_last_output(make_app, job_body):
    async with running(make_app()) as client:
        job = (await client.post("/jobs", json={**job_body, "seed": MODE.CRASH})).json()
        done = await wait_job(client, job["id"])
        assert done["status"] == "failed" and done["exit_code"] == 1
        assert "exited with code 1" in done["error"]
        assert "RuntimeError: fake internal failure" in done["error"]


async def test_killed_by_signal_then_next_job_runs(make_app, job_body):
    async with running(make_app()) as client:
        killed = (await client.post("/jobs", json={**job_body, "seed": MODE.KILLED})).json()
        nxt = (await client.post("/jobs", json=job_body)).json()
        done = await wait_job(client, killed["id"])
        assert done["status"] == "failed" and done["exit_code"] == -signal.SIGKILL
        assert "SIGKILL" in done["error"] and "out-of-memory" in done["error"]
        assert (await client.get("/health")).status_code == 200
        assert (await wait_job(client, nxt["id"]))["status"] == "succeeded"


async def test_exit_zero_without_checkpoint_is_failed(make_app, job_body):
    async with running(make_app()) as client:
        job = (await client.post("/jobs", json={**job_body, "seed": MODE.NO_CHECKPOINT})).json()
        done = await wait_job(client, job["id"])
        assert done["status"] == "failed" and "backbone_best.pt" in done["error"]
        assert (await client.get("/model")).status_code == 503


async def test_trainer_that_cannot_start_fails_the_job(make_app, job_body, tmp_path):
    app = make_app(trainer_cmd=(str(tmp_path / "no-such-python"),))
    async with running(app) as client:
        job = (await client.post("/jobs", json=job_body)).json()
        done = await wait_job(client, job["id"])
        assert done["status"] == "failed" and "could not start" in done["error"]


async def test_cancel_running_job_stops_its_process_group(make_app, job_body, tmp_path):
    async with running(make_app()) as client:
        job = (await client.post("/jobs", json={**job_body, "seed": MODE.SLOW})).json()
        running_job = await wait_job(client, job["id"], until=("running",))
        folder = tmp_path / "models" / "jobs" / job["id"]
        await wait_for(lambda: (folder / "child.pid").exists(), what="the grandchild")
        await wait_for(
            lambda: (folder / "events.jsonl").exists() and "progress" in (folder / "events.jsonl").read_text(),
            what="progress",
        )
        child = int((folder / "child.pid").read_text())
        for _ in range(200):  # the runner records progress while the job runs
            trainer = (await client.get(f"/jobs/{job['id']}")).json()
            if (trainer["progress"] or {}).get("step", 0) >= 1:
                break
            await anyio.sleep(0.02)
        assert trainer["progress"]["step"] >= 1 and running_job["started_at"]
        r = await client.post(f"/jobs/{job['id']}/cancel")
        assert r.status_code == 202 and r.json()["cancel_requested"] is True
        done = await wait_job(client, job["id"])
        assert done["status"] == "cancelled" and done["exit_code"] == 143 and done["error"] is None
        # as far as it got, with no time left to wait for
        assert done["progress"]["percent"] < 100 and done["progress"]["eta_s"] is None
        await wait_for(lambda: not process_alive(child), what="the grandchild to be killed")
        # it saved last.pt on SIGTERM, so it can be resumed
        assert (folder / "last.pt").exists()
        r = await client.post(f"/jobs/{job['id']}/resume")
        assert r.status_code == 202 and r.json()["status"] == "queued"
        done = await wait_job(client, job["id"])
        assert done["status"] == "succeeded" and done["attempts"] == 2
        assert (done["progress"]["percent"], done["progress"]["eta_s"]) == (100.0, 0.0)


async def test_cancel_escalates_to_sigkill(make_app, job_body, tmp_path):
    async with running(make_app(cancel_grace_s=0.3)) as client:
        job = (await client.post("/jobs", json={**job_body, "seed": MODE.STUBBORN})).json()
        await wait_job(client, job["id"], until=("running",))
        folder = tmp_path / "models" / "jobs" / job["id"]
        await wait_for(lambda: (folder / "child.pid").exists(), what="the grandchild")
        child = int((folder / "child.pid").read_text())
        t0 = time.monotonic()
        await client.post(f"/jobs/{job['id']}/cancel")
        done = await wait_job(client, job["id"])
        assert done["status"] == "cancelled" and done["exit_code"] == -signal.SIGKILL
        assert time.monotonic() - t0 < 5
        await wait_for(lambda: not process_alive(child), what="the grandchild to be killed")


async def test_served_model_follows_succeeded_jobs(make_app, job_body):
    async with running(make_app()) as client:
        assert (await client.get("/model")).status_code == 503
        first = (await client.post("/jobs", json=job_body)).json()
        await wait_job(client, first["id"])
        # served before `succeeded` is visible
        model = (await client.get("/model")).json()
        assert model["job_id"] == first["id"] and model["source"] == "job" and not model["pinned"]
        second = (await client.post("/jobs", json=job_body)).json()
        await wait_job(client, second["id"])
        assert (await client.get("/model")).json()["job_id"] == second["id"]


async def test_server_stop_interrupts_running_job(make_app, job_body, make_settings):
    settings = make_settings()
    async with running(make_app(settings)) as client:
        job = (await client.post("/jobs", json={**job_body, "seed": MODE.SLOW})).json()
        await wait_job(client, job["id"], until=("running",))
        await wait_for(
            lambda: (
                "progress" in (settings.jobs_dir / job["id"] / "events.jsonl").read_text()
                if (settings.jobs_dir / job["id"] / "events.jsonl").exists()
                else False
            ),
            what="progress",
        )
    # the lifespan ended: the trainer got SIGTERM, saved last.pt, and the job is resumable
    async with running(make_app(settings)) as client:
        job = (await client.get(f"/jobs/{job['id']}")).json()
        assert job["status"] == "interrupted" and "resume" in job["error"]
        r = await client.post(f"/jobs/{job['id']}/resume")
        assert r.status_code == 202, r.text
        assert r.json()["config"]["resume"].endswith("last.pt")
        done = await wait_job(client, job["id"])
        assert done["status"] == "succeeded" and done["attempts"] == 2
        logs = (await client.get(f"/jobs/{job['id']}/logs")).json()["lines"]
        assert any(line.startswith("--- attempt 2") for line in logs)
        assert any(line.startswith("resuming from") for line in logs)


async def test_restart_after_server_died_marks_interrupted_and_resumes(make_settings, make_app, job_body):
    """A server killed with SIGKILL leaves a `running` row and an orphaned trainer: the next start
    marks the job interrupted and stops the orphan (which saves last.pt); resume continues."""
    settings = make_settings()
    settings.jobs_dir.mkdir(parents=True)
    store = JobStore(settings.db_path)
    job_id = "a" * 32
    folder = settings.jobs_dir / job_id
    folder.mkdir()
    config = job_config(
        TrainConfig(**{**job_body, "seed": MODE.SLOW}),
        data_dir=settings.data_dir,
        models_dir=settings.models_dir,
        job_dir=folder,
    )
    store.create(job_id, config, 10)
    (folder / "config.json").write_text(json.dumps(config))
    orphan = subprocess.Popen(
        [
            sys.executable,
            str(FAKE_TRAINER),
            "--config",
            str(folder / "config.json"),
            "--events_file",
            str(folder / "events.jsonl"),
        ],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
    )
    # as the runner leaves it once the trainer runs (events_offset: where this run's events start)
    store.update(job_id, status="running", started_at=time.time(), pid=orphan.pid, attempts=1, events_offset=0)
    store.close()
    deadline = time.monotonic() + 10
    while not (folder / "events.jsonl").exists() or "progress" not in (folder / "events.jsonl").read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)

    async with running(make_app(settings)) as client:
        orphan.wait(timeout=10)  # recover() stopped it
        job = (await client.get(f"/jobs/{job_id}")).json()
        assert job["status"] == "interrupted"
        assert (folder / "last.pt").exists()
        # what the orphan did before and on its SIGTERM, which no server was there to read: its
        # progress, the epoch it evaluated, its best checkpoint and thresholds
        assert job["progress"]["step"] >= 1 and [m["epoch"] for m in job["metrics"]] == [1]
        assert job["best"]["epoch"] == 1 and job["best"]["checkpoint"] == str(folder / "backbone_best.pt")
        assert job["thresholds"]["acc"] == 0.5 and job["last_checkpoint"] == str(folder / "last.pt")
        listed = (await client.get("/jobs", params={"status": "interrupted"})).json()
        assert [j["id"] for j in listed["jobs"]] == [job_id]
        assert (await client.post(f"/jobs/{job_id}/resume")).status_code == 202
        done = await wait_job(client, job_id)
        assert done["status"] == "succeeded"


def test_claiming_a_job_records_where_its_events_start_in_the_same_write(tmp_path):
    store = JobStore(tmp_path / "jobs.db")
    try:
        store.create("d" * 32, {}, 10)
        assert store.claim("d" * 32, events_offset=4096)
        job = store.get("d" * 32)
        assert (job["status"], job["events_offset"], job["attempts"]) == ("running", 4096, 1)
    finally:
        store.close()


def test_a_database_from_before_migrations_gets_the_later_columns_once(tmp_path):
    import sqlite3

    from app.store import MIGRATIONS
    from faceid.database import Database

    path = tmp_path / "jobs.db"
    first = Database(path)  # the first release's tables, without the record of migrations
    for statement in MIGRATIONS[0].steps:
        first.run(statement)
    first.run("INSERT INTO jobs (id, status, config, created_at) VALUES (?, 'queued', '{}', 1.0)", ("c" * 32,))
    first.close()
    assert "events_offset" not in {r[1] for r in sqlite3.connect(path).execute("PRAGMA table_info(jobs)")}
    store = JobStore(path)
    try:
        store.update("c" * 32, events_offset=123, worker="w", heartbeat_at=2.0)
        assert store.get("c" * 32)["events_offset"] == 123
        assert store._db.versions("jobs") == [m.version for m in MIGRATIONS]
    finally:
        store.close()
    again = JobStore(path)  # nothing left to apply, the data kept
    try:
        assert again._db.migrate("jobs", MIGRATIONS) == []
        assert again.get("c" * 32)["worker"] == "w"
    finally:
        again.close()


async def test_interrupted_without_last_checkpoint_is_409(make_settings, make_app, job_body):
    settings = make_settings()
    settings.jobs_dir.mkdir(parents=True)
    store = JobStore(settings.db_path)
    job_id = "b" * 32
    config = job_config(
        TrainConfig(**job_body),
        data_dir=settings.data_dir,
        models_dir=settings.models_dir,
        job_dir=settings.jobs_dir / job_id,
    )
    store.create(job_id, config, 10)
    store.update(job_id, status="running", pid=None)
    store.close()
    async with running(make_app(settings)) as client:
        assert (await client.get(f"/jobs/{job_id}")).json()["status"] == "interrupted"
        r = await client.post(f"/jobs/{job_id}/resume")
        assert r.status_code == 409 and "POST /jobs" in r.json()["detail"]


async def test_second_server_on_same_models_dir_is_refused(make_app, make_settings):
    from faceid.errors import ConfigError

    settings = make_settings()
    async with running(make_app(settings)):
        with pytest.raises(ConfigError, match="another FaceID server"):
            async with running(make_app(settings)):
                pass


# -- pieces ---------------------------------------------------------------------------------------


def test_event_tail_reads_only_complete_lines(tmp_path):
    path = tmp_path / "events.jsonl"
    tail = EventTail(path)
    assert tail.read() == []
    path.write_bytes(b'{"event": "start"}\n{"event": "prog')
    assert tail.read() == [{"event": "start"}]
    with open(path, "ab") as f:
        f.write(b'ress"}\nnot json\n[1]\n')
    assert tail.read() == [{"event": "progress"}]


def test_progress_keeps_history_across_resume():
    p = JobProgress(best_metric="acc")
    p.apply(
        {
            "event": "epoch",
            "epoch": 1,
            "acc": 0.6,
            "is_best": True,
            "best_epoch": 1,
            "best_value": 0.6,
            "th": 0.3,
            "th_far_1e-2": 0.7,
            "th_far_1e-3": 0.8,
            "train_loss": float("nan"),
        }
    )
    p.apply({"event": "checkpoint", "kind": "best", "path": "/x/backbone_best.pt", "epoch": 1})
    p.apply({"event": "epoch", "epoch": 1, "acc": 0.61, "is_best": True, "best_epoch": 1, "best_value": 0.61})
    p.apply({"event": "epoch", "epoch": 2, "acc": 0.5, "is_best": False, "best_epoch": 1, "best_value": 0.61})
    assert [m["epoch"] for m in p.metrics] == [1, 2] and p.metrics[0]["acc"] == 0.61
    assert p.best == {"epoch": 1, "metric": "acc", "value": 0.61, "checkpoint": "/x/backbone_best.pt"}
    assert p.thresholds == {"acc": None, "far_1e-2": None, "far_1e-3": None}  # the repeat had none
    p.apply(
        {
            "event": "finished",
            "best_epoch": 1,
            "best_metric": "acc",
            "best_value": 0.61,
            "best_checkpoint": "/x/backbone_best.pt",
            "thresholds": {"acc": 0.3},
        }
    )
    assert p.finished and p.thresholds == {"acc": 0.3}


def test_a_running_jobs_thresholds_are_those_a_finished_run_reports():
    """A best epoch's thresholds, read while the job runs, are the contract's thresholds_of its
    metrics: pairs_acc too when the trainer evaluates a pairs file."""
    epoch = EpochEnd(
        epoch=1,
        global_step=4,
        train_loss=0.5,
        lr=0.1,
        acc=0.6,
        th=0.3,
        auc=0.7,
        **{"tar_1e-2": 0.2, "tar_1e-3": 0.1, "th_far_1e-2": 0.6, "th_far_1e-3": 0.7},
        pairs_acc=0.65,
        pairs_th=0.35,
        is_best=True,
        best_epoch=1,
        best_value=0.6,
    ).to_json()
    p = JobProgress(best_metric="acc")
    p.apply(epoch)
    assert p.thresholds == thresholds_of(epoch) == {"acc": 0.3, "far_1e-2": 0.6, "far_1e-3": 0.7, "pairs_acc": 0.35}
    assert p.metrics == [{k: v for k, v in epoch.items() if k != "event"}]
    assert p.best == {"epoch": 1, "metric": "acc", "value": 0.6, "checkpoint": None}


def test_an_event_off_the_contract_is_read_as_far_as_it_goes():
    p = JobProgress(best_metric="acc")
    p.apply({"event": "epoch", "epoch": 2, "th": "0.4", "pairs_th": "high", "is_best": True, "best_epoch": 2})
    assert p.thresholds == {"acc": 0.4, "far_1e-2": None, "far_1e-3": None}
    assert p.metrics == [{"epoch": 2, "th": 0.4, "pairs_th": "high", "is_best": True, "best_epoch": 2}]
    p.apply({"event": "progress", "epoch": "x", "step": 3, "loss": "NaN", "time": 5})
    assert (p.progress["epoch"], p.progress["step"], p.progress["loss"], p.progress["updated_at"]) == (None, 3, None, 5)
    p.apply({"event": "no such event", "epoch": 3})
    p.apply({"event": ["start"]})
    assert [m["epoch"] for m in p.metrics] == [2]


def test_an_epoch_stopped_part_way_keeps_its_record_beside_its_completion_and_its_percent():
    p = JobProgress(best_metric="acc")
    p.apply({"event": "progress", "epoch": 1, "epochs": 2, "step": 3, "steps": 10, "percent": 15.0, "eta_s": 9.0})
    p.apply(
        {
            "event": "epoch",
            "epoch": 1,
            "acc": 0.55,
            "complete": False,
            "epoch_steps": 3,
            "is_best": True,
            "best_epoch": 1,
            "best_value": 0.55,
        }
    )
    p.apply({"event": "finished", "best_epoch": 1, "best_metric": "acc", "best_value": 0.55, "stopped_early": True})
    assert (p.progress["percent"], p.progress["eta_s"]) == (15.0, 9.0)  # not 100: it stopped at 15 %
    # resumed: the epoch's other 7 steps, then epoch 2 (a replayed event replaces its own record)
    for _ in range(2):
        p.apply(
            {
                "event": "epoch",
                "epoch": 1,
                "acc": 0.6,
                "complete": True,
                "epoch_steps": 10,
                "is_best": True,
                "best_epoch": 1,
                "best_value": 0.6,
            }
        )
    p.apply(
        {
            "event": "epoch",
            "epoch": 2,
            "acc": 0.62,
            "complete": True,
            "epoch_steps": 10,
            "is_best": True,
            "best_epoch": 2,
            "best_value": 0.62,
        }
    )
    assert [(m["epoch"], m["complete"], m["acc"]) for m in p.metrics] == [
        (1, False, 0.55),
        (1, True, 0.6),
        (2, True, 0.62),
    ]
    p.apply({"event": "finished", "best_epoch": 2, "best_metric": "acc", "best_value": 0.62, "stopped_early": False})
    assert (p.progress["percent"], p.progress["eta_s"]) == (100.0, 0.0)


def test_tail_lines(tmp_path):
    path = tmp_path / "out.log"
    assert tail_lines(path, 5) == []
    path.write_text("\n".join(f"line {i}" for i in range(1000)) + "\n")
    assert tail_lines(path, 2) == ["line 998", "line 999"]
    assert tail_lines(path, 3, max_bytes=30)[-1] == "line 999"


async def test_a_relative_trainer_path_means_the_servers_folder(make_app, job_body, tmp_path, monkeypatch):
    """sys.executable is relative when PATH holds a relative folder (PATH=.venv/bin:$PATH); the
    training process, which starts in the job's folder, must still be found."""
    monkeypatch.chdir(Path(sys.executable).parent)
    app = make_app(trainer_cmd=(os.path.join(".", Path(sys.executable).name), str(FAKE_TRAINER)))
    async with running(app) as client:
        job = (await client.post("/jobs", json=job_body)).json()
        done = await wait_job(client, job["id"])
        assert done["status"] == "succeeded", done.get("error")


def test_progress_shows_finding_faces_then_training_and_the_images_without_a_face():
    p = JobProgress(best_metric="acc")
    p.apply({"event": "faces", "time": 1.0, "what": "--train", "done": 640, "total": 8243})
    assert p.progress["phase"] == "faces" and p.progress["faces_set"] == "--train"
    assert (p.progress["faces_done"], p.progress["faces_total"], p.progress["percent"]) == (640, 8243, 0.0)
    p.apply({"event": "start", "time": 2.0, "epochs": 2, "steps_per_epoch": 4, "no_face_images": 3})
    assert p.progress["phase"] == "train" and p.progress["no_face_images"] == 3
    p.apply({"event": "progress", "time": 3.0, "epoch": 1, "epochs": 2, "step": 1, "steps": 4, "percent": 12.5})
    assert p.progress["phase"] == "train" and p.progress["no_face_images"] == 3 and p.progress["percent"] == 12.5


def test_writers_racing_on_one_json_file_never_fail(tmp_path):
    """Two runners once wrote a job's config.json through the same temporary name: one's rename
    found the file gone and the job was marked failed. Each writer now has a temporary file of its
    own, and only the worker that claimed a job writes its config."""
    import threading

    from app.processes import write_json_atomic

    path, errors = tmp_path / "config.json", []

    def write(n: int) -> None:
        try:
            for i in range(300):
                write_json_atomic(path, {"writer": n, "i": i})
        except OSError as e:
            errors.append(e)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and json.loads(path.read_text())["i"] == 299
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # no temporary file left behind
