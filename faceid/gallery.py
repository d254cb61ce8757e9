"""Galleries for 1:N identification: who, among the people enrolled, is this face?

Two pieces, no HTTP and no torch at import:

- `GalleryStore`: the SQLite file that keeps galleries, people, faces and embeddings. Each face keeps
  the crop it was embedded from (PNG), so a new model can embed it again; each embedding is a
  float32 blob tagged with the id of the model that computed it. A gallery is bound to one model
  id, and only that model's embeddings are ever searched: embeddings of two models are never
  compared.
- `GalleryIndex`: the searchable matrix of one gallery, float32 [N, D], unit-norm rows, held in
  memory. Identification is one matrix product of the probe embeddings with it, then the best
  face of each person. Enrolment appends rows in place, beyond the rows readers can see; deletion
  clears rows from a copy of a small validity mask; a reader works on an immutable `Snapshot` and
  never sees a half-updated gallery.

Helpers turn a photo into the face crops a gallery keeps (`prepare_faces`) and a stored crop back
into what a model embeds (`crop_input`), the same for the server and the `faceid gallery` command.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np

from faceid.errors import ConfigError, FaceIDError

GALLERY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# Person names as people write them ("Ann Lee", "O'Brien", "José_Núñez"): letters, digits, space
# and _ . ' - ; no slash, so a name is always one URL path segment.
PERSON_NAME = re.compile(r"[^\W_]|[^\W_][\w .'-]{0,126}[\w.']")
MAX_ENROLL_IMAGES = 16
CROP_SIZE = 112  # aligned crops are kept at least this large (the ArcFace template's size)
IMAGE_THUMB_SIDE = 256  # a photo kept for a model without alignment: its longer side at most this
RULE = "best"  # a person's score is the best score of their faces


class GalleryError(FaceIDError):
    """A gallery request that cannot be done as asked; `status` is its HTTP status."""

    status = 400


class NotFound(GalleryError):
    status = 404


class Conflict(GalleryError):
    status = 409


class BadInput(ConfigError):
    """A request field the gallery refuses (422); `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def check_gallery_name(name: str) -> str:
    if not isinstance(name, str) or not GALLERY_NAME.fullmatch(name):
        raise BadInput(
            "gallery",
            f"{str(name)[:80]!r} is not a gallery name: use 1 to 64 letters, digits, "
            "'_', '.' or '-', starting with a letter or digit (for example staff-2024)",
        )
    return name


def check_person_name(name: str) -> str:
    if not isinstance(name, str) or not PERSON_NAME.fullmatch(name):
        raise BadInput(
            "person",
            f"{str(name)[:80]!r} is not a person name: use 1 to 128 letters, digits, "
            "spaces or _ . ' -, starting with a letter or digit (for example Ann_Lee or Ann Lee)",
        )
    return name


def checkpoint_model_id(path: str | Path) -> str:
    """The id the server gives the model of `path` (app.model_manager): the job id for a job's
    checkpoint (MODELS_DIR/jobs/<id>/backbone_best.pt), else checkpoint-<hash of the path>."""
    p = Path(path).expanduser().absolute()
    if p.parent.parent.name == "jobs" and re.fullmatch(r"[0-9a-f]{32}", p.parent.name):
        return p.parent.name
    return "checkpoint-" + hashlib.sha256(str(p).encode()).hexdigest()[:12]


def normalize_rows(vectors: Any, dim: Optional[int] = None, field: str = "embeddings") -> np.ndarray:
    """float32 [N, D] unit rows; refuses a wrong width, non-finite values and zero vectors."""
    try:
        arr = np.asarray(vectors, dtype=np.float32)
    except (TypeError, ValueError):
        raise BadInput(field, "each embedding must be a list of numbers") from None
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise BadInput(field, "each embedding must be a list of numbers, all of the same length")
    if dim is not None and arr.shape[1] != dim:
        raise BadInput(
            field,
            f"the embeddings have {arr.shape[1]} values; the model has {dim}: export them "
            "with the same model, or re-enroll the photos",
        )
    if not np.isfinite(arr).all():
        raise BadInput(field, "an embedding holds NaN or infinity")
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    if (norms < 1e-12).any():
        raise BadInput(field, f"embedding {int(np.argmin(norms[:, 0]))} is all zeros")
    return np.ascontiguousarray(arr / norms, dtype=np.float32)


# --- the matrix -------------------------------------------------------------------------------

_BLAS_SET = False


def _one_blas_thread() -> None:
    """Run the BLAS behind numpy on one thread, once per process. A gallery search is a
    matrix-vector product: bound by memory bandwidth, not arithmetic. Measured on a busy 2-core
    CPU (bench/README.md, gallery_search): 0.7 ms at 10k faces on one thread against 8 to 16 ms
    on two, whose threads wait on each other; equal at 1M faces."""
    global _BLAS_SET
    if _BLAS_SET:
        return
    _BLAS_SET = True
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1, user_api="blas")
    except Exception:
        pass


@dataclass(frozen=True)
class Snapshot:
    """What one search reads: rows [0, n) of the matrix, their face ids and people, and which of
    them are live (None: all). Later enrolments write only rows past n, deletions a new mask."""

    matrix: np.ndarray  # float32 [n, D], a view of the index's buffer
    face_ids: np.ndarray  # int64 [n]
    person_of: np.ndarray  # int32 [n], into names
    names: list  # person index -> name (append-only)
    valid: Optional[np.ndarray]  # bool [n], None when every row is live
    live: int  # live rows


@dataclass(frozen=True)
class Candidate:
    person: str
    score: float
    face_id: int


class GalleryIndex:
    """The in-memory matrix of one gallery for one model. Mutations (`add`, `remove`) must be
    serialised by the caller (one lock per gallery); `search` needs no lock."""

    GROWTH = 1.25  # a full buffer grows by a quarter: the old and the new buffer coexist while copying

    def __init__(self, dim: int, capacity: int = 0) -> None:
        self.dim = int(dim)
        cap = max(int(capacity), 16)
        self._buf = np.empty((cap, self.dim), np.float32)
        self._ids = np.empty(cap, np.int64)
        self._person = np.empty(cap, np.int32)
        self._names: list[str] = []
        self._name_index: dict[str, int] = {}
        self._row_of: dict[int, int] = {}
        self._n = 0
        self._valid: Optional[np.ndarray] = None
        self.snapshot = self._snap()

    def __len__(self) -> int:
        return self.snapshot.live

    @property
    def nbytes(self) -> int:
        return self._buf.nbytes + self._ids.nbytes + self._person.nbytes

    def _snap(self) -> Snapshot:
        n = self._n
        valid = self._valid
        live = n if valid is None else int(valid[:n].sum())
        return Snapshot(
            self._buf[:n], self._ids[:n], self._person[:n], self._names, None if valid is None else valid[:n], live
        )

    def _person_index(self, name: str) -> int:
        i = self._name_index.get(name)
        if i is None:
            i = self._name_index[name] = len(self._names)
            self._names.append(name)
        return i

    def _grow(self, needed: int) -> None:
        """A new, larger buffer holding the live rows (compacted); readers keep the old one."""
        snap = self.snapshot
        keep = np.arange(self._n) if snap.valid is None else np.flatnonzero(snap.valid)
        cap = max(needed + len(keep), int(self._buf.shape[0] * self.GROWTH), 16)
        buf = np.empty((cap, self.dim), np.float32)
        ids = np.empty(cap, np.int64)
        person = np.empty(cap, np.int32)
        m = len(keep)
        # in chunks: a fancy-indexed copy of 1M rows would allocate a second 2 GB matrix first
        for s in range(0, m, 65536):
            e = min(s + 65536, m)
            buf[s:e] = self._buf[keep[s:e]]
        ids[:m] = self._ids[keep]
        person[:m] = self._person[keep]
        self._buf, self._ids, self._person = buf, ids, person
        self._row_of = {int(f): r for r, f in enumerate(ids[:m])}
        self._n = m
        self._valid = None

    def reserve(self, total: int) -> None:
        """Make room for `total` rows in all (loading a gallery: one allocation, no regrowth)."""
        if total > self._buf.shape[0]:
            self._grow(total - (self.snapshot.live))

    def add(self, face_ids: Sequence[int], persons: Sequence[str], vectors: np.ndarray) -> None:
        """Append rows: `vectors` float32 [k, D], unit norm."""
        k = len(face_ids)
        if k == 0:
            return
        if vectors.shape != (k, self.dim):
            raise ValueError(f"vectors of shape {vectors.shape}; this index holds {self.dim}-d rows")
        if self._n + k > self._buf.shape[0]:
            self._grow(k)
        s = self._n
        self._buf[s : s + k] = vectors
        self._ids[s : s + k] = face_ids
        self._person[s : s + k] = [self._person_index(p) for p in persons]
        for r, f in enumerate(face_ids):
            self._row_of[int(f)] = s + r
        valid = self._valid
        if valid is not None:
            if valid.shape[0] < self._buf.shape[0]:
                grown = np.zeros(self._buf.shape[0], bool)
                grown[:s] = valid[:s]
                valid = grown
            valid[s : s + k] = True  # rows past n: no reader sees them yet
            self._valid = valid
        self._n = s + k
        self.snapshot = self._snap()  # the publication: one reference assignment

    def remove(self, face_ids: Iterable[int]) -> int:
        rows = [self._row_of.pop(int(f)) for f in face_ids if int(f) in self._row_of]
        if not rows:
            return 0
        valid = np.ones(self._buf.shape[0], bool) if self._valid is None else self._valid.copy()
        valid[rows] = False
        self._valid = valid
        self.snapshot = self._snap()
        dead = self._n - self.snapshot.live
        if dead > 1024 and dead > self._n // 4:  # compact: searches stop scanning dead rows
            self._grow(0)
            self.snapshot = self._snap()
        return len(rows)

    @staticmethod
    def search_snapshot(snap: Snapshot, queries: np.ndarray, k: int) -> list[list[Candidate]]:
        """For each query (float32 [Q, D], unit rows) the `k` best people, best first, a person's
        score being their best face's cosine similarity."""
        if snap.live == 0:
            return [[] for _ in range(len(queries))]
        _one_blas_thread()
        q = np.ascontiguousarray(queries, dtype=np.float32)
        scores = snap.matrix @ q[0] if len(q) == 1 else (q @ snap.matrix.T)
        scores = scores.reshape(len(q), -1)
        if snap.valid is not None:
            scores[:, ~snap.valid] = -np.inf
        return [_top_people(row, snap, k) for row in scores]

    def search(self, queries: np.ndarray, k: int) -> list[list[Candidate]]:
        return self.search_snapshot(self.snapshot, queries, k)


def _top_people(scores: np.ndarray, snap: Snapshot, k: int) -> list[Candidate]:
    """The k best people by their best face: the m best faces hold the best face of every person
    among them, in order; m grows until k people are found (exact, not approximate)."""
    n = len(scores)
    m = min(n, 4 * k + 16)
    while True:
        if m < n:
            top = np.argpartition(scores, n - m)[n - m :]
        else:
            top = np.arange(n)
        top = top[np.argsort(-scores[top], kind="stable")]
        out: list[Candidate] = []
        seen: set[int] = set()
        for row in top:
            s = float(scores[row])
            if s == -np.inf:
                break
            p = int(snap.person_of[row])
            if p in seen:
                continue
            seen.add(p)
            out.append(Candidate(snap.names[p], min(1.0, max(-1.0, s)), int(snap.face_ids[row])))
            if len(out) == k:
                return out
        if m >= n:
            return out
        m = min(n, m * 4)


# --- crops ----------------------------------------------------------------------------------------


@dataclass
class FaceInput:
    """One face of a photo: what the model embeds (`prepared`), the crop kept for later models
    (PNG bytes; `kind` aligned: an aligned face crop, image: the photo itself), and the face found
    (None without detection)."""

    prepared: Any
    crop: bytes
    kind: str
    face: Optional[dict[str, Any]]


def _png(img: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def prepare_faces(verifier: Any, img: Any, detect: bool = True, all_faces: bool = False) -> list[FaceInput]:
    """The faces of a decoded photo (PIL RGB) as `verifier` embeds them, largest first: every
    face (`all_faces`) or only the largest. A model trained on aligned faces detects them (raises
    faceid.faces.NoFaceError when there is none); with `detect` False, or for a model without
    alignment, the photo is the one face. A verifier without `prepare_face` (a test double) embeds
    the image as it is."""
    from PIL import Image

    detector = getattr(verifier, "detector", None)
    if detector is not None and detect:
        import torch

        from faceid.faces import NoFaceError, align_face
        from faceid.inference import Prepared

        faces = sorted(detector.detect([img])[0], key=lambda f: f.area, reverse=True)
        if not faces:
            try:
                verifier.prepare_face(img, True)  # its own message, with the detector's limits
            except NoFaceError:
                raise
            raise NoFaceError("no face found in the image")
        chosen = faces if all_faces else faces[:1]
        out = []
        side = max(CROP_SIZE, int(verifier.img_size))
        for f in chosen:
            tensor = torch.from_numpy(align_face(img, f.landmarks, verifier.img_size, verifier.crop))
            crop = align_face(img, f.landmarks, side, 1.0)
            prepared = Prepared(tensor, f, len(faces))
            out.append(
                FaceInput(prepared, _png(Image.fromarray(crop.transpose(1, 2, 0))), "aligned", prepared.face_json())
            )
        return out
    thumb = img.copy()
    thumb.thumbnail((IMAGE_THUMB_SIDE, IMAGE_THUMB_SIDE))
    prepare_face = getattr(verifier, "prepare_face", None)
    if prepare_face is not None:
        prepared = prepare_face(img, detect)
        kind = "aligned" if getattr(verifier, "detector", None) is not None else "image"
        if kind == "aligned":  # detect=false on an aligned model: the upload is a face crop already
            side = max(CROP_SIZE, int(verifier.img_size))
            thumb = img.convert("RGB").resize((side, side), Image.BILINEAR)
        return [FaceInput(prepared, _png(thumb), kind, None)]
    return [FaceInput(img, _png(thumb), "image", None)]


def crop_input(verifier: Any, crop: bytes, kind: str) -> Any:
    """A stored crop as `verifier` embeds it: an aligned crop without detecting again (resized to
    the model's input, its `crop` share kept); a photo prepared as an upload would be (raises
    NoFaceError when a model with alignment finds no face in it)."""
    from PIL import Image

    img = Image.open(io.BytesIO(crop)).convert("RGB")
    prepare_face = getattr(verifier, "prepare_face", None)
    if prepare_face is None:
        return img
    return prepare_face(img, kind != "aligned")


# --- the store ------------------------------------------------------------------------------------

SCHEMA = """
CREATE TABLE IF NOT EXISTS galleries (
    name TEXT PRIMARY KEY, created_at REAL NOT NULL, model_id TEXT, dim INTEGER);
CREATE TABLE IF NOT EXISTS people (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    gallery TEXT NOT NULL REFERENCES galleries(name) ON DELETE CASCADE,
    name TEXT NOT NULL, created_at REAL NOT NULL, UNIQUE (gallery, name));
CREATE TABLE IF NOT EXISTS faces (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    person_id INTEGER NOT NULL REFERENCES people(id) ON DELETE CASCADE,
    created_at REAL NOT NULL, source TEXT, crop BLOB, crop_kind TEXT, face TEXT);
CREATE INDEX IF NOT EXISTS faces_person ON faces(person_id);
CREATE TABLE IF NOT EXISTS embeddings (
    face_id INTEGER NOT NULL REFERENCES faces(id) ON DELETE CASCADE,
    model_id TEXT NOT NULL, vector BLOB NOT NULL, PRIMARY KEY (face_id, model_id));
"""


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
    """The galleries' SQLite file. Thread-safe: one connection, one lock; every change is one
    transaction, so a crash leaves each enrolment or deletion whole or absent."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
        except sqlite3.Error as e:
            raise ConfigError(
                f"the gallery database {self.path} cannot be opened ({e}); restore it from a "
                "backup, or move it away to start without galleries"
            ) from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _tx(self):
        store = self

        class _Tx:
            def __enter__(self_inner):
                store._lock.acquire()
                store._db.execute("BEGIN IMMEDIATE")
                return store._db

            def __exit__(self_inner, et, ev, tb):
                try:
                    store._db.execute("COMMIT" if et is None else "ROLLBACK")
                finally:
                    store._lock.release()
                return False

        return _Tx()

    def _one(self, sql: str, args: tuple = ()) -> Optional[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchone()

    def _all(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # galleries
    def create_gallery(self, name: str) -> dict[str, Any]:
        check_gallery_name(name)
        with self._tx() as db:
            if db.execute("SELECT 1 FROM galleries WHERE name=?", (name,)).fetchone():
                raise Conflict(
                    f"gallery {name!r} exists already; enroll into it, or DELETE /galleries/{name} "
                    "first to start it again"
                )
            db.execute("INSERT INTO galleries (name, created_at) VALUES (?, ?)", (name, time.time()))
        return self.gallery(name)  # type: ignore[return-value]

    def gallery_names(self) -> list[str]:
        return [r[0] for r in self._all("SELECT name FROM galleries ORDER BY name")]

    def gallery(self, name: str) -> Optional[dict[str, Any]]:
        row = self._one("SELECT name, created_at, model_id, dim FROM galleries WHERE name=?", (name,))
        if row is None:
            return None
        people, faces, cropless = self._one(
            "SELECT COUNT(DISTINCT p.id), COUNT(f.id), COALESCE(SUM(f.crop IS NULL), 0) "
            "FROM people p LEFT JOIN faces f ON f.person_id = p.id WHERE p.gallery=?",
            (name,),
        )
        searchable = 0
        if row[2] is not None:
            searchable = self._one(
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

    def meta(self, name: str) -> tuple[Optional[str], Optional[int]]:
        """(the model the gallery is bound to, its dimension), cheaply; NotFound for no gallery."""
        row = self._one("SELECT model_id, dim FROM galleries WHERE name=?", (name,))
        if row is None:
            raise NotFound(f"no gallery {name[:80]!r}; GET /galleries lists them, POST /galleries creates one")
        return row[0], row[1]

    def delete_gallery(self, name: str) -> dict[str, Any]:
        g = self.require(name)
        with self._tx() as db:
            db.execute("DELETE FROM galleries WHERE name=?", (name,))
        return g

    def bind(self, name: str, model_id: str, dim: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE galleries SET model_id=?, dim=? WHERE name=?", (model_id, int(dim), name))

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
        pid = self._person_id(gallery, person)
        created = self._one("SELECT created_at FROM people WHERE id=?", (pid,))[0]
        rows = self._all(
            "SELECT f.id, f.created_at, f.source, f.crop IS NOT NULL, f.face, "
            "(SELECT group_concat(model_id, ' ') FROM embeddings WHERE face_id=f.id) "
            "FROM faces f WHERE f.person_id=? ORDER BY f.id",
            (pid,),
        )
        faces = [
            {
                "id": i,
                "created_at": c,
                "source": s,
                "has_crop": bool(h),
                "face": json.loads(fj) if fj else None,
                "models": sorted((m or "").split()),
            }
            for i, c, s, h, fj, m in rows
        ]
        return {"name": person, "created_at": created, "faces": faces}

    def add_faces(self, gallery: str, person: str, model_id: str, faces: Sequence[NewFace]) -> tuple[bool, list[int]]:
        """Enroll `faces` (embedded by `model_id`) for `person`, creating the person when new:
        (created, face ids), in one transaction."""
        check_person_name(person)
        now = time.time()
        with self._tx() as db:
            if db.execute("SELECT 1 FROM galleries WHERE name=?", (gallery,)).fetchone() is None:
                raise NotFound(f"no gallery {gallery[:80]!r}; POST /galleries creates one")
            row = db.execute("SELECT id FROM people WHERE gallery=? AND name=?", (gallery, person)).fetchone()
            created = row is None
            pid = (
                db.execute(
                    "INSERT INTO people (gallery, name, created_at) VALUES (?, ?, ?)", (gallery, person, now)
                ).lastrowid
                if created
                else row[0]
            )
            ids = []
            for f in faces:
                fid = db.execute(
                    "INSERT INTO faces (person_id, created_at, source, crop, crop_kind, face) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (pid, now, f.source, f.crop, f.kind, json.dumps(f.face) if f.face is not None else None),
                ).lastrowid
                db.execute(
                    "INSERT INTO embeddings (face_id, model_id, vector) VALUES (?, ?, ?)",
                    (fid, model_id, np.ascontiguousarray(f.vector, np.float32).tobytes()),
                )
                ids.append(fid)
        return created, ids

    def delete_person(self, gallery: str, person: str) -> list[int]:
        pid = self._person_id(gallery, person)
        with self._tx() as db:
            ids = [r[0] for r in db.execute("SELECT id FROM faces WHERE person_id=?", (pid,))]
            db.execute("DELETE FROM people WHERE id=?", (pid,))
        return ids

    def delete_face(self, gallery: str, person: str, face_id: int) -> None:
        pid = self._person_id(gallery, person)
        with self._tx() as db:
            if db.execute("DELETE FROM faces WHERE id=? AND person_id=?", (face_id, pid)).rowcount == 0:
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
        row = self._one(
            "SELECT COALESCE(SUM(e.face_id IS NOT NULL), 0), "
            "COALESCE(SUM(e.face_id IS NOT NULL OR f.crop IS NOT NULL), 0) "
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
                db.execute(
                    "INSERT OR REPLACE INTO embeddings (face_id, model_id, vector) SELECT ?, ?, ? "
                    "WHERE EXISTS (SELECT 1 FROM faces WHERE id=?)",
                    (fid, model_id, np.ascontiguousarray(vec, np.float32).tobytes(), fid),
                )

    def iter_embeddings(
        self, gallery: str, model_id: str, chunk: int = 65536
    ) -> Iterator[tuple[list, list, np.ndarray]]:
        """The gallery's embeddings by `model_id`, in chunks: (face ids, person names, float32 [k, D])."""
        with self._lock:
            cur = self._db.execute(
                "SELECT f.id, p.name, e.vector FROM embeddings e JOIN faces f ON f.id=e.face_id "
                "JOIN people p ON p.id=f.person_id WHERE p.gallery=? AND e.model_id=? ORDER BY f.id",
                (gallery, model_id),
            )
            while True:
                rows = cur.fetchmany(chunk)
                if not rows:
                    return
                yield (
                    [r[0] for r in rows],
                    [r[1] for r in rows],
                    np.frombuffer(b"".join(r[2] for r in rows), np.float32).reshape(len(rows), -1),
                )

    def load_index(self, gallery: str, model_id: str, dim: int) -> GalleryIndex:
        count = self.count_embedded(gallery, model_id)[0]
        index = GalleryIndex(dim, capacity=count + 64)
        for ids, names, vecs in self.iter_embeddings(gallery, model_id):
            if vecs.shape[1] != dim:
                raise ConfigError(
                    f"gallery {gallery!r} holds {vecs.shape[1]}-d embeddings by {model_id}, expected {dim}"
                )
            index.add(ids, names, vecs)
        return index
