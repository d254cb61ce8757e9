"""Two-process training on this CPU: torchrun + DistributedDataParallel over gloo, through the CLI
and through POST /jobs; a killed rank fails the run with no process left behind."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")]

SMALL = [
    "--train_mode",
    "arcface",
    "--img_size",
    "32",
    "--batch_size",
    "8",
    "--eval_pairs",
    "200",
    "--workers",
    "0",
    "--threads",
    "1",
    "--lr",
    "0.001",
    "--optimizer",
    "adamw",
    "--nproc_per_node",
    "2",
    "--device",
    "cpu",
]  # gloo, also on a GPU host


def _env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("FACEID_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))
    }
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        p, pp = map(int, line.split())
        children.setdefault(pp, []).append(p)
    found, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            found.append(c)
            todo.append(c)
    return found


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--train", "no/such/folder", "--val", str(SAMPLE / "val")], "--train folder not found: no/such/folder"),
        (
            ["--train", str(SAMPLE / "train"), "--val", str(SAMPLE / "val"), "--pretrained_weights", "missing.pth"],
            "--pretrained_weights not found: missing.pth",
        ),
    ],
)
def test_what_every_rank_would_fail_is_one_line_before_torchrun_starts(tmp_path, flags, needle):
    proc = subprocess.run(
        [sys.executable, "-m", "faceid.cli", "train", *SMALL, *flags, "--ckpt_dir", str(tmp_path / "m")],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "launching" not in ln]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr[-2000:]
    assert "torch.distributed" not in proc.stderr and "Traceback" not in proc.stderr


def test_two_process_gloo_training_through_the_cli(tmp_path):
    ck, ev = tmp_path / "ck", tmp_path / "events.jsonl"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "faceid.train",
            "--train",
            str(SAMPLE / "train"),
            "--val",
            str(SAMPLE / "val"),
            "--ckpt_dir",
            str(ck),
            "--events_file",
            str(ev),
            "--max_steps_per_epoch",
            "3",
            "--epochs",
            "1",
            *SMALL,
        ],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    events = _events(ev)
    kinds = [e["event"] for e in events]
    # Events come from rank 0 only: one start, one epoch record, one finish.
    assert kinds.count("start") == 1 and kinds.count("finished") == 1 and kinds.count("epoch") == 1
    start = next(e for e in events if e["event"] == "start")
    assert start["world_size"] == 2
    # 300 sample images / batch 8 = 37 batches, sharded over 2 ranks, capped at 3 steps.
    assert start["steps_per_epoch"] == 3
    for name in ("backbone_best.pt", "last.pt", "metrics.jsonl", "config.json"):
        assert (ck / name).is_file(), name
    rec = json.loads((ck / "metrics.jsonl").read_text().splitlines()[0])
    assert -1 <= rec["th"] <= 1 and 0 <= rec["auc"] <= 1
    from faceid.checkpoint import load_checkpoint

    ckpt = load_checkpoint(ck / "backbone_best.pt")
    assert not any(k.startswith("module.") for k in ckpt["model"])  # DDP prefix never leaks out


def test_killing_one_rank_fails_the_run_and_leaves_no_process(tmp_path):
    ev = tmp_path / "events.jsonl"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "faceid.train",
            "--train",
            str(SAMPLE / "train"),
            "--val",
            str(SAMPLE / "val"),
            "--ckpt_dir",
            str(tmp_path / "ck"),
            "--events_file",
            str(ev),
            "--epochs",
            "50",
            "--progress_step_pct",
            "1",
            *SMALL,
        ],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not (ev.exists() and any(e["event"] == "progress" for e in _events(ev))):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no progress within 300 s"
            time.sleep(0.2)
        workers = [
            p
            for p in _descendants(proc.pid)
            if "faceid.train" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")
        ]
        assert len(workers) >= 2, workers
        os.kill(workers[-1], signal.SIGKILL)
        rc = proc.wait(timeout=120)
        assert rc != 0
        time.sleep(1)
        alive = [
            p
            for p in workers
            if Path(f"/proc/{p}").exists() and "Z" not in Path(f"/proc/{p}/stat").read_text().split()[2]
        ]
        assert alive == [], f"ranks left behind: {alive}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_two_process_job_through_post_jobs(tmp_path):
    import anyio
    import httpx

    from app.main import create_app
    from app.settings import Settings

    settings = Settings(data_dir=REPO / "data", models_dir=tmp_path / "models", poll_interval_s=0.1)
    app = create_app(settings)
    body = {
        "train_mode": "arcface",
        "train": "sample/train",
        "val": "sample/val",
        "img_size": 32,
        "batch_size": 8,
        "epochs": 1,
        "max_steps_per_epoch": 2,
        "eval_pairs": 200,
        "workers": 0,
        "threads": 1,
        "optimizer": "adamw",
        "lr": 0.001,
        "nproc_per_node": 2,
        "device": "cpu",
    }

    async def scenario() -> dict:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://faceid.test") as c:
                r = await c.post("/jobs", json=body)
                assert r.status_code == 202, r.text
                job_id = r.json()["id"]
                deadline = time.monotonic() + 600
                while True:
                    job = (await c.get(f"/jobs/{job_id}")).json()
                    if job["status"] in ("succeeded", "failed", "cancelled", "interrupted"):
                        break
                    assert time.monotonic() < deadline, job
                    await anyio.sleep(0.5)
                if job["status"] != "succeeded":
                    logs = (await c.get(f"/jobs/{job_id}/logs", params={"tail": 20})).json()["lines"]
                    pytest.fail(f"job {job['status']}: {job.get('error')}\n" + "\n".join(logs))
                model = (await c.get("/model")).json()
                return {"job": job, "model": model}

    out = anyio.run(scenario)
    job = out["job"]
    assert len(job["metrics"]) == 1 and 0 <= job["metrics"][0]["auc"] <= 1
    assert job["best"]["epoch"] == 1
    assert job["id"] in json.dumps(out["model"])


@pytest.mark.skipif(importlib.util.find_spec("dlib") is None, reason="pip install 'faceid[teacher]'")
def test_two_processes_distill_with_one_computing_the_descriptors(tmp_path):
    """The first process computes the teacher's descriptors while the other waits, then reads them
    from the cache: both train on the same targets, and nothing deadlocks."""
    train = tmp_path / "train"
    for d in sorted(p for p in (SAMPLE / "train").iterdir() if p.is_dir())[:6]:
        (train / d.name).mkdir(parents=True)
        for f in sorted(d.glob("*.jpg"))[:4]:
            shutil.copy(f, train / d.name / f.name)
    ck, ev = tmp_path / "ck", tmp_path / "events.jsonl"
    env = {**_env(), "FACEID_CACHE_DIR": str(tmp_path / "cache")}
    r = subprocess.run(
        [sys.executable, "-m", "faceid.train", "--train", str(train), "--val", str(SAMPLE / "val")]
        + ["--ckpt_dir", str(ck), "--events_file", str(ev), "--max_steps_per_epoch", "2", "--epochs", "1"]
        + ["--distill", "dlib", *SMALL],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("computing dlib descriptors of 24 of 24 images") == 1, r.stderr[-3000:]
    from faceid.checkpoint import load_checkpoint

    last = load_checkpoint(ck / "last.pt")
    assert last["config"]["distill"] == "dlib" and last["projection"]["weight"].shape[0] == 128
