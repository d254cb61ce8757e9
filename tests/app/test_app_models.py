"""GET /model, POST /models/{job_id}/activate, FACEID_CHECKPOINT and the served model across restarts."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from service_helpers import MODE, face_like, fake_loader, running, wait_job, write_fake_checkpoint

from app.model_manager import STATE_KEY, ModelManager, inference_plan
from app.store import JobStore

pytestmark = pytest.mark.anyio


async def _train(client, job_body, **changes) -> dict:
    job = (await client.post("/jobs", json={**job_body, **changes})).json()
    return await wait_job(client, job["id"])


async def test_get_model_describes_it(make_app, job_body):
    async with running(make_app()) as client:
        r = await client.get("/model")
        assert r.status_code == 503 and "POST /jobs" in r.json()["detail"]
        job = await _train(client, job_body)
        r = await client.get("/model")
        assert r.status_code == 200
        model = r.json()
        assert model["id"] == job["id"] == model["job_id"]
        assert model["checkpoint"] == job["checkpoint"]
        assert model["thresholds"] == {"acc": 0.5, "far_1e-2": 0.8, "far_1e-3": 0.9}
        assert model["img_size"] == 32 and model["embedding_size"] == 12 and model["epoch"] == 2
        assert model["metrics"]["acc"] == pytest.approx(0.62)
        assert model["loaded_at"]
        # the service settings of these tests: batch at most 16 images, wait 1 ms, the default
        # number of workers (two on a CPU with two or more cores)
        assert model["batching"] == {
            "max_batch_size": 16,
            "wait_ms": 1.0,
            "workers": inference_plan(0, "auto")[0],
            "batches": 0,
            "requests": 0,
            "images": 0,
            "mean_batch_images": None,
        }


async def test_get_model_counts_how_requests_were_batched(make_app, job_body):
    async with running(make_app()) as client:
        await _train(client, job_body)
        for i in range(3):
            r = await client.post("/embed", files={"image": ("a.png", face_like(i), "image/png")})
            assert r.status_code == 200
        r = await client.post(
            "/verify",
            files={"image1": ("a.png", face_like(1), "image/png"), "image2": ("b.png", face_like(2), "image/png")},
        )
        assert r.status_code == 200
        b = (await client.get("/model")).json()["batching"]
        # one request at a time here, so one forward pass each: 3 of one image, 1 of two
        assert (b["batches"], b["requests"], b["images"]) == (4, 4, 5)
        assert b["mean_batch_images"] == 1.25


async def test_two_inference_workers_answer_concurrent_requests(make_app, job_body):
    """FACEID_INFER_WORKERS=2: GET /model says so, and requests sent together are all answered
    with their own image's embedding."""
    async with running(make_app(infer_workers=2)) as client:
        await _train(client, job_body)
        assert (await client.get("/model")).json()["batching"]["workers"] == 2
        uploads = [face_like(i) for i in range(6)]
        together = await asyncio.gather(
            *(client.post("/embed", files={"image": ("a.png", u, "image/png")}) for u in uploads)
        )
        for u, r in zip(uploads, together):
            assert r.status_code == 200, r.text
            alone = await client.post("/embed", files={"image": ("a.png", u, "image/png")})
            assert r.json()["embedding"] == alone.json()["embedding"]


async def test_activate_pins_and_pin_false_follows(make_app, job_body):
    async with running(make_app()) as client:
        first = await _train(client, job_body)
        second = await _train(client, job_body)
        assert (await client.get("/model")).json()["job_id"] == second["id"]
        r = await client.post(f"/models/{first['id']}/activate")
        assert r.status_code == 200, r.text
        assert r.json()["job_id"] == first["id"] and r.json()["pinned"] is True
        assert r.json()["source"] == "activated"
        # the same description as GET /model, batching figures included
        assert r.json()["batching"] == (await client.get("/model")).json()["batching"] is not None
        third = await _train(client, job_body)
        assert (await client.get("/model")).json()["job_id"] == first["id"]  # pinned stays
        r = await client.post(f"/models/{second['id']}/activate", params={"pin": "false"})
        assert r.json()["pinned"] is False
        fourth = await _train(client, job_body)
        assert third["status"] == fourth["status"] == "succeeded"
        assert (await client.get("/model")).json()["job_id"] == fourth["id"]


