"""Checkpoint faults with real faceid checkpoints and the real model loader: corrupt, foreign and
malicious files refused with a clear error while the current model keeps answering; a writer
SIGKILLed in the middle of a save never leaves a half-written checkpoint; a real training run
whose checkpoint write fails (disk full) keeps its previous best, keeps the served model, and
resumes.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from core_fixtures import SAMPLE_TRAIN, SAMPLE_VAL
from reliability_helpers import HERE
from service_helpers import running, wait_job

from app.main import create_app
from faceid.checkpoint import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.anyio


def _pair() -> dict:
    files = sorted(SAMPLE_VAL.glob("*/*.jpg"))[:2]
    return {"image1": ("a.jpg", files[0].read_bytes()), "image2": ("b.jpg", files[1].read_bytes())}


class Evil:
    """Unpickling this runs a command: what weights_only=True exists to refuse."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _bad_checkpoints(good: Path, folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, a word the refusal must contain)."""
    folder.mkdir(parents=True, exist_ok=True)
    ck = load_checkpoint(good)
    out: dict[str, tuple[Path, str]] = {}

    def put(name: str, word: str) -> Path:
        out[name] = (folder / f"{name}.pt", word)
        return out[name][0]

    data = good.read_bytes()
    put("truncated", "corrupt").write_bytes(data[: len(data) // 2])
    put("random bytes", "corrupt").write_bytes(bytes(random.Random(3).getrandbits(8) for _ in range(4096)))
    put("empty", "corrupt").write_bytes(b"")
    torch.save({"weight": torch.zeros(3), "bias": torch.zeros(1)}, put("foreign state dict", "not a FaceID"))
    torch.save({"x": Evil(folder / "PWNED")}, put("malicious pickle", "weights-only"))
    torch.save({**ck, "embedding_size": 64}, put("wrong shapes", "does not fit"))
    # The variants below are refused before the weights are used: a few small tensors stand in
    # for the 25M parameters, so that writing them costs nothing.
    small = {**ck, "model": {k: v for k, v in list(ck["model"].items())[:3]}}
    torch.save({k: v for k, v in small.items() if k != "model"}, put("no weights", "lacks model"))
    torch.save({**small, "format_version": 99}, put("future format", "version 99"))
    nan = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in small["model"].items()}
    torch.save({**small, "model": nan}, put("nan weights", "not finite"))
    torch.save({**small, "thresholds": "high"}, put("thresholds not a dict", "malformed"))
    torch.save({**small, "img_size": "large"}, put("img_size not a number", "malformed"))
    torch.save({**small, "model": [1, 2, 3]}, put("weights not a dict", "malformed"))
    put("a folder", "not found").mkdir()
    with open(put("20 GB sparse file", "corrupt"), "wb") as f:
        f.truncate(20 << 30)
    return out


async def test_corrupt_foreign_and_malicious_checkpoints_are_refused(make_settings, real_ckpt_copy, tmp_path):
    good = real_ckpt_copy("good.pt")
    bad = _bad_checkpoints(good, tmp_path / "bad")
    app = create_app(make_settings(checkpoint=good, device="cpu"))  # the real loader
    async with running(app) as client:
        before = (await client.get("/model")).json()
        assert before["source"] == "env" and before["img_size"] == 32
        reference = (await client.post("/verify", files=_pair())).json()
        store = app.state.store
        for i, (name, (path, word)) in enumerate(bad.items()):
            job_id = f"{i:032x}"
            store.create(job_id, {"train": "x"}, 100)
            store.update(job_id, status="succeeded", checkpoint=str(path))
            t0 = time.monotonic()
            r = await client.post(f"/models/{job_id}/activate")
            assert r.status_code == 409, (name, r.status_code, r.text)
            detail = r.json()["detail"]
            assert "cannot be served" in detail and word in detail and "current model stays" in detail, (name, detail)
            assert time.monotonic() - t0 < 30, name
            after = (await client.get("/model")).json()
            # the same model; only the batching counters moved (the /verify calls)
            assert {**after, "batching": None} == {**before, "batching": None}, name
            r = await client.post("/verify", files=_pair())
            assert r.status_code == 200 and r.json() == reference, name
        assert not (tmp_path / "bad" / "PWNED").exists(), "a checkpoint ran code"
        assert (await client.get("/health")).status_code == 200


async def test_malicious_checkpoint_at_start_is_refused_and_the_server_runs(make_settings, real_ckpt_copy, tmp_path):
    path, word = _bad_checkpoints(real_ckpt_copy(), tmp_path / "bad")["malicious pickle"]
    app = create_app(make_settings(checkpoint=path, device="cpu"))
    async with running(app) as client:
        assert (await client.get("/health")).status_code == 200
        r = await client.get("/ready")
        assert r.status_code == 503 and word in r.json()["detail"], r.text
        r = await client.post("/verify", files=_pair())
        assert r.status_code == 503 and word in r.json()["detail"]
    assert not (tmp_path / "bad" / "PWNED").exists()


def test_a_save_killed_at_random_moments_never_leaves_a_half_written_checkpoint(real_checkpoint, tmp_path):
    """A child process rewrites backbone_best.pt in a loop and is SIGKILLed at random moments
    (as the OOM killer would): the file is always the complete previous or new version."""
    ck = load_checkpoint(real_checkpoint)
    target = tmp_path / "backbone_best.pt"
    save_checkpoint({**ck, "epoch": 0}, target)
    rng = random.Random(7)
    for _ in range(3):
        pid = os.fork()
        if pid == 0:  # the writer
            try:
                for epoch in range(1, 1000):
                    save_checkpoint({**ck, "epoch": epoch}, target)
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.05, 1.0))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        loaded = load_checkpoint(target)  # never raises: complete, loadable
        assert loaded["epoch"] >= 0 and loaded["model"].keys() == ck["model"].keys()
        assert torch.equal(loaded["model"]["embed.0.weight"], ck["model"]["embed.0.weight"])
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "backbone_best.pt"]
    assert all(p.startswith(".backbone_best.pt.") and p.endswith(".tmp") for p in leftovers), leftovers


