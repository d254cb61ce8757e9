"""Faults that need a real server process (uvicorn): killed with SIGKILL in the middle of a job and
started again; an upload far over the limit streamed at it; a models folder it cannot write, or a
damaged job database, at start. The server runs the production app; where a model is served it
is the fake trainer's, through serve_factory.py, so no torch is loaded and a start takes a second.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from reliability_helpers import REPO, ServerProcess, alive, free_port, rss_kb, wait_until
from service_helpers import FAKE_TRAINER, MODE, face_like

pytestmark = pytest.mark.e2e

JOB = {"train": "sample/train", "val": "sample/val", "epochs": 2, "img_size": 32}


def _wait_job(
    client, job_id: str, until=("succeeded", "failed", "cancelled", "interrupted"), timeout: float = 30
) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] in until:
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.05)


def _env(data_dir: Path, models: Path, **extra: str) -> dict[str, str]:
    return {
        "FACEID_DATA_DIR": str(data_dir),
        "FACEID_MODELS_DIR": str(models),
        "FACEID_TRAINER_CMD": f"{sys.executable} {FAKE_TRAINER} --step_s 0.02",
        "FACEID_CANCEL_GRACE_S": "5",
        **extra,
    }


def _kill_leftovers(models: Path) -> None:
    """Trainers (and their groups) that a failed test left running: those whose command line
    names a job folder of this test."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if str(models).encode() in cmdline:
            for kill in (os.killpg, os.kill):  # its group (a trainer leads one), else itself
                try:
                    kill(int(proc.name), signal.SIGKILL)
                    break
                except (ProcessLookupError, PermissionError):
                    pass


@pytest.fixture
def models(tmp_path):
    yield tmp_path / "models"
    _kill_leftovers(tmp_path / "models")


def test_server_killed_mid_job_then_restarted(data_dir, tmp_path, models):
    """SIGKILL leaves a `running` row, an orphaned trainer (own session) and the lock file. The next
    start marks the job interrupted and stops the orphan and its group; the history and the served
    model are as before; the job resumes from its last.pt and its model is then served."""
    env = _env(data_dir, models)
    server = ServerProcess(env, tmp_path / "server.log").start()
    try:
        with server.client() as c:
            done = _wait_job(c, c.post("/jobs", json=JOB).json()["id"])
            assert done["status"] == "succeeded"
            failed = _wait_job(c, c.post("/jobs", json={**JOB, "seed": MODE.DATA_ERROR}).json()["id"])
            victim = c.post("/jobs", json={**JOB, "seed": MODE.SLOW}).json()
            _wait_job(c, victim["id"], until=("running",))
            folder = models / "jobs" / victim["id"]
            wait_until(
                lambda: (
                    (folder / "child.pid").exists()
                    and (c.get(f"/jobs/{victim['id']}").json().get("progress") or {}).get("step", 0) >= 2
                ),
                30,
                "the slow job's progress",
            )
            model_before = c.get("/model").json()
        server.kill()
    finally:
        server.kill()
    with sqlite3.connect(models / "jobs.db") as db:
        status, trainer_pid = db.execute("SELECT status, pid FROM jobs WHERE id = ?", (victim["id"],)).fetchone()
    grandchild = int((folder / "child.pid").read_text())
    assert status == "running" and alive(trainer_pid) and alive(grandchild)  # orphans

    server = ServerProcess(env, tmp_path / "server2.log").start()
    try:
        with server.client() as c:
            job = c.get(f"/jobs/{victim['id']}").json()
            assert job["status"] == "interrupted" and "resume" in job["error"], job
            wait_until(lambda: not alive(trainer_pid) and not alive(grandchild), 15, "the orphans to stop")
            assert (folder / "last.pt").exists()  # the orphan saved it on the restart's SIGTERM
            assert c.get(f"/jobs/{done['id']}").json() == done  # history intact, unchanged
            assert c.get(f"/jobs/{failed['id']}").json()["error"] == failed["error"]
            assert c.get("/jobs").json()["total"] == 3
            assert c.get("/model").json()["id"] == model_before["id"]
            r = c.post("/verify", files={"image1": ("a.png", face_like(1)), "image2": ("b.png", face_like(2))})
            assert r.status_code == 200 and r.json()["model"] == done["id"]
            r = c.post(f"/jobs/{victim['id']}/resume")
            assert r.status_code == 202, r.text
            resumed = _wait_job(c, victim["id"])
            assert resumed["status"] == "succeeded" and resumed["attempts"] == 2, resumed
            assert c.get("/model").json()["job_id"] == victim["id"]
        assert server.stop() in (0, -15)  # uvicorn re-raises SIGTERM after a clean shutdown
    finally:
        server.kill()