async def test_activate_errors(make_app, job_body):
    async with running(make_app()) as client:
        r = await client.post(f"/models/{'0' * 32}/activate")
        assert r.status_code == 404
        r = await client.post("/models/not-an-id/activate")
        assert r.status_code == 404
        failed = await _train(client, job_body, seed=MODE.DATA_ERROR)
        r = await client.post(f"/models/{failed['id']}/activate")
        assert r.status_code == 409 and "failed" in r.json()["detail"]
        slow = (await client.post("/jobs", json={**job_body, "seed": MODE.SLOW})).json()
        r = await client.post(f"/models/{slow['id']}/activate")
        assert r.status_code == 409
        await client.post(f"/jobs/{slow['id']}/cancel")


async def test_corrupt_checkpoint_is_refused_and_current_model_stays(make_app, job_body):
    async with running(make_app()) as client:
        good = await _train(client, job_body)
        other = await _train(client, job_body)
        with open(good["checkpoint"], "wb") as f:
            f.write(b"\x00garbage")
        r = await client.post(f"/models/{good['id']}/activate")
        assert r.status_code == 409 and "cannot be served" in r.json()["detail"]
        assert (await client.get("/model")).json()["job_id"] == other["id"]
        r = await client.post("/embed", files={"image": ("a.png", face_like(1))})
        assert r.status_code == 200 and r.json()["model"] == other["id"]


async def test_served_model_survives_restart(make_app, make_settings, job_body):
    settings = make_settings()
    async with running(make_app(settings)) as client:
        first = await _train(client, job_body)
        await _train(client, job_body)
        await client.post(f"/models/{first['id']}/activate")
    async with running(make_app(settings)) as client:
        model = (await client.get("/model")).json()
        assert model["job_id"] == first["id"] and model["pinned"] is True
        assert len((await client.get("/jobs")).json()["jobs"]) == 2  # history kept


async def test_checkpoint_from_environment(make_app, make_settings, job_body, tmp_path):
    given = write_fake_checkpoint(tmp_path / "given" / "model.pt")
    settings = make_settings(checkpoint=given)
    async with running(make_app(settings)) as client:
        model = (await client.get("/model")).json()
        assert model["source"] == "env" and model["job_id"] is None and model["checkpoint"] == str(given)
        job = await _train(client, job_body)  # a newer model replaces it (not pinned)
        assert (await client.get("/model")).json()["job_id"] == job["id"]
    # same FACEID_CHECKPOINT at the next start: the model served before the restart stays
    async with running(make_app(settings)) as client:
        assert (await client.get("/model")).json()["job_id"] == job["id"]
    # a changed FACEID_CHECKPOINT is the operator's new choice
    newer = write_fake_checkpoint(tmp_path / "given" / "newer.pt", epoch=7)
    async with running(make_app(make_settings(checkpoint=newer))) as client:
        model = (await client.get("/model")).json()
        assert model["checkpoint"] == str(newer) and model["epoch"] == 7


