"""POST /jobs, GET /jobs, GET /jobs/{id}, cancel, resume, logs: answers and errors."""

from __future__ import annotations

import json
import math

import pytest
from service_helpers import MODE, running, wait_job

pytestmark = pytest.mark.anyio


async def test_submit_returns_202_location_and_runs(make_app, job_body, data_dir):
    async with running(make_app()) as client:
        r = await client.post("/jobs", json=job_body)
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["status"] == "queued"
        assert r.headers["location"] == f"/jobs/{job['id']}"
        # the stored config is what the trainer runs: resolved paths, the job's own folder
        cfg = job["config"]
        assert cfg["train"] == str((data_dir / "sample" / "train").resolve())
        assert cfg["ckpt_dir"].endswith(f"jobs/{job['id']}")
        assert cfg["epochs"] == 2 and cfg["batch_size"] == 256  # defaults of TrainConfig filled

        done = await wait_job(client, job["id"])
        assert done["status"] == "succeeded", done
        assert [m["epoch"] for m in done["metrics"]] == [1, 2]
        assert done["best"]["epoch"] == 2 and done["best"]["metric"] == "acc"
        assert done["best"]["checkpoint"].endswith("backbone_best.pt")
        assert done["thresholds"] == {"acc": 0.5, "far_1e-2": 0.8, "far_1e-3": 0.9}
        assert done["progress"]["percent"] == 100.0
        assert done["started_at"] and done["finished_at"] and done["attempts"] == 1
        assert done["exit_code"] == 0 and done["error"] is None
        # the job folder holds what the contract says
        folder = data_dir.parent / "models" / "jobs" / job["id"]
        assert json.loads((folder / "config.json").read_text())["ckpt_dir"] == str(folder)
        assert (folder / "events.jsonl").read_text().count("\n") > 5


async def test_preset_fills_unset_fields(make_app):
    async with running(make_app()) as client:
        r = await client.post(
            "/jobs",
            json={
                "preset": "cpu-small",
                "train": "sample/train",
                "val": "sample/val",
                "pairs_file": "sample/pairs.txt",
                "epochs": 1,
            },
        )
        assert r.status_code == 202, r.text
        cfg = r.json()["config"]
        assert cfg["img_size"] == 56 and cfg["crop"] == 1.0 and cfg["train_mode"] == "arcface" and cfg["epochs"] == 1
        assert cfg["pairs_file"].endswith("sample/pairs.txt")


async def test_list_newest_first_and_filter(make_app, job_body):
    async with running(make_app()) as client:
        ids = []
        for seed in (MODE.OK, MODE.DATA_ERROR):
            r = await client.post("/jobs", json={**job_body, "seed": seed})
            ids.append(r.json()["id"])
        await wait_job(client, ids[0])
        await wait_job(client, ids[1])
        r = await client.get("/jobs")
        assert r.status_code == 200
        body = r.json()
        assert [j["id"] for j in body["jobs"]] == ids[::-1] and body["total"] == 2
        r = await client.get("/jobs", params={"status": "failed"})
        assert [j["id"] for j in r.json()["jobs"]] == [ids[1]] and r.json()["total"] == 1
        r = await client.get("/jobs", params={"status": "succeeded", "limit": 1})
        assert [j["id"] for j in r.json()["jobs"]] == [ids[0]]
        r = await client.get("/jobs", params={"limit": 1, "offset": 1})
        assert [j["id"] for j in r.json()["jobs"]] == [ids[0]]
        r = await client.get("/jobs", params={"status": "bogus"})
        assert r.status_code == 422 and "status" in r.json()["detail"]
        r = await client.get("/jobs", params={"limit": 0})
        assert r.status_code == 422