def _raw_request(port: int, head: bytes, chunks, chunk_size: int) -> tuple[int, bytes]:
    """Send `head`, then chunks of a chunked body until the server answers; return (bytes of body
    sent, the start of the answer)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sent = 0
    answer = b""
    try:
        sock.sendall(head)
        for chunk in chunks:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break
            try:
                sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        sock.settimeout(10)
        try:
            answer = sock.recv(4096)
        except (ConnectionResetError, socket.timeout):
            pass
    finally:
        sock.close()
    return sent, answer


def test_oversized_uploads_to_a_real_server_are_cut_off(data_dir, tmp_path):
    """200 MB streamed (chunked, no Content-Length) at /verify with a 1 MB limit: the server answers
    413 after reading a few MB, its memory does not grow by the upload, and it serves on. A 10 GB
    Content-Length is refused from the headers alone."""
    from service_helpers import write_fake_checkpoint

    ckpt = write_fake_checkpoint(tmp_path / "given.pt")
    server = ServerProcess(
        _env(data_dir, tmp_path / "models", FACEID_MAX_UPLOAD_MB="1", FACEID_CHECKPOINT=str(ckpt)),
        tmp_path / "server.log",
    ).start()
    try:
        pid = server.proc.pid
        with server.client() as c:
            good = {"image1": ("a.png", face_like(1)), "image2": ("b.png", face_like(1))}
            for _ in range(5):
                assert c.post("/verify", files=good).status_code == 200
            rss_before = rss_kb(pid)
            head = (
                b"POST /verify HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                b"Content-Type: multipart/form-data; boundary=XyZ\r\n\r\n"
            )
            part = b'--XyZ\r\nContent-Disposition: form-data; name="image1"; filename="a.jpg"\r\n\r\n'
            size = 64 * 1024
            offered = 200 * 1024 * 1024
            chunks = (part if i == 0 else b"\xff" * size for i in range(offered // size))
            sent, answer = _raw_request(server.port, head, chunks, size)
            assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
            assert sent < 32 * 1024 * 1024, sent  # the rest was never taken
            assert rss_kb(pid) - rss_before < 30 * 1024, (rss_before, rss_kb(pid))

            head = (
                b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Length: 10737418240\r\n"
                b"Content-Type: multipart/form-data; boundary=XyZ\r\n\r\n"
            )
            sent, answer = _raw_request(server.port, head, iter(()), 0)
            assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
            assert c.get("/health").status_code == 200
            assert c.post("/verify", files=good).status_code == 200
        assert server.proc.poll() is None
    finally:
        server.stop()


def _start_expecting_failure(cmd: list[str], env: dict[str, str], timeout: float = 60) -> tuple[int, str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("FACEID_")}
    full.update(env)
    full["PYTHONPATH"] = str(REPO)
    try:
        r = subprocess.run(cmd, cwd=REPO, env=full, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"the server kept running: {e.stdout}{e.stderr}") from None
    return r.returncode, r.stdout + r.stderr


def _serve_cmd() -> list[str]:
    return [sys.executable, "-m", "faceid.cli", "serve", "--host", "127.0.0.1", "--port", str(free_port())]


def _without_root_powers() -> list[str]:
    """Root ignores file modes; without CAP_DAC_OVERRIDE (setpriv) it is held to them."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: cannot make a folder unwritable")
    caps = "-dac_override,-dac_read_search,-fowner"
    return [setpriv, f"--bounding-set={caps}", f"--inh-caps={caps}"]


@pytest.mark.parametrize("case", ["read-only folder", "read-only parent", "a file in the way"])
def test_unwritable_models_folder_stops_the_server_at_start(tmp_path, case):
    base = tmp_path / "base"
    base.mkdir()
    models = base / "models"
    prefix: list[str] = []
    if case == "read-only folder":
        models.mkdir()
        models.chmod(0o555)
        prefix = _without_root_powers()
    elif case == "read-only parent":
        base.chmod(0o555)
        prefix = _without_root_powers()
    else:
        base.rmdir()
        base.write_text("a file")
    try:
        t0 = time.monotonic()
        rc, out = _start_expecting_failure(prefix + _serve_cmd(), {"FACEID_MODELS_DIR": str(models)})
    finally:
        base.chmod(0o755) if base.is_dir() else None
        models.chmod(0o755) if models.is_dir() else None
    assert rc != 0, out
    assert "not writable" in out and "FACEID_MODELS_DIR" in out, out[-2000:]
    assert time.monotonic() - t0 < 60


@pytest.mark.parametrize("damage", ["garbage", "a folder"])
def test_damaged_job_database_is_a_clear_error_at_start(tmp_path, damage):
    models = tmp_path / "models"
    models.mkdir()
    if damage == "garbage":
        (models / "jobs.db").write_bytes(b"not a database " * 100)
    else:
        (models / "jobs.db").mkdir()
    rc, out = _start_expecting_failure(_serve_cmd(), {"FACEID_MODELS_DIR": str(models)})
    assert rc != 0
    assert "job database" in out and "cannot be opened" in out and str(models / "jobs.db") in out, out[-2000:]
