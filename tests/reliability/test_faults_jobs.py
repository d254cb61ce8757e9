"""Faults of training processes with the fake trainer (the runner's side): killed at random
moments, a job folder that cannot be written, a trainer that exits 0 with a corrupt checkpoint,
junk in the events file. After each, the job store says what happened, the served model and the
earlier history are unchanged, the server answers, and the next job runs.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import sys
import time

import anyio
import pytest
from reliability_helpers import HERE, alive
from service_helpers import MODE, face_like, running, wait_for, wait_job

pytestmark = pytest.mark.anyio

TRAINERS = HERE / "trainers.py"


async def _snapshot(client) -> tuple[dict, list[dict]]:
    model = (await client.get("/model")).json()
    jobs = (await client.get("/jobs", params={"limit": 1000})).json()["jobs"]
    return model, jobs


async def test_training_process_killed_at_random_moments(make_app, job_body, tmp_path):
    """SIGKILL from outside (the OOM killer's way) at random moments of a run: before its first
    event, mid-epoch, around a checkpoint. Each time: `failed` with the reason, its
    DataLoader-like grandchild gone too, the served model and the history untouched, the server
    answering, and the queued job after it runs."""
    rng = random.Random(20240604)
    delays = [0.0] + [rng.uniform(0.02, 0.6) for _ in range(4)]
    app = make_app()
    async with running(app) as client:
        first = (await client.post("/jobs", json=job_body)).json()
        first = await wait_job(client, first["id"])
        assert first["status"] == "succeeded"
        model_before = (await client.get("/model")).json()
        for i, delay in enumerate(delays):
            victim = (await client.post("/jobs", json={**job_body, "seed": MODE.SLOW})).json()
            after = (await client.post("/jobs", json=job_body)).json()
            await wait_job(client, victim["id"], until=("running",))
            await wait_for(lambda v=victim: (app.state.store.get(v["id"]) or {}).get("pid"), what="the pid")
            pid = app.state.store.get(victim["id"])["pid"]
            await anyio.sleep(delay)
            child_file = tmp_path / "models" / "jobs" / victim["id"] / "child.pid"
            child = int(child_file.read_text()) if child_file.exists() else None
            os.kill(pid, signal.SIGKILL)
            done = await wait_job(client, victim["id"])
            assert done["status"] == "failed", (delay, done)
            assert done["exit_code"] == -signal.SIGKILL and "SIGKILL" in done["error"], done
            assert done["error_kind"] == "internal"
            if child is not None:
                await wait_for(lambda c=child: not alive(c), what="the grandchild to go")
            assert (await client.get("/health")).status_code == 200
            assert (await wait_job(client, after["id"]))["status"] == "succeeded", i
            # history: every earlier job still there, unchanged
            job = (await client.get(f"/jobs/{first['id']}")).json()
            assert job["status"] == "succeeded" and job["metrics"] == first["metrics"]
        total = (await client.get("/jobs")).json()["total"]
        assert total == 1 + 2 * len(delays)
        # the served model followed the succeeded jobs only
        model = (await client.get("/model")).json()
        assert model["job_id"] == after["id"] != model_before["job_id"]
        r = await client.post("/verify", files={"image1": ("a.png", face_like(1)), "image2": ("b.png", face_like(1))})
        assert r.status_code == 200 and r.json()["model"] == after["id"]


async def test_job_folder_that_cannot_be_written(make_app, make_settings, job_body):
    """The jobs folder is replaced by a file while the server runs (a disk remounted, a bad
    cleanup): the job fails with the reason, the server answers, and once the folder is back
    the next job runs."""
    settings = make_settings()
    async with running(make_app(settings)) as client:
        ok = await wait_job(client, (await client.post("/jobs", json=job_body)).json()["id"])
        assert ok["status"] == "succeeded"
        moved = settings.jobs_dir.with_name("jobs.moved")
        settings.jobs_dir.rename(moved)
        settings.jobs_dir.write_text("not a folder")
        try:
            bad = await wait_job(client, (await client.post("/jobs", json=job_body)).json()["id"])
        finally:
            settings.jobs_dir.unlink()
            moved.rename(settings.jobs_dir)
        assert bad["status"] == "failed" and bad["error"], bad
        assert bad["error_kind"] == "internal"
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/model")).json()["job_id"] == ok["id"]
        again = await wait_job(client, (await client.post("/jobs", json=job_body)).json()["id"])
        assert again["status"] == "succeeded"


async def test_trainer_exits_zero_with_a_corrupt_checkpoint(make_app, job_body):
    """The job is not `succeeded` (which promises its model is served): it fails with a clear
    error, kind `checkpoint`, and the previous model keeps answering."""
    async with running(make_app()) as client:
        good = await wait_job(client, (await client.post("/jobs", json=job_body)).json()["id"])
    app = make_app(trainer_cmd=(sys.executable, str(TRAINERS), "corrupt_best"))
    async with running(app) as client:
        assert (await client.get("/model")).json()["job_id"] == good["id"]
        bad = await wait_job(client, (await client.post("/jobs", json=job_body)).json()["id"])
        assert bad["status"] == "failed" and bad["error_kind"] == "checkpoint", bad
        assert "cannot be served" in bad["error"] and "previous model stays" in bad["error"]
        assert (await client.get("/model")).json()["job_id"] == good["id"]
        r = await client.post("/embed", files={"image": ("a.png", face_like(1))})
        assert r.status_code == 200 and r.json()["model"] == good["id"]
        r = await client.post(f"/models/{bad['id']}/activate")
        assert r.status_code == 409


async def test_a_corrupt_checkpoint_fails_its_job_while_a_model_is_pinned_too(make_app, job_body):
    """With a pinned model the new checkpoint is not served, but it is still checked: `succeeded`
    promises a model that activation can serve."""
    async with running(make_app()) as client:
        good = await wait_job(client, (await client.post("/jobs", json=job_body)).json()["id"])
        assert (await client.post(f"/models/{good['id']}/activate")).json()["pinned"] is True
    app = make_app(trainer_cmd=(sys.executable, str(TRAINERS), "corrupt_best"))
    async with running(app) as client:
        bad = await wait_job(client, (await client.post("/jobs", json=job_body)).json()["id"])
        assert bad["status"] == "failed" and bad["error_kind"] == "checkpoint", bad
        model = (await client.get("/model")).json()
        assert (model["job_id"], model["pinned"]) == (good["id"], True)


async def test_junk_in_the_events_file_does_not_break_the_runner(make_app, job_body):
    app = make_app(trainer_cmd=(sys.executable, str(TRAINERS), "garbage_events"))
    async with running(app) as client:
        job = await wait_job(client, (await client.post("/jobs", json=job_body)).json()["id"])
        assert job["status"] == "succeeded", job
        assert [m["epoch"] for m in job["metrics"] if isinstance(m.get("epoch"), int)] == [1, 2]
        assert (await client.get(f"/jobs/{job['id']}")).status_code == 200
        assert (await client.get("/jobs")).status_code == 200
        assert (await client.get("/model")).json()["job_id"] == job["id"]


async def test_models_folder_removed_while_running(make_app, make_settings, job_body):
    """Someone deletes the whole models folder under a running server: a job sent afterwards never
    hangs (the runner recreates the folder and runs it, or it fails with a reason), and /health,
    /model and inference keep answering from memory."""
    settings = make_settings()
    async with running(make_app(settings)) as client:
        ok = await wait_job(client, (await client.post("/jobs", json=job_body)).json()["id"])
        shutil.rmtree(settings.jobs_dir)
        r = await client.post("/jobs", json=job_body)
        assert r.status_code == 202
        bad = await wait_job(client, r.json()["id"], timeout=30)
        assert bad["status"] in ("failed", "succeeded"), bad  # the runner recreates the folder
        if bad["status"] == "failed":
            assert bad["error"], bad
        assert (await client.get("/health")).status_code == 200
        r = await client.post("/embed", files={"image": ("a.png", face_like(1))})
        assert r.status_code == 200 and r.json()["model"] in (ok["id"], bad["id"])
        t0 = time.monotonic()
        assert (await client.get("/jobs")).status_code == 200 and time.monotonic() - t0 < 5
