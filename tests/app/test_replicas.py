"""Inference replicas (FACEID_INFER_REPLICAS, app/replicas.py and app/replica_app.py): extra server
processes answering /embed and /verify on FACEID_INFER_PORT with the main server's model.

In process (fake verifier): a replica follows the model the main server serves, through the job
database, and answers only the inference and health routes. Real processes (a tiny real
checkpoint): replicas answer as the main server does, one killed is started again while the
others keep answering, and none outlives the main server, stopped or killed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import anyio
import httpx
import numpy as np
import pytest
from service_helpers import fake_loader, image_bytes, running, wait_job, write_fake_checkpoint

from app.model_manager import STATE_KEY, ModelManager
from app.replica_app import create_replica_app
from app.replicas import ReplicaSupervisor, _Replica
from app.settings import load_settings
from app.store import JobStore
from faceid.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- settings and the supervisor -------------------------------------------------------------------


def test_replicas_need_a_port_of_their_own():
    with pytest.raises(ConfigError, match="FACEID_INFER_REPLICAS=2 needs FACEID_INFER_PORT"):
        load_settings({"FACEID_INFER_REPLICAS": "2"})
    s = load_settings({"FACEID_INFER_REPLICAS": "2", "FACEID_INFER_PORT": "8001"})
    assert (s.infer_replicas, s.infer_port, s.infer_host) == (2, 8001, "127.0.0.1")
    assert load_settings({}).infer_replicas == 0
    with pytest.raises(ConfigError, match="FACEID_INFER_PORT='http' is not a whole number"):
        load_settings({"FACEID_INFER_REPLICAS": "1", "FACEID_INFER_PORT": "http"})
    with pytest.raises(ConfigError, match="FACEID_INFER_PORT=8000 is the main server's port"):
        load_settings({"FACEID_INFER_REPLICAS": "1", "FACEID_INFER_PORT": "8000", "FACEID_PORT": "8000"})


def test_faceid_serve_flags_set_the_replica_settings(monkeypatch):
    import uvicorn

    import faceid.cli

    for name in ("FACEID_PORT", "FACEID_INFER_REPLICAS", "FACEID_INFER_PORT", "FACEID_INFER_HOST"):
        monkeypatch.setenv(name, "")  # restored (removed) after the test
    ran = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: ran.update(app=app, **kw))
    monkeypatch.setattr(faceid.cli, "serving_defaults", lambda: None)  # it would set OMP_* for this process
    assert faceid.cli.main(["serve", "--port", "8123", "--infer_replicas", "2", "--infer_port", "8124"]) == 0
    assert ran["app"] == "app.main:create_app" and ran["port"] == 8123
    s = load_settings()
    assert (s.infer_replicas, s.infer_port, s.infer_host) == (2, 8124, "127.0.0.1")
    faceid.cli.main(["serve", "--port", "8123", "--infer_replicas", "1", "--infer_port", "8123"])
    with pytest.raises(ConfigError, match="FACEID_INFER_PORT=8123 is the main server's port"):
        load_settings()


def test_faceid_serve_with_role_inference_starts_a_stateless_inference_server(monkeypatch, capsys):
    import uvicorn

    import faceid.cli

    ran = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: ran.update(app=app, **kw))
    monkeypatch.setattr(faceid.cli, "serving_defaults", lambda: None)
    monkeypatch.setenv("FACEID_ROLE", "inference")
    monkeypatch.setenv("FACEID_INFER_REPLICAS", "")
    assert faceid.cli.main(["serve", "--port", "8125"]) == 0
    assert ran["app"] == "app.replica_app:create_replica_app" and ran["factory"] and ran["port"] == 8125
    # replicas of an inference server, or an unknown role: one line naming the fix
    monkeypatch.setenv("FACEID_ROLE", "inference")
    assert faceid.cli.main(["serve", "--port", "8125", "--infer_replicas", "2", "--infer_port", "8126"]) == 2
    assert "start more inference servers instead" in capsys.readouterr().err
    monkeypatch.setenv("FACEID_ROLE", "trainer")
    monkeypatch.setenv("FACEID_INFER_REPLICAS", "")
    assert faceid.cli.main(["serve", "--port", "8125"]) == 2
    assert "FACEID_ROLE='trainer' is not a mode; use all or inference" in capsys.readouterr().err


def test_faceid_serve_takes_its_address_from_the_environment_unless_flags_say_otherwise(monkeypatch, capsys):
    import uvicorn

    import faceid.cli

    ran = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: ran.update(kw))
    monkeypatch.setattr(faceid.cli, "serving_defaults", lambda: None)
    monkeypatch.setenv("FACEID_PORT", "8311")
    monkeypatch.setenv("FACEID_HOST", "0.0.0.0")
    assert faceid.cli.main(["serve"]) == 0
    assert (ran["host"], ran["port"]) == ("0.0.0.0", 8311)
    assert faceid.cli.main(["serve", "--port", "8400", "--host", "127.0.0.1"]) == 0
    assert (ran["host"], ran["port"], os.environ["FACEID_PORT"]) == ("127.0.0.1", 8400, "8400")
    for name in ("FACEID_PORT", "FACEID_HOST"):
        monkeypatch.delenv(name)
    assert faceid.cli.main(["serve"]) == 0
    assert (ran["host"], ran["port"]) == ("127.0.0.1", 8000)
    monkeypatch.setenv("FACEID_PORT", "eighty")
    ran.clear()
    assert faceid.cli.main(["serve"]) == 2 and not ran
    assert "FACEID_PORT='eighty' is not a port" in capsys.readouterr().err


def test_each_replica_runs_one_worker_and_several_gpus_are_taken_in_turn(make_settings, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("FACEID_INFER_WORKERS", "4")  # the main server's setting; replicas run one each
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    sup = ReplicaSupervisor(make_settings(device="cuda", infer_replicas=3, infer_port=8001))
    assert [sup._env(i)["FACEID_DEVICE"] for i in range(3)] == ["cuda:0", "cuda:1", "cuda:0"]
    env = sup._env(0)
    assert env["FACEID_INFER_WORKERS"] == "1" and env["FACEID_REPLICA_PARENT"] == str(os.getpid())
    assert env["OMP_NUM_THREADS"] == str(max(1, len(os.sched_getaffinity(0)) // 3))
    assert Path(env["FACEID_MODELS_DIR"]) == sup.settings.models_dir
    for device in ("cuda:1", "cpu"):
        sup = ReplicaSupervisor(make_settings(device=device, infer_replicas=2, infer_port=8001))
        assert [sup._env(i)["FACEID_DEVICE"] for i in range(2)] == [device, device]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    sup = ReplicaSupervisor(make_settings(device="auto", infer_replicas=2, infer_port=8001))
    assert [sup._env(i)["FACEID_DEVICE"] for i in range(2)] == ["auto", "auto"]


@pytest.mark.parametrize(
    "reuse_port,needle",
    [
        (False, r"give FACEID_INFER_PORT a free port"),  # an ordinary listener, e.g. another server
        (True, r"is another server on it\?"),  # another server's replica: it could share the port
    ],
)
def test_a_port_in_use_is_a_clear_error_and_starts_nothing(make_settings, reuse_port, needle):
    with socket.socket() as taken:
        if reuse_port:
            taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        sup = ReplicaSupervisor(make_settings(infer_replicas=2, infer_port=port))
        with pytest.raises(ConfigError, match=rf"cannot listen on 127.0.0.1:{port} .*{needle}"):
            sup.start()
        assert sup.describe()["pids"] == []


# -- following the main server's model (in process) ------------------------------------------------


class _Alive:
    def poll(self):
        return None


def test_connections_go_to_ready_replicas_in_turn_and_to_one_still_loading_only_when_none_is(make_settings):
    """A replica says it is ready (one byte down its channel) once its model is loaded; until then
    a restarted replica gets no connection while another one can take it."""
    sup = ReplicaSupervisor(make_settings(infer_replicas=2, infer_port=1))
    theirs = []
    for i in range(2):
        r = _Replica(i)
        ours, other = socket.socketpair()
        ours.setblocking(False)
        r.channel, r.proc = ours, _Alive()
        sup._replicas.append(r)
        theirs.append(other)

    def hand(k: int) -> list[int]:
        got = []
        for _ in range(k):
            a, b = socket.socketpair()
            with a, b:
                assert sup._hand(a)
            for i, other in enumerate(theirs):
                other.setblocking(False)
                try:
                    _, fds, _, _ = socket.recv_fds(other, 1, 1)
                except BlockingIOError:
                    continue
                for fd in fds:
                    os.close(fd)
                got.append(i)
        return got

    assert sorted(hand(4)) == [0, 0, 1, 1]  # neither has said it is ready: both take turns
    theirs[1].send(b"r")
    assert hand(4) == [1, 1, 1, 1]  # only the ready one
    theirs[0].send(b"r")
    assert sorted(hand(4)) == [0, 0, 1, 1]
    for c in theirs + [r.channel for r in sup._replicas]:
        c.close()


def test_follow_loads_what_the_database_names_once_and_never_writes_it(make_settings, tmp_path):
    s = make_settings()
    s.models_dir.mkdir(parents=True)
    store = JobStore(s.db_path)
    loads: list[Path] = []

    def loader(path: Path, device: str):
        loads.append(path)
        return fake_loader(path, device)

    follower = ModelManager(s, store, loader=loader)
    try:
        assert follower.follow() is False and follower.current is None  # the main server serves nothing yet
        a, b = write_fake_checkpoint(tmp_path / "a.json"), write_fake_checkpoint(tmp_path / "b.json", epoch=2)
        state_a = {"checkpoint": str(a), "job_id": None, "source": "env", "pinned": False, "loaded_at": 1.0}
        store.set_state(STATE_KEY, state_a)
        assert follower.follow() is True and follower.current.checkpoint == str(a)
        assert follower.follow() is False and loads == [a]  # unchanged: not loaded again
        broken = tmp_path / "broken.json"
        broken.write_text("{")
        store.set_state(STATE_KEY, {**state_a, "checkpoint": str(broken), "loaded_at": 2.0})
        assert follower.follow() is False and follower.follow() is False
        assert loads == [a, broken] and follower.current.checkpoint == str(a)  # tried once; the old model stays
        state_b = {"checkpoint": str(b), "job_id": "x", "source": "activated", "pinned": True, "loaded_at": 3.0}
        store.set_state(STATE_KEY, state_b)
        assert follower.follow() is True
        assert (follower.current.checkpoint, follower.current.pinned, follower.current.source) == (
            str(b),
            True,
            "activated",
        )
        assert store.get_state(STATE_KEY) == state_b  # a follower records nothing
        write_fake_checkpoint(b, epoch=5)  # rewritten in place (a resumed job) and loaded again by the main server
        store.set_state(STATE_KEY, {**state_b, "loaded_at": 4.0})
        assert follower.follow() is True and follower.current.verifier.info["epoch"] == 5
    finally:
        follower.close()
        store.close()


@pytest.mark.anyio
async def test_the_main_server_records_each_load_for_its_replicas(make_app, tmp_path):
    ckpt = write_fake_checkpoint(tmp_path / "m.json")
    app = make_app(checkpoint=ckpt)
    async with running(app):
        manager = app.state.models
        first = manager.store.get_state(STATE_KEY)
        assert first["checkpoint"] == str(ckpt.absolute()) and first["loaded_at"] == manager.current.loaded_at
        manager.load(ckpt, job_id=None, source="env", pinned=False)  # the same file again
        assert manager.store.get_state(STATE_KEY)["loaded_at"] == manager.current.loaded_at > first["loaded_at"]


@pytest.mark.anyio
async def test_a_replica_serves_the_main_servers_model_and_follows_a_new_one(make_app, make_settings, job_body):
    main_app = make_app()
    replica_app = create_replica_app(make_settings(), verifier_loader=fake_loader)
    files = {"image": ("a.jpg", image_bytes(), "image/jpeg")}
    async with running(main_app) as main:
        async with running(replica_app) as replica:
            r = await replica.post("/embed", files=files)
            assert r.status_code == 503 and "no model is loaded yet" in r.json()["detail"]
            assert (await replica.get("/ready")).status_code == 503
            r = await main.post("/jobs", json=job_body)
            job = await wait_job(main, r.json()["id"])
            assert job["status"] == "succeeded"
            deadline = time.monotonic() + 10
            while (r := await replica.post("/embed", files=files)).status_code != 200 and time.monotonic() < deadline:
                await anyio.sleep(0.05)
            assert r.status_code == 200 and r.json()["model"] == job["id"]
            on_main = await main.post("/embed", files=files)
            assert np.allclose(r.json()["embedding"], on_main.json()["embedding"])
            r = await replica.post(
                "/verify",
                files={
                    "image1": ("a.jpg", image_bytes(), "image/jpeg"),
                    "image2": ("b.png", image_bytes("PNG"), "image/png"),
                },
            )
            assert r.status_code == 200 and r.json()["model"] == job["id"]
            r = await replica.post("/embed/batch", files=[("images", ("a.jpg", image_bytes(), "image/jpeg"))] * 2)
            assert r.status_code == 200 and r.json()["count"] == 2
            assert (await replica.get("/ready")).json() == {"ready": True, "model": job["id"], "detail": None}
            for method, path in (("GET", "/jobs"), ("POST", "/jobs"), ("GET", "/model"), ("GET", "/docs")):
                r = await replica.request(method, path)
                assert (
                    r.status_code == 404
                    and "jobs, GET /model, the rest of galleries, activation and /docs are on the main server"
                    in r.json()["detail"]
                ), path
            r = await replica.get("/embed")
            assert r.status_code == 405 and "this is an inference server" in r.json()["detail"]


@pytest.mark.anyio
async def test_a_replica_asks_for_the_api_key_as_the_main_server_does(make_settings, tmp_path):
    ckpt = write_fake_checkpoint(tmp_path / "m.json")
    s = make_settings(api_key="k" * 12)
    s.models_dir.mkdir(parents=True)
    store = JobStore(s.db_path)
    store.set_state(STATE_KEY, {"checkpoint": str(ckpt), "job_id": None, "source": "env", "pinned": False})
    store.close()
    async with running(create_replica_app(s, verifier_loader=fake_loader)) as replica:
        files = {"image": ("a.jpg", image_bytes(), "image/jpeg")}
        assert (await replica.post("/embed", files=files)).status_code == 401
        assert (await replica.post("/embed", files=files, headers={"X-API-Key": "k" * 12})).status_code == 200
        assert (await replica.get("/health")).status_code == 200


# -- real processes ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from core_fixtures import tiny_arcface_run

    return tiny_arcface_run(tmp_path_factory).best


class MainServer:
    """`uvicorn --factory app.main:create_app` with FACEID_INFER_REPLICAS replicas."""

    def __init__(self, tmp: Path, checkpoint: Path, replicas: int) -> None:
        self.port, self.infer_port = _free_port(), _free_port()
        self.base, self.infer = f"http://127.0.0.1:{self.port}", f"http://127.0.0.1:{self.infer_port}"
        self.log = tmp / "server.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("FACEID_")}
        env.update(
            FACEID_DATA_DIR=str(REPO / "data"),
            FACEID_MODELS_DIR=str(tmp / "models"),
            FACEID_CHECKPOINT=str(checkpoint),
            FACEID_DEVICE="cpu",
            FACEID_INFER_REPLICAS=str(replicas),
            FACEID_INFER_PORT=str(self.infer_port),
            PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        )
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "--factory",
                    "app.main:create_app",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                ],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.wait(
            lambda: (
                self.get(self.infer + "/ready") == 200
                and self.get(self.base + "/ready") == 200
                and self.replicas()["ready"] == replicas
            ),
            120,
            "the server and its replicas to be ready",
        )

    def get(self, url: str) -> int:
        try:
            return httpx.get(url, timeout=5).status_code
        except httpx.TransportError:
            return 0

    def wait(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                pytest.fail(f"timed out waiting for {what}:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)

    def replicas(self) -> dict:
        return httpx.get(self.base + "/model", timeout=10).json()["replicas"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie waiting for its parent to reap it has exited
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _embed(base: str, image: bytes) -> httpx.Response:
    return httpx.post(base + "/embed", files={"image": ("a.jpg", image, "image/jpeg")}, timeout=60)


@pytest.mark.e2e
def test_replicas_answer_as_the_main_server_and_one_killed_is_started_again(tmp_path, checkpoint):
    image = (REPO / "data" / "sample" / "val").rglob("*.jpg").__next__().read_bytes()
    server = MainServer(tmp_path, checkpoint, replicas=2)
    try:
        info = server.replicas()
        assert (info["replicas"], info["port"], info["host"], info["restarts"], info["ready"]) == (
            2,
            server.infer_port,
            "127.0.0.1",
            0,
            2,
        )
        assert len(info["pids"]) == 2 and all(_alive(p) for p in info["pids"])
        main, replica = _embed(server.base, image), _embed(server.infer, image)
        assert main.status_code == replica.status_code == 200, replica.text
        assert replica.json()["model"] == main.json()["model"]
        assert np.allclose(replica.json()["embedding"], main.json()["embedding"], atol=5e-3)
        assert httpx.get(server.infer + "/jobs", timeout=10).status_code == 404

        # The main server hands each new connection to the next replica: 4 keep-alive clients are
        # 2 and 2, whatever their ports (the kernel's SO_REUSEPORT hash split them 2 and 2 only 3 times in 8)
        before = server.replicas()["connections"]
        clients = [httpx.Client(base_url=server.infer, timeout=60) for _ in range(4)]
        try:
            for _ in range(2):
                for c in clients:
                    r = c.post("/embed", files={"image": ("a.jpg", image, "image/jpeg")})
                    assert r.status_code == 200, r.text
        finally:
            for c in clients:
                c.close()
        assert [a - b for a, b in zip(server.replicas()["connections"], before)] == [2, 2]

        victim, survivor = info["pids"]
        os.kill(victim, signal.SIGKILL)
        # Reaped by the server (within a second): its socket is gone too. A connection made in the
        # moment between the kill and the socket's end can be reset, as with any process killed.
        server.wait(lambda: not Path(f"/proc/{victim}").exists(), 10, "the killed replica to be reaped")
        for _ in range(8):  # new connections go to the replica still running
            r = _embed(server.infer, image)
            assert r.status_code == 200, r.text
        server.wait(
            lambda: (
                server.replicas()["restarts"] == 1
                and len(server.replicas()["pids"]) == 2
                and server.replicas()["ready"] == 2
            ),
            60,
            "the killed replica to be started again",
        )
        pids = server.replicas()["pids"]
        assert survivor in pids and victim not in pids
        assert "inference replica" in server.log.read_text() and "killed by SIGKILL" in server.log.read_text()
        server.wait(
            lambda: all(_embed(server.infer, image).status_code == 200 for _ in range(4)),
            60,
            "the replicas to answer again",
        )
    finally:
        server.stop()
    assert not any(_alive(p) for p in pids), "a replica outlived the server"


@pytest.mark.e2e
def test_replicas_stop_by_themselves_when_the_main_server_is_killed(tmp_path, checkpoint):
    server = MainServer(tmp_path, checkpoint, replicas=1)
    pids = server.replicas()["pids"]
    server.proc.kill()  # no shutdown: the replicas must notice on their own
    server.proc.wait()
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids), "a replica outlived the killed server"
