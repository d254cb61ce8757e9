"""The searchable matrix of one gallery for one model, held in memory.

float32 [N, D], unit-norm rows. Identification is one matrix product of the probe embeddings with
it, then the best face of each person. Enrolment appends rows in place, beyond the rows readers
can see; deletion clears rows from a copy of a small validity mask; a reader works on an immutable
`Snapshot` and never sees a half-updated gallery.

Above COARSE_MIN_ROWS faces the rows are also grouped by their nearest of about sqrt(N)
centroids (k-means over a sample, built once and kept up to date on enrolment). A search then
scores the centroids, gathers the rows of the PROBE_SHARE of lists nearest the probe and scores
those exactly: a person whose faces all lie in other lists is missed, which on clustered
embeddings is rare (bench/README.md, gallery_search, gives the recall against the exact scan).
Below it every row is scored.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

_BLAS_SET = False

COARSE_MIN_ROWS = 250_000  # below, the exact scan is fast enough (bench/README.md, gallery_search)
PROBE_SHARE = 0.05  # of the lists (at least 8) searched for each probe


def _one_blas_thread() -> None:
    """Run the BLAS behind numpy on one thread, once per process. A gallery search is a
    matrix-vector product: bound by memory bandwidth, not arithmetic, and on a busy CPU several
    threads wait on each other (see bench/README.md, gallery_search)."""
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
    coarse: Optional["_Coarse"] = None  # the rows grouped by nearest centroid (large galleries)


@dataclass(frozen=True)
class _Coarse:
    """Centroids (float32 [L, D], unit rows) and, for each, the rows nearest it (int64, ascending;
    rows at or past a snapshot's n are not in it yet when it was taken)."""

    centroids: np.ndarray
    lists: tuple[np.ndarray, ...]


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
        self._coarse: Optional[_Coarse] = None
        self._assign = np.empty(cap, np.int32)  # each row's list, with _coarse
        self._loading = False
        self.snapshot = self._snap()

    def __len__(self) -> int:
        return self.snapshot.live

    @property
    def nbytes(self) -> int:
        return self._buf.nbytes + self._ids.nbytes + self._person.nbytes + self._assign.nbytes

    def _snap(self) -> Snapshot:
        n = self._n
        valid = self._valid
        live = n if valid is None else int(valid[:n].sum())
        return Snapshot(
            self._buf[:n],
            self._ids[:n],
            self._person[:n],
            self._names,
            None if valid is None else valid[:n],
            live,
            self._coarse,
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
        assign = np.empty(cap, np.int32)
        assign[:m] = self._assign[keep]
        self._buf, self._ids, self._person, self._assign = buf, ids, person, assign
        self._row_of = {int(f): r for r, f in enumerate(ids[:m])}
        self._n = m
        self._valid = None
        if self._coarse is not None:  # rows moved: the lists again, from the kept assignment
            self._coarse = _Coarse(self._coarse.centroids, _lists(assign[:m], len(self._coarse.centroids)))

    @contextmanager
    def loading(self) -> Iterator[None]:
        """Adds in bulk (loading a gallery): a large gallery's centroids are drawn once, at the
        end, from all of its rows."""
        self._loading = True
        try:
            yield
        finally:
            self._loading = False
            if self._coarse is None and self._n >= COARSE_MIN_ROWS:
                self._build_coarse()
                self.snapshot = self._snap()

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
        coarse = self._coarse
        if coarse is not None:
            near = np.argmax(vectors @ coarse.centroids.T, axis=1).astype(np.int32)
            self._assign[s : s + k] = near
            lists = list(coarse.lists)
            for c in np.unique(near):
                lists[c] = np.concatenate((lists[c], s + np.flatnonzero(near == c)))
            self._coarse = _Coarse(coarse.centroids, tuple(lists))
        elif self._n >= COARSE_MIN_ROWS and not self._loading:
            self._build_coarse()
        self.snapshot = self._snap()  # the publication: one reference assignment

    def _build_coarse(self, seed: int = 0) -> None:
        """Group the rows by the nearest of about sqrt(N) centroids: k-means (scikit-learn) on a
        sample, then every row assigned, in chunks."""
        from sklearn.cluster import KMeans

        n = self._n
        n_lists = int(max(64, round(np.sqrt(n))))
        rng = np.random.default_rng(seed)
        sample = self._buf[np.sort(rng.choice(n, size=min(n, 40 * n_lists), replace=False))]
        km = KMeans(n_clusters=n_lists, n_init=1, max_iter=10, random_state=seed).fit(sample)
        centroids = np.ascontiguousarray(km.cluster_centers_, dtype=np.float32)
        centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
        for a in range(0, n, 16384):  # chunks: the scores of 16k rows against sqrt(N) centroids
            b = min(n, a + 16384)
            self._assign[a:b] = np.argmax(self._buf[a:b] @ centroids.T, axis=1)
        self._coarse = _Coarse(centroids, _lists(self._assign[:n], n_lists))

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
        if snap.coarse is not None:
            return [_search_coarse(snap, row, k) for row in q]
        scores = snap.matrix @ q[0] if len(q) == 1 else (q @ snap.matrix.T)
        scores = scores.reshape(len(q), -1)
        if snap.valid is not None:
            scores[:, ~snap.valid] = -np.inf
        return [_top_people(row, snap.person_of, snap.face_ids, snap.names, k) for row in scores]

    def exact_search(self, queries: np.ndarray, k: int) -> list[list[Candidate]]:
        """`search` scoring every row, large gallery or not (what the coarse search is measured
        against)."""
        snap = self.snapshot
        return self.search_snapshot(
            Snapshot(snap.matrix, snap.face_ids, snap.person_of, snap.names, snap.valid, snap.live), queries, k
        )

    def search(self, queries: np.ndarray, k: int) -> list[list[Candidate]]:
        return self.search_snapshot(self.snapshot, queries, k)


def _lists(assign: np.ndarray, n_lists: int) -> tuple[np.ndarray, ...]:
    """For each list, its rows in ascending order, from each row's list."""
    order = np.argsort(assign, kind="stable")
    bounds = np.searchsorted(assign[order], np.arange(n_lists + 1))
    return tuple(order[bounds[i] : bounds[i + 1]].astype(np.int64) for i in range(n_lists))


def _search_coarse(snap: Snapshot, q: np.ndarray, k: int) -> list[Candidate]:
    """The k best people among the rows of the lists nearest `q` (float32 [D])."""
    coarse = snap.coarse
    assert coarse is not None
    n_lists = len(coarse.lists)
    n_probe = min(n_lists, max(8, int(round(PROBE_SHARE * n_lists))))
    near = np.argpartition(-(coarse.centroids @ q), n_probe - 1)[:n_probe]
    rows = np.concatenate([coarse.lists[c] for c in near])
    n = snap.matrix.shape[0]
    if rows.size and rows.max() >= n:  # enrolled after this snapshot was taken
        rows = rows[rows < n]
    if snap.valid is not None:
        rows = rows[snap.valid[rows]]
    if rows.size == 0:
        return []
    scores = snap.matrix[rows] @ q
    return _top_people(scores, snap.person_of[rows], snap.face_ids[rows], snap.names, k)


def _top_people(
    scores: np.ndarray, person_of: np.ndarray, face_ids: np.ndarray, names: list, k: int
) -> list[Candidate]:
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
            p = int(person_of[row])
            if p in seen:
                continue
            seen.add(p)
            out.append(Candidate(names[p], min(1.0, max(-1.0, s)), int(face_ids[row])))
            if len(out) == k:
                return out
        if m >= n:
            return out
        m = min(n, m * 4)
