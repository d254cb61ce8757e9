"""POST /jobs with `init_from`: a job fine-tunes the model of a succeeded job of the same server;
any other base (unknown, unfinished, failed, or one the new config does not fit) is a 422 that
names init_from and the fix, and no job is created."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from service_helpers import MODE, running, wait_job

pytestmark = pytest.mark.anyio


async def _succeeded(client, body: dict) -> dict:
    r = await client.post("/jobs", json=body)
    assert r.status_code == 202, r.text
    job = await wait_job(client, r.json()["id"])
    assert job["status"] == "succeeded", job
    return job


async def test_a_job_fine_tunes_the_model_of_a_succeeded_job(make_app, job_body):
    async with running(make_app()) as client:
        base = await _succeeded(client, job_body)
        r = await client.post("/jobs", json={**job_body, "init_from": base["id"], "epochs": 1})
        assert r.status_code == 202, r.text
        job = r.json()
        # the trainer gets the base job's best checkpoint, not the id
        assert job["config"]["init_from"] == base["checkpoint"]
        assert Path(job["config"]["init_from"]).name == "backbone_best.pt"
        done = await wait_job(client, job["id"])
        assert done["status"] == "succeeded", done
        assert json.loads(Path(done["checkpoint"]).read_text())["init_from"] == base["checkpoint"]


async def test_bases_that_cannot_start_a_job_are_422(make_app, job_body):
    async with running(make_app()) as client:
        failed = (await client.post("/jobs", json={**job_body, "seed": MODE.DATA_ERROR})).json()
        await wait_job(client, failed["id"])
        cases = [
            ("0" * len(failed["id"]), "is not a job of this server; give the id of a succeeded job"),
            ("models/jobs/x/backbone_best.pt", "is not a job of this server"),
            (failed["id"], f"job {failed['id']} is failed and has no model to start from"),
        ]
        for value, needle in cases:
            r = await client.post("/jobs", json={**job_body, "init_from": value})
            assert r.status_code == 422, r.text
            body = r.json()
            assert body["field"] == "init_from" and body["detail"].startswith("init_from:"), body
            assert needle in body["detail"], body
        assert (await client.get("/jobs")).json()["total"] == 1


async def test_a_base_the_new_config_does_not_fit_is_422_naming_the_settings(make_app, job_body):
    async with running(make_app()) as client:
        base = await _succeeded(client, job_body)
        r = await client.post("/jobs", json={**job_body, "init_from": base["id"], "img_size": 48, "embedding_size": 64})
        assert r.status_code == 422, r.text
        detail = r.json()["detail"]
        assert f"job {base['id']} was trained with embedding_size 512, img_size 32" in detail, detail
        assert detail.endswith("set --embedding_size 512 --img_size 32 to fine-tune it"), detail
        r = await client.post("/jobs", json={**job_body, "init_from": base["id"], "pretrained": True})
        assert r.status_code == 422 and "init_from and pretrained" in r.json()["detail"], r.text
        assert (await client.get("/jobs")).json()["total"] == 1


async def test_what_the_body_leaves_out_of_the_fixed_settings_comes_from_the_base(make_app, job_body):
    async with running(make_app()) as client:
        base = await _succeeded(client, {**job_body, "img_size": 40, "embedding_size": 64})
        body = {
            "train": job_body["train"],
            "val": job_body["val"],
            "init_from": base["id"],
            "preset": "finetune",
            "epochs": 3,
        }
        r = await client.post("/jobs", json=body)
        assert r.status_code == 202, r.text
        cfg = r.json()["config"]
        assert (cfg["img_size"], cfg["embedding_size"], cfg["epochs"]) == (40, 64, 3)
        assert cfg["freeze_backbone_epochs"] == 2 and cfg["preset"] == "finetune"
        # the cpu-small preset's 56 px and flat neck yield to the base as well
        r = await client.post("/jobs", json={**body, "preset": "cpu-small"})
        assert r.status_code == 202, r.text
        assert (r.json()["config"]["img_size"], r.json()["config"]["neck"]) == (40, "gap")