@pytest.mark.parametrize("path", ["/jobs/{}", "/jobs/{}/logs"])
async def test_unknown_job_is_404(make_app, path):
    async with running(make_app()) as client:
        for job_id in ("0" * 32, "nope", "../../etc/passwd", "x" * 5000):
            r = await client.get(path.format(job_id))
            assert r.status_code == 404, (job_id, r.text)
            assert len(r.json()["detail"]) < 200
            if "/" not in job_id:
                assert "no job" in r.json()["detail"]
        for action in ("cancel", "resume"):
            r = await client.post(f"/jobs/{'0' * 32}/{action}")
            assert r.status_code == 404


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("train", "../outside", "'..'"),
        ("train", "sample/../../outside", "'..'"),
        ("train", "/etc", "not a relative path"),
        ("val", "~/photos", "not a relative path"),
        ("train", "escape", "outside the data root"),
        ("train", "escape/person", "outside the data root"),
        ("train", "sample/nothing", "does not exist"),
        ("train", "sample/pairs.txt", "not a folder"),
        ("val", "", "empty"),
        ("pairs_file", "escape_file.txt", "outside the data root"),
        ("pairs_file", "sample/train", "not a file"),
        ("pretrained_weights", "../secret.txt", "'..'"),
        ("pretrained_weights", "missing.pth", "does not exist"),
        ("train", "sample/tra\x00in", "NUL"),
    ],
)
async def test_paths_outside_or_missing_are_422_naming_the_field(make_app, job_body, field, value, needle):
    async with running(make_app()) as client:
        r = await client.post("/jobs", json={**job_body, field: value})
        assert r.status_code == 422, r.text
        body = r.json()
        assert body["detail"].startswith(f"{field}:"), body
        assert needle in body["detail"], body
        assert body["field"] == field
        assert (await client.get("/jobs")).json()["total"] == 0


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"epochs": 0}, "epochs"),
        ({"epochs": -3}, "epochs"),
        ({"epochs": 10**12}, "epochs"),
        ({"batch_size": 1}, "batch_size"),
        ({"lr": -1}, "lr"),
        ({"lr": "fast"}, "lr"),
        ({"arcface_m": 3.0}, "arcface_m"),
        ({"arcface_s": 0}, "arcface_s"),
        ({"img_size": 8}, "img_size"),
        ({"img_size": 100000}, "img_size"),
        ({"train_mode": "magic"}, "train_mode"),
        ({"unknown_field": 1}, "unknown_field"),
        ({"train": "x" * 5000}, "train"),
        ({"best_metric": "pairs_acc"}, "pairs_file"),
        ({"freeze_backbone_epochs": 5, "epochs": 2}, "freeze_backbone_epochs"),
        ({"preset": "gpu-huge"}, "preset"),
        ({"ckpt_dir": "/tmp/elsewhere"}, "ckpt_dir"),
        ({"resume": "models/last.pt"}, "resume"),
        ({"nnodes": 2, "rdzv_endpoint": "evil.example:29400"}, "nnodes"),
        ({"rdzv_endpoint": "evil.example:29400"}, "rdzv_endpoint"),
        ({"nproc_per_node": 512}, "nproc_per_node: 512 is more than this server allows"),
        ({"threads": 1000}, "threads: 1000 is more than this server allows"),
        ({"workers": 65}, "ask for at most 64"),
    ],
)
async def test_invalid_configs_are_422(make_app, job_body, change, needle):
    async with running(make_app()) as client:
        r = await client.post("/jobs", json={**job_body, **change})
        assert r.status_code == 422, r.text
        assert needle in r.json()["detail"], r.json()


