"""End to end: a real uvicorn process, a real training job on data/sample, then /verify.

Starts `uvicorn --factory app.main:create_app` on a free loopback port with the repository's data
root and a temporary models folder, trains a tiny model (2 short epochs at 32 px, about a minute on
two CPU cores), watches its progress, and checks that the server answers with that job's model:
its /embed and /verify answers on the sample's pairs.txt are the ones the job's checkpoint gives
through faceid.inference, with the job's calibrated threshold. Ten steps teach the network little;
that training learns is tests/test_learning.py's claim, on real faces against the untrained
network.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from real_server import REPO, real_server

SAMPLE = REPO / "data" / "sample"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(
        not (REPO / "faceid" / "train.py").exists() or not (REPO / "faceid" / "inference.py").exists(),
        reason="needs faceid.train and faceid.inference",
    ),
    pytest.mark.skipif(not (SAMPLE / "pairs.txt").exists(), reason="needs data/sample"),
]

JOB = {
    "preset": "cpu-small",
    "train": "sample/train",
    "val": "sample/val",
    "pairs_file": "sample/pairs.txt",
    "img_size": 32,
    "batch_size": 16,
    "epochs": 2,
    "max_steps_per_epoch": 5,
    "eval_pairs": 500,
    "workers": 0,
    "progress_step_pct": 10,
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with real_server(tmp_path_factory.mktemp("models")) as running_server:
        yield running_server


def _pairs(limit: int) -> tuple[list[tuple[Path, Path]], list[tuple[Path, Path]]]:
    def image(name: str, idx: str) -> Path:
        return SAMPLE / "val" / name / f"{name}_{int(idx):04d}.jpg"

    same, diff = [], []
    for line in (SAMPLE / "pairs.txt").read_text().splitlines()[1:]:
        parts = line.split()
        if len(parts) == 3:
            same.append((image(parts[0], parts[1]), image(parts[0], parts[2])))
        elif len(parts) == 4:
            diff.append((image(parts[0], parts[1]), image(parts[2], parts[3])))
    return same[:limit], diff[:limit]


def test_train_then_verify(server):
    base, proc, log_path = server
    with httpx.Client(base_url=base, timeout=60) as client:
        assert client.get("/ready").status_code == 503
        r = client.post("/jobs", json=JOB)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        assert r.headers["location"] == f"/jobs/{job_id}"

        seen = []
        deadline = time.monotonic() + 600
        while True:
            job = client.get(f"/jobs/{job_id}").json()
            if job["progress"]:
                p = job["progress"]
                seen.append((p["epoch"], p["step"], p["percent"]))
            if job["status"] in ("succeeded", "failed", "cancelled", "interrupted"):
                break
            assert client.get("/health").status_code == 200
            assert time.monotonic() < deadline, f"job still {job['status']}: {job}"
            time.sleep(0.3)
        assert job["status"] == "succeeded", (job, client.get(f"/jobs/{job_id}/logs").json())
        percents = [s[2] for s in seen]
        assert percents == sorted(percents), "progress went backwards"
        assert len(set(seen)) >= 3 and any(0 < p < 100 for p in percents), f"progress did not move: {seen}"
        assert [m["epoch"] for m in job["metrics"]] == [1, 2]
        for key in ("train_loss", "acc", "th", "auc", "tar_1e-2", "tar_1e-3", "lr"):
            assert key in job["metrics"][0], key
        assert job["best"]["epoch"] in (1, 2) and job["checkpoint"].endswith("backbone_best.pt")
        assert set(job["thresholds"]) >= {"acc", "far_1e-2", "far_1e-3"}

        model = client.get("/model").json()
        assert model["job_id"] == job_id and model["img_size"] == 32 and model["embedding_size"] == 512
        assert client.get("/ready").json()["ready"] is True

        one = next(iter((SAMPLE / "val").glob("*/*.jpg")))
        r = client.post("/embed", files={"image": (one.name, one.read_bytes(), "image/jpeg")})
        assert r.status_code == 200 and r.json()["dim"] == 512 and r.json()["model"] == job_id
        assert abs(np.linalg.norm(r.json()["embedding"]) - 1) < 1e-3
        assert r.json()["face"]["faces_found"] == 1 and r.json()["face"]["score"] > 0.9
        # a phone-sized photo: the server finds and aligns its face exactly as the model's own
        # Verifier (and evaluation) does, so the answer is that embedding
        import io

        from PIL import Image

        from faceid.inference import Verifier

        buf = io.BytesIO()
        with Image.open(one) as im:
            im.convert("RGB").resize((1600, 1600), Image.BICUBIC).save(buf, "JPEG", quality=90)
        r = client.post("/embed", files={"image": ("big.jpg", buf.getvalue(), "image/jpeg")})
        assert r.status_code == 200, r.text
        v = Verifier.from_checkpoint(job["checkpoint"], device="cpu")
        assert v.aligned and model["faces"]["align"] == "arcface"  # the default for new jobs
        prepared = v.prepare_face(v.read(buf.getvalue()))  # decoded at 1/2, as the server does
        np.testing.assert_allclose(r.json()["embedding"], v.embed([prepared])[0], atol=1e-5)
        assert r.json()["face"] == prepared.face_json()

        same_pairs, diff_pairs = _pairs(8)
        for a, b in same_pairs + diff_pairs:
            r = client.post(
                "/verify",
                files={
                    "image1": (a.name, a.read_bytes(), "image/jpeg"),
                    "image2": (b.name, b.read_bytes(), "image/jpeg"),
                },
            )
            assert r.status_code == 200, r.text
            res = r.json()
            assert res["threshold_name"] == "acc" and res["model"] == job_id
            assert res["threshold"] == pytest.approx(job["thresholds"]["acc"], abs=1e-6)
            expected = v.verify(v.prepare_face(v.read(a)), v.prepare_face(v.read(b)))
            assert res["similarity"] == pytest.approx(expected["similarity"], abs=1e-4), (a, b)
            assert res["match"] == expected["match"] == (res["similarity"] >= res["threshold"])

        r = client.post("/verify", files={"image1": ("x.jpg", b"not an image"), "image2": ("y.jpg", b"")})
        assert r.status_code == 422
        assert client.get("/health").status_code == 200
    assert proc.poll() is None
