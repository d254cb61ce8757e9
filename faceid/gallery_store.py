"""The galleries' database: galleries, people, faces and embeddings, in SQLite
(MODELS_DIR/galleries.db) or in the PostgreSQL database FACEID_DATABASE_URL names
(faceid/database.py).

Each face keeps the crop it was embedded from (PNG), so a new model can embed it again; each
embedding is a float32 blob tagged with the id of the model that computed it. A gallery is bound to
one model id, and only that model's embeddings are ever searched: embeddings of two models are
never compared.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from faceid.database import Database, DatabaseOpenError, Migration
from faceid.errors import ConfigError
from faceid.gallery import Conflict, NotFound, check_gallery_name, check_person_name
from faceid.gallery_index import GalleryIndex

# Write transactions of the galleries serialise among themselves (PostgreSQL advisory lock key).
LOCK_KEY = 0x46494741  # "FIGA"
MIGRATIONS = (
    Migration(
        1,
        "galleries, people, faces and embeddings",
        (
            "CREATE TABLE IF NOT EXISTS galleries (name TEXT PRIMARY KEY, created_at {float} NOT NULL, "
            "model_id TEXT, dim INTEGER)",
            "CREATE TABLE IF NOT EXISTS people (id {pk}, gallery TEXT NOT NULL REFERENCES galleries(name) "
            "ON DELETE CASCADE, name TEXT NOT NULL, created_at {float} NOT NULL, UNIQUE (gallery, name))",
            "CREATE TABLE IF NOT EXISTS faces (id {pk}, person_id {bigint} NOT NULL REFERENCES people(id) "
            "ON DELETE CASCADE, created_at {float} NOT NULL, source TEXT, crop {blob}, crop_kind TEXT, face TEXT)",
            "CREATE INDEX IF NOT EXISTS faces_person ON faces(person_id)",
            "CREATE TABLE IF NOT EXISTS embeddings (face_id {bigint} NOT NULL REFERENCES faces(id) ON DELETE CASCADE, "
            "model_id TEXT NOT NULL, vector {blob} NOT NULL, PRIMARY KEY (face_id, model_id))",
        ),
    ),
    Migration(
        2,
        "a change counter that inference servers follow",
        (
            "CREATE TABLE IF NOT EXISTS gallery_changes (id INTEGER PRIMARY KEY, version {bigint} NOT NULL)",
            "INSERT INTO gallery_changes (id, version) VALUES (1, 0)",
        ),
    ),
)


@dataclass
class NewFace:
    """A face to enroll: its crop (None for an imported embedding), where it came from, the face
    found, and its embedding."""

    vector: np.ndarray
    source: Optional[str] = None
    crop: Optional[bytes] = None
    kind: Optional[str] = None
    face: Optional[dict[str, Any]] = None


class GalleryStore:
    """The galleries' database. Thread-safe: one connection, one lock; every change is one
    transaction, so a crash leaves each enrolment or deletion whole or absent, and every change
    moves the counter `data_version` reads. `target`: the SQLite file, or a postgresql:// URL."""

    def __init__(self, target: str | Path) -> None:
        self.path = target
        try:
            self._db = Database.open(target, "galleries", MIGRATIONS, lock_key=LOCK_KEY)
        except DatabaseOpenError as e:
            raise ConfigError(
                f"the gallery database cannot be opened ({e}); restore it from a backup, or move it away "
                "to start without galleries"
            ) from None

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[Database]:
        with self._db.transaction() as db:
            yield db
            db.run("UPDATE gallery_changes SET version = version + 1 WHERE id = 1")

    def _one(self, sql: str, args: tuple = ()) -> Optional[tuple]:
        return self._db.one(sql, args)

    def _agg(self, sql: str, args: tuple = ()) -> tuple:
        """A query that answers one row whatever the data (an aggregate, or a row this lock hold
        has just found)."""
        row = self._one(sql, args)
        assert row is not None, sql
        return row

    def _all(self, sql: str, args: tuple = ()) -> list[tuple]:
        return self._db.all(sql, args)

    # galleries
    def create_gallery(self, name: str) -> dict[str, Any]:
        check_gallery_name(name)
        with self._tx() as db:
            if db.one("SELECT 1 FROM galleries WHERE name=?", (name,)):
                raise Conflict(
                    f"gallery {name!r} exists already; enroll into it, or DELETE /galleries/{name} "
                    "first to start it again"
                )
            db.run("INSERT INTO galleries (name, created_at) VALUES (?, ?)", (name, time.time()))
        return self.gallery(name)  # type: ignore[return-value]

    def gallery_names(self) -> list[str]:
        return [r[0] for r in self._all("SELECT name FROM galleries ORDER BY name")]

    def gallery(self, name: str) -> Optional[dict[str, Any]]:
        row = self._one("SELECT name, created_at, model_id, dim FROM galleries WHERE name=?", (name,))
        if row is None:
            return None
        people, faces, cropless = self._agg(
            "SELECT COUNT(DISTINCT p.id), COUNT(f.id), COALESCE(SUM(CASE WHEN f.id IS NOT NULL AND f.crop IS NULL "
            "THEN 1 ELSE 0 END), 0) "
            "FROM people p LEFT JOIN faces f ON f.person_id = p.id WHERE p.gallery=?",
            (name,),
        )
        searchable = 0
        if row[2] is not None:
            searchable = self._agg(
                "SELECT COUNT(*) FROM embeddings e JOIN faces f ON f.id=e.face_id JOIN people p ON "
                "p.id=f.person_id WHERE p.gallery=? AND e.model_id=?",
                (name, row[2]),
            )[0]
        return {
            "name": row[0],
            "created_at": row[1],
            "model": row[2],
            "dim": row[3],
            "people": people,
            "faces": faces,
            "faces_without_crop": cropless,
            "searchable_faces": searchable,
        }

    def require(self, name: str) -> dict[str, Any]:
        g = self.gallery(name)
        if g is None:
            raise NotFound(f"no gallery {name[:80]!r}; GET /galleries lists them, POST /galleries creates one")
        return g

    def data_version(self) -> int:
        """A number that changes with every committed change to the galleries, by any process: a
        cheap test before reading anything again."""
        return int(self._agg("SELECT version FROM gallery_changes WHERE id = 1")[0])

    def signature(self, gallery: str, model_id: str) -> tuple[int, int, int]:
        """(count, largest id, sum of ids) of the gallery's faces embedded by `model_id`: it changes
        with every enrolment and deletion."""
        row = self._agg(
            "SELECT COUNT(*), COALESCE(MAX(e.face_id), 0), COALESCE(SUM(e.face_id), 0) FROM embeddings e "
            "JOIN faces f ON f.id=e.face_id JOIN people p ON p.id=f.person_id WHERE p.gallery=? AND e.model_id=?",
            (gallery, model_id),
        )
        return int(row[0]), int(row[1]), int(row[2])

    def meta(self, name: str) -> tuple[Optional[str], Optional[int]]:
        """(the model the gallery is bound to, its dimension), cheaply; NotFound for no gallery."""
        row = self._one("SELECT model_id, dim FROM galleries WHERE name=?", (name,))
        if row is None:
            raise NotFound(f"no gallery {name[:80]!r}; GET /galleries lists them, POST /galleries creates one")
        return row[0], row[1]

    def delete_gallery(self, name: str) -> dict[str, Any]:
        g = self.require(name)
        with self._tx() as db:
            db.run("DELETE FROM galleries WHERE name=?", (name,))
        return g

    def bind(self, name: str, model_id: str, dim: int) -> None:
        with self._tx() as db:
            db.run("UPDATE galleries SET model_id=?, dim=? WHERE name=?", (model_id, int(dim), name))

    # people and faces
    def people(self, gallery: str) -> list[dict[str, Any]]:
        self.require(gallery)
        rows = self._all(
            "SELECT p.name, p.created_at, COUNT(f.id) FROM people p LEFT JOIN faces f ON "
            "f.person_id=p.id WHERE p.gallery=? GROUP BY p.id ORDER BY p.name",
            (gallery,),
        )
        return [{"name": n, "created_at": c, "faces": k} for n, c, k in rows]

    def _person_id(self, gallery: str, person: str) -> int:
        self.require(gallery)
        row = self._one("SELECT id FROM people WHERE gallery=? AND name=?", (gallery, person))
        if row is None:
            raise NotFound(
                f"no person {person[:80]!r} in gallery {gallery!r}; GET /galleries/{gallery}/people lists them"
            )
        return row[0]

    def person(self, gallery: str, person: str) -> dict[str, Any]:
        # under the write lock: a delete between finding the person and reading them answers
        # NotFound before or after it, never half of each
        with self._db.transaction():
            pid = self._person_id(gallery, person)
            created = self._agg("SELECT created_at FROM people WHERE id=?", (pid,))[0]
            rows = self._all(
                "SELECT f.id, f.created_at, f.source, f.crop IS NOT NULL, f.face FROM faces f "
                "WHERE f.person_id=? ORDER BY f.id",
                (pid,),
            )
            models: dict[int, list[str]] = {}
            for fid, model in self._all(
                "SELECT e.face_id, e.model_id FROM embeddings e JOIN faces f ON f.id=e.face_id WHERE f.person_id=?",
                (pid,),
            ):
                models.setdefault(fid, []).append(model)
        faces = [
            {
                "id": i,
                "created_at": c,
                "source": s,
                "has_crop": bool(h),
                "face": json.loads(fj) if fj else None,
                "models": sorted(models.get(i, [])),
            }
            for i, c, s, h, fj in rows
        ]
        return {"name": person, "created_at": created, "faces": faces}

    def add_faces(self, gallery: str, person: str, model_id: str, faces: Sequence[NewFace]) -> tuple[bool, list[int]]:
        """Enroll `faces` (embedded by `model_id`) for `person`, creating the person when new:
        (created, face ids), in one transaction."""
        check_person_name(person)
        now = time.time()
        with self._tx() as db:
            if db.one("SELECT 1 FROM galleries WHERE name=?", (gallery,)) is None:
                raise NotFound(f"no gallery {gallery[:80]!r}; POST /galleries creates one")
            row = db.one("SELECT id FROM people WHERE gallery=? AND name=?", (gallery, person))
            created = row is None
            pid = (
                db.insert("INSERT INTO people (gallery, name, created_at) VALUES (?, ?, ?)", (gallery, person, now))
                if row is None
                else row[0]
            )
            ids = []
            for f in faces:
                fid = db.insert(
                    "INSERT INTO faces (person_id, created_at, source, crop, crop_kind, face) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (pid, now, f.source, f.crop, f.kind, json.dumps(f.face) if f.face is not None else None),
                )
                db.run(
                    "INSERT INTO embeddings (face_id, model_id, vector) VALUES (?, ?, ?)",
                    (fid, model_id, np.ascontiguousarray(f.vector, np.float32).tobytes()),
                )
                ids.append(fid)
        return created, ids

    def delete_person(self, gallery: str, person: str) -> list[int]:
        pid = self._person_id(gallery, person)
        with self._tx() as db:
            ids = [r[0] for r in db.all("SELECT id FROM faces WHERE person_id=?", (pid,))]
            db.run("DELETE FROM people WHERE id=?", (pid,))
        return ids

    def delete_face(self, gallery: str, person: str, face_id: int) -> None:
        pid = self._person_id(gallery, person)
        with self._tx() as db:
            if db.run("DELETE FROM faces WHERE id=? AND person_id=?", (face_id, pid)) == 0:
                raise NotFound(
                    f"no face {face_id} of {person!r} in gallery {gallery!r}; GET "
                    f"/galleries/{gallery}/people/{person} lists the faces"
                )

    def crop(self, gallery: str, person: str, face_id: int) -> Optional[bytes]:
        pid = self._person_id(gallery, person)
        row = self._one("SELECT crop FROM faces WHERE id=? AND person_id=?", (face_id, pid))
        if row is None:
            raise NotFound(f"no face {face_id} of {person!r} in gallery {gallery!r}")
        return row[0]

    # embeddings
    def count_embedded(self, gallery: str, model_id: str) -> tuple[int, int]:
        """(faces with an embedding by `model_id`, faces that could get one: those with a crop, or
        already embedded by it)."""
        row = self._agg(
            "SELECT COALESCE(SUM(CASE WHEN e.face_id IS NOT NULL THEN 1 ELSE 0 END), 0), "
            "COALESCE(SUM(CASE WHEN e.face_id IS NOT NULL OR f.crop IS NOT NULL THEN 1 ELSE 0 END), 0) "
            "FROM faces f JOIN people p ON p.id=f.person_id "
            "LEFT JOIN embeddings e ON e.face_id=f.id AND e.model_id=? WHERE p.gallery=?",
            (model_id, gallery),
        )
        return int(row[0]), int(row[1])

    def missing(
        self, gallery: str, model_id: str, limit: int, skip: Sequence[int] = ()
    ) -> list[tuple[int, bytes, str]]:
        """Up to `limit` faces with a crop and no embedding by `model_id`: (id, crop, kind)."""
        rows = self._all(
            "SELECT f.id, f.crop, f.crop_kind FROM faces f JOIN people p ON p.id=f.person_id "
            "WHERE p.gallery=? AND f.crop IS NOT NULL AND NOT EXISTS "
            "(SELECT 1 FROM embeddings e WHERE e.face_id=f.id AND e.model_id=?) ORDER BY f.id LIMIT ?",
            (gallery, model_id, limit + len(skip)),
        )
        skipped = set(skip)
        return [r for r in rows if r[0] not in skipped][:limit]

    def put_embeddings(self, model_id: str, items: Sequence[tuple[int, np.ndarray]]) -> None:
        """Store embeddings by `model_id`; a face deleted meanwhile is skipped."""
        with self._tx() as db:
            for fid, vec in items:
                db.run(
                    "INSERT INTO embeddings (face_id, model_id, vector) SELECT ?, ?, ? "
                    "WHERE EXISTS (SELECT 1 FROM faces WHERE id=?) "
                    "ON CONFLICT (face_id, model_id) DO UPDATE SET vector = excluded.vector",
                    (fid, model_id, np.ascontiguousarray(vec, np.float32).tobytes(), fid),
                )

    def iter_embeddings(
        self, gallery: str, model_id: str, chunk: int = 65536
    ) -> Iterator[tuple[list, list, np.ndarray]]:
        """The gallery's embeddings by `model_id`, in chunks: (face ids, person names, float32 [k, D])."""
        for rows in self._db.chunks(
            "SELECT f.id, p.name, e.vector FROM embeddings e JOIN faces f ON f.id=e.face_id "
            "JOIN people p ON p.id=f.person_id WHERE p.gallery=? AND e.model_id=? ORDER BY f.id",
            (gallery, model_id),
            chunk,
        ):
            yield (
                [r[0] for r in rows],
                [r[1] for r in rows],
                np.frombuffer(b"".join(bytes(r[2]) for r in rows), np.float32).reshape(len(rows), -1),
            )

    def load_index(self, gallery: str, model_id: str, dim: int) -> GalleryIndex:
        count = self.count_embedded(gallery, model_id)[0]
        index = GalleryIndex(dim, capacity=count + 64)
        with index.loading():
            for ids, names, vecs in self.iter_embeddings(gallery, model_id):
                if vecs.shape[1] != dim:
                    raise ConfigError(
                        f"gallery {gallery!r} holds {vecs.shape[1]}-d embeddings by {model_id}, expected {dim}"
                    )
                index.add(ids, names, vecs)
        return index