@pytest.mark.parametrize(
    "raw",
    [
        '{"train": "sample/train", "lr": NaN}',
        '{"train": "sample/train", "lr": Infinity}',
        '{"train": "sample/train", "epochs": NaN}',
        '{"train": "sample/train", "arcface_s": -Infinity}',
    ],
)
async def test_nan_and_infinity_are_422(make_app, raw):
    async with running(make_app()) as client:
        r = await client.post("/jobs", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 422, r.text
        json.dumps(r.json(), allow_nan=False)  # the answer itself is valid JSON


@pytest.mark.parametrize(
    "content,ctype",
    [
        (b"", "application/json"),
        (b"{not json", "application/json"),
        (b"[1, 2]", "application/json"),
        (b"null", "application/json"),
        (b"epochs=3", "application/x-www-form-urlencoded"),
        ("\u00ff\u00fe".encode("latin-1"), "application/json"),
    ],
)
async def test_malformed_bodies_are_4xx(make_app, content, ctype):
    async with running(make_app()) as client:
        r = await client.post("/jobs", content=content, headers={"content-type": ctype})
        assert 400 <= r.status_code < 500, r.text
        assert isinstance(r.json()["detail"], str)
        assert (await client.get("/health")).status_code == 200


async def test_oversized_body_is_413(make_app, job_body):
    async with running(make_app()) as client:
        big = json.dumps({**job_body, "pad": "x" * (2 * 1024 * 1024)})
        r = await client.post("/jobs", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413

        async def chunks():  # no Content-Length: the limit applies while streaming
            for _ in range(40):
                yield b" " * 65536

        r = await client.post("/jobs", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413


async def test_queue_limit_is_429(make_app, job_body):
    async with running(make_app(max_queued_jobs=2)) as client:
        slow = (await client.post("/jobs", json={**job_body, "seed": MODE.SLOW})).json()
        await wait_job(client, slow["id"], until=("running",))
        assert (await client.post("/jobs", json=job_body)).status_code == 202
        assert (await client.post("/jobs", json=job_body)).status_code == 202
        r = await client.post("/jobs", json=job_body)
        assert r.status_code == 429 and "queued" in r.json()["detail"]
        assert r.headers.get("retry-after")


async def test_cancel_queued_job(make_app, job_body):
    async with running(make_app()) as client:
        slow = (await client.post("/jobs", json={**job_body, "seed": MODE.SLOW})).json()
        queued = (await client.post("/jobs", json=job_body)).json()
        r = await client.post(f"/jobs/{queued['id']}/cancel")
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        r = await client.post(f"/jobs/{queued['id']}/cancel")
        assert r.status_code == 409 and "cancelled" in r.json()["detail"]
        await client.post(f"/jobs/{slow['id']}/cancel")
        assert (await wait_job(client, slow["id"]))["status"] == "cancelled"
        # the cancelled queued job never ran
        assert (await client.get(f"/jobs/{queued['id']}")).json()["started_at"] is None


async def test_cancel_finished_job_is_409(make_app, job_body):
    async with running(make_app()) as client:
        job = (await client.post("/jobs", json=job_body)).json()
        await wait_job(client, job["id"])
        r = await client.post(f"/jobs/{job['id']}/cancel")
        assert r.status_code == 409 and "succeeded" in r.json()["detail"]


async def test_logs_tail(make_app, job_body):
    async with running(make_app()) as client:
        job = (await client.post("/jobs", json={**job_body, "seed": MODE.CRASH})).json()
        await wait_job(client, job["id"])
        r = await client.get(f"/jobs/{job['id']}/logs")
        assert r.status_code == 200
        lines = r.json()["lines"]
        assert lines[0].startswith("--- attempt 1") and lines[-1] == "RuntimeError: fake internal failure"
        r = await client.get(f"/jobs/{job['id']}/logs", params={"tail": 1})
        assert r.json()["lines"] == ["RuntimeError: fake internal failure"]
        for bad in (0, -1, 10**6, "many"):
            assert (await client.get(f"/jobs/{job['id']}/logs", params={"tail": bad})).status_code == 422


async def test_logs_of_queued_job_are_empty(make_app, job_body):
    async with running(make_app()) as client:
        await client.post("/jobs", json={**job_body, "seed": MODE.SLOW})
        queued = (await client.post("/jobs", json=job_body)).json()
        r = await client.get(f"/jobs/{queued['id']}/logs")
        assert r.status_code == 200 and r.json()["lines"] == []


async def test_resume_refused_for_wrong_states(make_app, job_body):
    async with running(make_app()) as client:
        ok = (await client.post("/jobs", json=job_body)).json()
        await wait_job(client, ok["id"])
        r = await client.post(f"/jobs/{ok['id']}/resume")
        assert r.status_code == 409 and "succeeded" in r.json()["detail"]
        bad = (await client.post("/jobs", json={**job_body, "seed": MODE.DATA_ERROR})).json()
        await wait_job(client, bad["id"])
        r = await client.post(f"/jobs/{bad['id']}/resume")
        assert r.status_code == 409 and "no last.pt" in r.json()["detail"]


async def test_job_json_never_carries_nan(make_app, job_body):
    """The fake trainer reports a NaN loss at the first step."""
    async with running(make_app()) as client:
        job = (await client.post("/jobs", json=job_body)).json()
        await wait_job(client, job["id"])
        r = await client.get(f"/jobs/{job['id']}")
        assert r.status_code == 200
        text = r.text
        assert "NaN" not in text
        assert all(m["train_loss"] is None or math.isfinite(m["train_loss"]) for m in r.json()["metrics"])


async def test_more_processes_than_gpus_is_422_and_names_the_fix(make_app, job_body, monkeypatch):
    """On a GPU host each process of a job needs a GPU of its own (NCCL); the same job on CPUs is
    accepted."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr("app.paths.usable_cpus", lambda: 4)
    async with running(make_app()) as client:
        r = await client.post("/jobs", json={**job_body, "nproc_per_node": 2})
        assert r.status_code == 422, r.text
        detail = r.json()["detail"]
        assert "nproc_per_node: 2 processes on GPUs need 2 GPUs" in detail and "1 or fewer" in detail
        assert (await client.get("/jobs")).json()["total"] == 0  # refused before a job was made
        cpu = await client.post("/jobs", json={**job_body, "nproc_per_node": 2, "device": "cpu"})
        assert cpu.status_code == 202, cpu.text


async def test_a_cuda_job_on_a_server_without_a_gpu_is_422_not_a_failed_job(make_app, job_body, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    async with running(make_app()) as client:
        r = await client.post("/jobs", json={**job_body, "device": "cuda"})
        assert r.status_code == 422, r.text
        assert r.json()["field"] == "device" and "no usable CUDA GPU; use auto or cpu" in r.json()["detail"]
        assert (await client.get("/jobs")).json()["total"] == 0
        auto = await client.post("/jobs", json={**job_body, "device": "auto"})
        assert auto.status_code == 202, auto.text


async def test_a_teacher_this_server_lacks_is_422_naming_the_install(make_app, job_body, monkeypatch):
    """`distill dlib` needs an optional extra: a server without it refuses the job, it does not fail
    later."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "dlib" else real(name, *a))
    async with running(make_app()) as client:
        r = await client.post("/jobs", json={**job_body, "train_mode": "arcface", "distill": "dlib"})
        assert r.status_code == 422, r.text
        assert "pip install 'faceid[teacher]'" in r.json()["detail"]
        assert (await client.get("/jobs")).json()["total"] == 0
        r = await client.post("/jobs", json={**job_body, "distill": "teacher"})
        assert r.status_code == 422 and "distill" in r.text