async def test_bad_checkpoint_at_start_leaves_server_up(make_app, make_settings, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    async with running(make_app(make_settings(checkpoint=bad))) as client:
        assert (await client.get("/health")).status_code == 200
        r = await client.get("/ready")
        assert r.status_code == 503 and "cannot read checkpoint" in r.json()["detail"]
        r = await client.post("/embed", files={"image": ("a.png", face_like(1))})
        assert r.status_code == 503 and "last load failed" in r.json()["detail"]


async def test_a_new_checkpoint_from_the_environment_that_cannot_load_is_not_replaced_by_the_old_model(
    make_app, make_settings, job_body, tmp_path
):
    """The operator asked for a new model: /ready says it failed, rather than serving the previous
    one as if nothing were wrong."""
    async with running(make_app(make_settings())) as client:
        await _train(client, job_body)
        assert (await client.get("/ready")).status_code == 200
    missing = tmp_path / "typo" / "backbone_best.pt"
    settings = make_settings(checkpoint=missing)
    async with running(make_app(settings)) as client:
        r = await client.get("/ready")
        assert r.status_code == 503 and f"FACEID_CHECKPOINT {missing} cannot be served" in r.json()["detail"]
        # the record the inference replicas follow names no model either
        store = JobStore(settings.db_path)
        try:
            assert store.get_state(STATE_KEY) is None
        finally:
            store.close()


async def test_the_start_falls_back_past_succeeded_jobs_whose_checkpoints_are_gone(make_app, make_settings, job_body):
    settings = make_settings()
    async with running(make_app(settings)) as client:
        older = await _train(client, job_body)
        newer = await _train(client, job_body)
    Path(newer["checkpoint"]).unlink()
    store = JobStore(settings.db_path)
    store.set_state(STATE_KEY, None)  # nothing remembered: the newest succeeded job is tried, then the one before
    store.close()
    async with running(make_app(settings)) as client:
        assert (await client.get("/model")).json()["job_id"] == older["id"]


async def test_missing_remembered_checkpoint_falls_back_to_newest_job(make_app, make_settings, job_body):
    settings = make_settings()
    async with running(make_app(settings)) as client:
        first = await _train(client, job_body)
        second = await _train(client, job_body)
        await client.post(f"/models/{first['id']}/activate")
    import os

    os.remove(first["checkpoint"])
    async with running(make_app(settings)) as client:
        assert (await client.get("/model")).json()["job_id"] == second["id"]


async def test_switch_is_atomic_for_requests_in_flight(make_settings, tmp_path):
    """A request that started on model A answers from A even if B is served meanwhile."""
    import time

    import anyio
    from service_helpers import FakeVerifier

    from app.main import create_app

    class SlowVerifier(FakeVerifier):
        def embed(self, images):
            time.sleep(0.5)
            return super().embed(images)

    a = write_fake_checkpoint(tmp_path / "a.pt")
    b = write_fake_checkpoint(tmp_path / "b.pt", epoch=2)
    app = create_app(make_settings(checkpoint=a), verifier_loader=lambda path, device: SlowVerifier(path))
    async with running(app) as client:
        model_a = (await client.get("/model")).json()["id"]
        answers = {}

        async def in_flight():
            answers["first"] = await client.post("/embed", files={"image": ("a.png", face_like(1))})

        async with anyio.create_task_group() as tg:
            tg.start_soon(in_flight)
            await anyio.sleep(0.15)
            await anyio.to_thread.run_sync(lambda: app.state.models.load(b, job_id=None, source="env", pinned=False))
        model_b = (await client.get("/model")).json()["id"]
        assert model_b != model_a
        assert answers["first"].status_code == 200 and answers["first"].json()["model"] == model_a
        r = await client.post("/embed", files={"image": ("a.png", face_like(1))})
        assert r.json()["model"] == model_b


def test_a_job_that_succeeds_in_a_worker_while_the_one_before_loads_is_served_next(make_settings, tmp_path):
    """A server follows the jobs that succeed in `faceid worker` processes. A job that succeeds
    while the previous job's model is still loading is newer than the served model: the next look
    serves it (its model was not chosen before it succeeded)."""
    s = make_settings()
    s.models_dir.mkdir(parents=True)
    store = JobStore(s.db_path)
    first, second = write_fake_checkpoint(tmp_path / "first.json"), write_fake_checkpoint(tmp_path / "second.json")

    def succeed(job_id: str, ckpt: Path) -> None:
        store.create(job_id, {}, max_queued=10)
        assert store.claim(job_id, worker="w1")
        store.update(job_id, status="succeeded", checkpoint=str(ckpt), finished_at=time.time())

    def loader(path: Path, device: str):
        if path == first:  # a slow load, during which the second job succeeds
            succeed("second", second)
        return fake_loader(path, device)

    manager = ModelManager(s, store, loader=loader)
    try:
        succeed("first", first)
        assert manager.follow_jobs() is True and manager.current.job_id == "first"
        assert manager.follow_jobs() is True and manager.current.job_id == "second"
        assert manager.follow_jobs() is False and manager.current.job_id == "second"
    finally:
        manager.close()
        store.close()


def test_a_job_whose_status_is_written_after_the_server_reads_the_jobs_is_served_next(make_settings, tmp_path):
    """A worker takes a job's finished_at just before it writes `succeeded`. A job whose finished_at
    comes before the server reads the succeeded jobs, but whose status is written after, is newer
    than the model chosen from that read: the next look serves it."""
    s = make_settings()
    s.models_dir.mkdir(parents=True)
    store = JobStore(s.db_path)
    first, late = write_fake_checkpoint(tmp_path / "first.json"), write_fake_checkpoint(tmp_path / "late.json")
    for job_id in ("first", "late"):
        store.create(job_id, {}, max_queued=10)
        assert store.claim(job_id, worker="w1")
    store.update("first", status="succeeded", checkpoint=str(first), finished_at=time.time())
    finished = time.time()  # the late job's finished_at, taken before the server reads the jobs
    manager = ModelManager(s, store, loader=fake_loader)
    try:
        assert manager.follow_jobs() is True and manager.current.job_id == "first"
        store.update("late", status="succeeded", checkpoint=str(late), finished_at=finished)
        assert manager.follow_jobs() is True and manager.current.job_id == "late"
        assert manager.follow_jobs() is False
    finally:
        manager.close()
        store.close()
