"""The data-access layer on both engines: SQLite files and a real PostgreSQL server
(tests/postgres_server.py). The job store and the gallery store run the same statements on each."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from app.settings import load_settings
from app.store import JobStore, QueueFullError, open_job_store
from faceid.database import AddColumn, Database, Migration, redact
from faceid.errors import ConfigError
from faceid.gallery import NotFound
from faceid.gallery_store import GalleryStore, NewFace

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request, tmp_path):
    """Where a store keeps its data: a new SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        return tmp_path / "test.db"
    return request.getfixturevalue("postgres_url")


def test_statements_transactions_and_chunks(target):
    db = Database(target)
    db.run("CREATE TABLE t (id {pk}, name TEXT NOT NULL, score {float}, data {blob})")
    first = db.insert("INSERT INTO t (name, score, data) VALUES (?, ?, ?)", ("100% sure", 0.1234567890123, b"\x00\xff"))
    second = db.insert("INSERT INTO t (name, score) VALUES (?, ?)", ("a_b", 2.0))
    assert second == first + 1
    # a literal % in the SQL text and ? values side by side; doubles keep their precision
    assert db.one("SELECT name, score, data FROM t WHERE name LIKE '100%' AND id = ?", (first,)) == (
        "100% sure",
        0.1234567890123,
        b"\x00\xff",
    )
    assert db.dicts("SELECT id, name FROM t WHERE name = ?", ("a_b",)) == [{"id": second, "name": "a_b"}]
    with pytest.raises(RuntimeError):
        with db.transaction():
            db.run("UPDATE t SET name = ?", ("changed",))
            raise RuntimeError("rolled back")
    assert sorted(r[0] for r in db.all("SELECT name FROM t")) == ["100% sure", "a_b"]
    with db.transaction():
        for i in range(250):
            db.run("INSERT INTO t (name) VALUES (?)", (f"n{i}",))
    sizes = [len(rows) for rows in db.chunks("SELECT id FROM t ORDER BY id", (), 100)]
    assert sizes == [100, 100, 52]
    assert db.run("DELETE FROM t WHERE name LIKE ?", ("n%",)) == 250
    db.close()


def test_migrations_apply_once_in_order_and_add_columns_only_when_missing(target):
    db = Database(target)
    steps = (
        Migration(1, "a table", ("CREATE TABLE IF NOT EXISTS m (id {pk}, a TEXT)",)),
        Migration(2, "a column", (AddColumn("m", "b", "{bigint}"),)),
    )
    assert db.migrate("demo", steps[:1]) == [1]
    db.run("ALTER TABLE m ADD COLUMN b {bigint}")  # as a database from before migrations were recorded
    assert db.migrate("demo", steps) == [2]  # the column is there: recorded, not added twice
    assert db.migrate("demo", steps) == []
    assert db.versions("demo") == [1, 2] and db.versions("other") == []
    db.insert("INSERT INTO m (a, b) VALUES (?, ?)", ("x", 2**40))  # {bigint} holds 64 bits on both
    assert db.one("SELECT b FROM m") == (2**40,)
    db.close()


def test_the_job_store_on_both_engines(target):
    store = JobStore(target)
    ids = [c * 32 for c in "abc"]
    for i in ids:
        store.create(i, {"epochs": 1}, max_queued=3)
    with pytest.raises(QueueFullError):
        store.create("d" * 32, {}, max_queued=3)
    assert store.next_queued()["id"] == ids[0]
    assert store.claim(ids[0], events_offset=2**33, worker="host:1")
    assert not store.claim(ids[0], worker="host:2")  # running already
    assert store.get(ids[0])["attempts"] == 1 and store.get(ids[0])["events_offset"] == 2**33
    assert store.request_cancel(ids[0]) and store.cancel_requested(ids[0])
    assert store.cancel_queued(ids[1]) and not store.cancel_queued(ids[1])
    store.update(ids[0], metrics=[{"epoch": 1, "loss": float("nan")}], best={"auc": 0.9})
    job = store.get(ids[0])
    assert job["metrics"] == [{"epoch": 1, "loss": None}] and job["best"] == {"auc": 0.9}
    jobs, total = store.list(limit=2)
    assert [j["id"] for j in jobs] == [ids[2], ids[1]] and total == 3
    assert store.list(status="cancelled")[1] == 1
    # a lease: the worker that renews keeps its job; after it lapses the job is interrupted once
    assert store.heartbeat(ids[0], "host:1") and not store.heartbeat(ids[0], "host:2")
    assert store.interrupt_stale(60) == []
    store.update(ids[0], heartbeat_at=time.time() - 120)
    assert [j["id"] for j in store.interrupt_stale(60)] == [ids[0]]
    assert store.interrupt_stale(60) == []
    assert "host:1" in store.get(ids[0])["error"]
    assert store.requeue(ids[0], {"epochs": 2}, max_queued=3)
    assert store.get(ids[0])["config"] == {"epochs": 2}
    store.set_state("model", {"checkpoint": "/m/best.pt"})
    store.set_state("model", None)
    assert store.get_state("model") is None and store.get_state("absent") is None
    store.close()


def _face(seed: int, crop: bool = True) -> NewFace:
    vec = np.random.default_rng(seed).standard_normal(8).astype(np.float32)
    return NewFace(vector=vec, source=f"{seed}.jpg", crop=b"png" if crop else None, kind="png" if crop else None)


