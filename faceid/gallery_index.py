"""The searchable matrix of one gallery for one model, held in memory.

float32 [N, D], unit-norm rows. Identification is one matrix product of the probe embeddings with
it, then the best face of each person. Enrolment appends rows in place, beyond the rows readers
can see; deletion clears rows from a copy of a small validity mask; a reader works on an immutable
`Snapshot` and never sees a half-updated gallery.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

_BLAS_SET = False


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