def test_damaged_checkpoint_files_only_ever_raise_checkpoint_error(tmp_path):
    """Fuzz: random bytes, random truncations and random byte flips of a small checkpoint. Loading
    either works or raises CheckpointError (a 409 in the service), never anything else (a 500)."""
    from faceid.checkpoint import REQUIRED_KEYS
    from faceid.errors import CheckpointError

    obj = {k: 1 for k in REQUIRED_KEYS} | {
        "format": "faceid-checkpoint",
        "format_version": 1,
        "model": {"w": torch.arange(64.0), "b": torch.zeros(8)},
    }
    save_checkpoint(obj, tmp_path / "small.pt")
    data = (tmp_path / "small.pt").read_bytes()
    rng = random.Random(1234)
    path = tmp_path / "damaged.pt"
    outcomes = {"loaded": 0, "refused": 0}
    for i in range(300):
        kind = i % 3
        if kind == 0:
            blob = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 2000)))
        elif kind == 1:
            blob = data[: rng.randint(0, len(data) - 1)]
        else:
            blob = bytearray(data)
            for _ in range(rng.randint(1, 8)):
                blob[rng.randrange(len(blob))] = rng.getrandbits(8)
            blob = bytes(blob)
        path.write_bytes(blob)
        try:
            load_checkpoint(path)
            outcomes["loaded"] += 1
        except CheckpointError as e:
            assert str(path) in str(e)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 200, outcomes


def _small_dataset(data_dir: Path) -> None:
    """data_dir/real/{train,val}: 6 training people x 4 images, 4 validation people x 3."""
    for split, src, n_ids, n_img in (("train", SAMPLE_TRAIN, 6, 4), ("val", SAMPLE_VAL, 4, 3)):
        for d in sorted(p for p in src.iterdir() if p.is_dir())[:n_ids]:
            (data_dir / "real" / split / d.name).mkdir(parents=True)
            for f in sorted(d.glob("*.jpg"))[:n_img]:
                shutil.copy(f, data_dir / "real" / split / d.name / f.name)


REAL_JOB = {
    "train": "real/train",
    "val": "real/val",
    "train_mode": "arcface",
    "epochs": 2,
    "img_size": 32,
    "batch_size": 8,
    "max_steps_per_epoch": 1,
    "eval_pairs": 100,
    "workers": 0,
    "threads": 1,
    "device": "cpu",
    "embedding_size": 512,
    "progress_step_pct": 50,
    "seed": 0,
}


@pytest.mark.slow
async def test_checkpoint_write_fails_in_a_real_run(make_settings, real_ckpt_copy, data_dir):
    """Real `python -m faceid.train` whose first save of epoch 2 fails with ENOSPC (disk full)
    after writing a few bytes: the job fails with that reason; its epoch-1 backbone_best.pt and
    last.pt are intact, no temp file is left, the served model is unchanged; resume finishes the
    run and its model is served."""
    _small_dataset(data_dir)
    served = real_ckpt_copy("served.pt")
    settings = make_settings(
        checkpoint=served,
        device="cpu",
        poll_interval_s=0.1,
        trainer_cmd=(sys.executable, str(HERE / "trainers.py"), "enospc_at:3"),
    )
    app = create_app(settings)
    async with running(app) as client:
        before = (await client.get("/model")).json()
        r = await client.post("/jobs", json=REAL_JOB)
        assert r.status_code == 202, r.text
        job = await wait_job(client, r.json()["id"], timeout=300)
        folder = settings.jobs_dir / job["id"]
        logs = (await client.get(f"/jobs/{job['id']}/logs")).json()["lines"]
        assert job["status"] == "failed", (job, logs[-20:])
        assert "No space left on device" in job["error"], job["error"]
        for name in ("backbone_best.pt", "last.pt"):
            assert load_checkpoint(folder / name)["epoch"] == 1, name
        assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]
        assert [m["epoch"] for m in job["metrics"]] == [1]
        assert (await client.get("/model")).json() == before
        assert (await client.post("/verify", files=_pair())).json()["model"] == before["id"]

        r = await client.post(f"/jobs/{job['id']}/resume")
        assert r.status_code == 202, r.text
        done = await wait_job(client, job["id"], timeout=300)
        assert done["status"] == "succeeded", (done, (await client.get(f"/jobs/{job['id']}/logs")).json())
        assert done["attempts"] == 2 and [m["epoch"] for m in done["metrics"]] == [1, 2]
        assert load_checkpoint(folder / "last.pt")["epoch"] == 2
        model = (await client.get("/model")).json()
        assert model["job_id"] == job["id"] and model["epoch"] in (1, 2)
        r = await client.post("/verify", files=_pair())
        assert r.status_code == 200 and r.json()["model"] == job["id"]