def test_the_gallery_store_on_both_engines(target):
    store = GalleryStore(target)
    v0 = store.data_version()
    store.create_gallery("staff")
    store.bind("staff", "model-a", 8)
    created, ids = store.add_faces("staff", "ann", "model-a", [_face(1), _face(2)])
    assert created and len(ids) == 2
    assert store.add_faces("staff", "ann", "model-a", [_face(3, crop=False)])[0] is False
    store.add_faces("staff", "bob", "model-a", [_face(4)])
    assert store.data_version() > v0
    g = store.gallery("staff")
    assert (g["people"], g["faces"], g["faces_without_crop"], g["searchable_faces"]) == (2, 4, 1, 4)
    ann = store.person("staff", "ann")
    assert [f["models"] for f in ann["faces"]] == [["model-a"]] * 3 and ann["faces"][2]["has_crop"] is False
    # another model: only faces with a crop can be embedded again, and an upsert replaces
    assert store.count_embedded("staff", "model-b") == (0, 3)
    missing = store.missing("staff", "model-b", limit=10)
    assert [m[0] for m in missing] == [ids[0], ids[1], ids[1] + 2] and missing[0][1] == b"png"
    store.put_embeddings("model-b", [(fid, np.ones(8, np.float32)) for fid, _, _ in missing])
    store.put_embeddings("model-b", [(ids[0], np.full(8, 2.0, np.float32)), (10**9, np.ones(8, np.float32))])
    chunks = list(store.iter_embeddings("staff", "model-b", chunk=2))
    assert [len(c[0]) for c in chunks] == [2, 1]
    assert chunks[0][2][0].tolist() == [2.0] * 8 and chunks[0][1] == ["ann", "ann"]
    index = store.load_index("staff", "model-a", 8)
    assert len(index) == 4
    assert store.delete_person("staff", "ann") == [ids[0], ids[1], ids[1] + 1]
    with pytest.raises(NotFound):
        store.person("staff", "ann")
    assert store.count_embedded("staff", "model-b") == (1, 1)  # bob's face; ann's embeddings went with her
    store.delete_gallery("staff")
    assert store.gallery_names() == []
    store.close()


CLAIMER = """
import sys, time
from app.store import JobStore
store, name, go = JobStore(sys.argv[1]), sys.argv[2], sys.argv[3]
while time.time() < float(go):
    time.sleep(0.001)
claimed = []
while (job := store.next_queued()) is not None:
    if store.claim(job["id"], worker=name):
        claimed.append(job["id"])
print(" ".join(claimed))
"""


def test_two_processes_never_claim_the_same_job(target):
    store = JobStore(target)
    ids = [f"{i:032x}" for i in range(120)]
    for i in ids:
        store.create(i, {}, max_queued=1000)
    go = str(time.time() + 2.0)  # both start claiming at once, after their imports
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CLAIMER, str(target), name, go], cwd=REPO, stdout=subprocess.PIPE, text=True
        )
        for name in ("w1", "w2")
    ]
    claims = [p.communicate(timeout=120)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(claims[0] + claims[1]) == ids  # every job claimed, none twice
    for name, mine in zip(("w1", "w2"), claims):
        assert all(store.get(i)["worker"] == name and store.get(i)["attempts"] == 1 for i in mine)
    store.close()


def test_processes_starting_together_migrate_once(postgres_url):
    code = "import sys; from app.store import JobStore; JobStore(sys.argv[1]).close()"
    procs = [subprocess.Popen([sys.executable, "-c", code, postgres_url], cwd=REPO) for _ in range(4)]
    assert [p.wait(timeout=120) for p in procs] == [0] * 4
    store = JobStore(postgres_url)
    assert store._db.versions("jobs") == [1, 2, 3]
    store.close()


def test_a_dropped_postgresql_connection_is_opened_again(postgres_url):
    import psycopg

    store = JobStore(postgres_url)
    store.create("a" * 32, {}, max_queued=10)
    with psycopg.connect(postgres_url, autocommit=True) as admin:  # as a server restart would
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid()"
        )
    with pytest.raises(psycopg.OperationalError):
        store.get("a" * 32)  # the call that finds the connection gone fails
    assert store.get("a" * 32)["status"] == "queued"  # the next one reconnects
    store.close()


def test_an_unreachable_database_is_one_line_naming_the_setting_without_the_password(postgres):
    url = f"postgresql://faceid:s3cret-pw@127.0.0.1:{postgres.port + 1 if postgres.port < 65535 else 1}/x"
    with pytest.raises(ConfigError) as e:
        open_job_store(url)
    message = str(e.value)
    assert "FACEID_DATABASE_URL" in message and "s3cret-pw" not in message and "\n" not in message
    assert "faceid:***@" in message


def test_a_database_url_must_be_postgresql_and_is_never_echoed(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_settings({"FACEID_DATABASE_URL": "mysql://root:hunter22@db/faceid"})
    assert "postgresql://" in str(e.value) and "hunter22" not in str(e.value)
    s = load_settings({"FACEID_DATABASE_URL": " postgresql://u:pw@db/faceid ", "FACEID_MODELS_DIR": str(tmp_path)})
    assert s.jobs_database == s.galleries_database == "postgresql://u:pw@db/faceid"
    assert "pw" not in repr(s)
    plain = load_settings({"FACEID_MODELS_DIR": str(tmp_path)})
    assert plain.jobs_database == tmp_path / "jobs.db" and plain.galleries_database == tmp_path / "galleries.db"
    assert redact("postgresql://u:p@ss@h/db") == "postgresql://u:***@h/db"
