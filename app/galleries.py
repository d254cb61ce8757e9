"""The service's galleries: the store, one in-memory index per gallery, and the background task
that re-embeds galleries when the served model changes.

- Every change to a gallery (enrol, delete a face, a person, the gallery, a rebuild) runs in a
  thread under that gallery's lock: the database transaction, then the index update. An identify
  takes the gallery's current index snapshot without a lock, so it sees a gallery before or after
  a change, never half of one.
- A gallery is bound to the model whose embeddings it searches. The served model is polled
  (`ModelManager.current`, twice a second, and on every gallery request); when it differs, the
  background task embeds every stored crop with the new model (through the same batching worker as
  /embed), then loads the new embeddings and binds the gallery to the new model in one step.
  Meanwhile identify answers 409 with the progress; enrolment goes on, with the new model.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import anyio
import numpy as np

from app.model_manager import ModelManager, ServedModel, open_upload
from app.settings import Settings
from faceid.errors import ImageError
from faceid.gallery import Conflict, FaceInput, GalleryError, crop_input, normalize_rows, prepare_faces
from faceid.gallery_index import Candidate, GalleryIndex
from faceid.gallery_store import GalleryStore, NewFace

log = logging.getLogger(__name__)

POLL_S = 0.5
REEMBED_BATCH = 16


@dataclass(frozen=True)
class Bound:
    """A gallery's index and the model whose embeddings it holds."""

    model: str
    index: GalleryIndex


class GalleryService:
    def __init__(self, settings: Settings, models: ModelManager) -> None:
        self.settings = settings
        self.models = models
        self.store = GalleryStore(settings.galleries_database)
        self._bound: dict[str, Bound] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._progress: dict[str, dict[str, Any]] = {}  # gallery -> re-embedding progress
        self._dirty: set[str] = set()  # faces embedded by another model than the bound one
        self._failed: dict[tuple[str, str], set[int]] = {}  # (gallery, model) -> faces it found no face in
        self._task: Optional[asyncio.Task] = None
        self._wake: Optional[asyncio.Event] = None

    # -- life -----------------------------------------------------------------------------------

    def load(self) -> None:
        """At start (in a thread): every gallery's index for the model it is bound to."""
        for name in self.store.gallery_names():
            try:
                self._index(name)
            except Exception:
                log.exception("gallery %s could not be loaded", name)

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._follow(), name="faceid-galleries")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        self.store.close()

    def wake(self) -> None:
        if self._wake is not None:
            self._wake.set()

    # -- helpers ------------------------------------------------------------------------------------

    def lock(self, name: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(name, threading.Lock())

    def _index(self, name: str) -> Optional[Bound]:
        """The gallery's index for its bound model, loaded once (under the gallery's lock)."""
        model, _ = self.store.meta(name)
        bound = self._bound.get(name)
        if model is None:
            return None
        if bound is not None and bound.model == model:
            return bound
        with self.lock(name):
            model, dim = self.store.meta(name)
            bound = self._bound.get(name)
            if model is not None and (bound is None or bound.model != model):
                assert dim is not None  # a gallery bound to a model knows its dimension
                bound = Bound(model, self.store.load_index(name, model, dim))
                self._bound[name] = bound
        return bound

    def describe(self, name: str) -> dict[str, Any]:
        g = self.store.require(name)
        served = self.models.current
        status = "empty" if g["faces"] == 0 else "ready"
        progress = None
        if g["faces"] and served is not None and (g["model"] != served.id or name in self._dirty):
            status = "reembedding"
            done, total = self.store.count_embedded(name, served.id)
            live = self._progress.get(name)
            failed = len(self._failed.get((name, served.id), ()))
            progress = {
                "model": served.id,
                "done": done,
                "total": total,
                "failed": failed,
                "percent": round(100.0 * done / total, 1) if total else 100.0,
                "running": bool(live and live.get("model") == served.id),
            }
        elif g["faces"] and served is None:
            status = "no_model"
        return {**g, "status": status, "reembedding": progress, "rule": "best"}

    async def decode(
        self,
        served: ServedModel,
        data: bytes,
        name: str,
        detect: bool,
        all_faces: bool,
        filename: Optional[str] = None,
        min_face: Optional[float] = None,
    ) -> list[FaceInput]:
        """An upload's faces as the served model embeds them (off the event loop). An upload that is
        not an image, or in which an aligned model finds no face, is an ImageError naming `name`.
        `min_face`: find faces down to this percent of the photo's longer side (a group photo),
        where the model's own detection stops at a larger size."""
        verifier = served.verifier
        side = getattr(verifier, "decode_side", None)
        max_pixels = self.settings.max_pixels

        def work() -> list[FaceInput]:
            try:
                if detect and getattr(verifier, "detector", None) is not None:  # as its training read photos
                    detector = verifier.detector_for(min_face)
                    img = verifier.read(data, True, detector, max_pixels=max_pixels, name=name)
                    return prepare_faces(verifier, img, detect, all_faces, detector)
                img = open_upload(data, max_pixels=max_pixels, name=name, reduce_to=side)
                return prepare_faces(verifier, img, detect, all_faces)
            except ImageError as e:
                label = f"{name} ({filename})" if filename else name
                if name not in str(e) or filename:
                    e.args = (f"{label}: {e}",)
                e.field = name
                raise

        return await anyio.to_thread.run_sync(work)

    # -- changes --------------------------------------------------------------------------------------

    def enroll(self, gallery: str, person: str, model: str, faces: Sequence[NewFace]) -> tuple[bool, list[int]]:
        """Store `faces` (embedded by `model`) and, when the gallery searches that model's
        embeddings, add them to its index: one step under the gallery's lock."""
        with self.lock(gallery):
            bound_model, bound_dim = self.store.meta(gallery)
            dim = int(len(faces[0].vector))
            if bound_model == model and bound_dim != dim:
                raise Conflict(f"gallery {gallery!r} holds {bound_dim}-d embeddings; these are {dim}-d")
            created, ids = self.store.add_faces(gallery, person, model, faces)
            if bound_model is None:
                self.store.bind(gallery, model, dim)
                self._bound[gallery] = Bound(model, GalleryIndex(dim))
                bound_model = model
            bound = self._bound.get(gallery)
            if bound_model == model:
                if bound is not None and bound.model == model:
                    bound.index.add(ids, [person] * len(ids), np.stack([f.vector for f in faces]))
                else:  # not loaded yet: the next use loads it, these faces included
                    self._bound.pop(gallery, None)
            else:  # the gallery still searches an earlier model's embeddings: re-embedding takes these in
                self._dirty.add(gallery)
        self.wake()
        return created, ids

    def delete_person(self, gallery: str, person: str) -> int:
        with self.lock(gallery):
            ids = self.store.delete_person(gallery, person)
            bound = self._bound.get(gallery)
            if bound is not None:
                bound.index.remove(ids)
        return len(ids)

    def delete_face(self, gallery: str, person: str, face_id: int) -> None:
        with self.lock(gallery):
            self.store.delete_face(gallery, person, face_id)
            bound = self._bound.get(gallery)
            if bound is not None:
                bound.index.remove([face_id])

    def delete_gallery(self, gallery: str) -> dict[str, Any]:
        with self.lock(gallery):
            g = self.store.delete_gallery(gallery)
            self._bound.pop(gallery, None)
            self._dirty.discard(gallery)
        return g

    # -- search ---------------------------------------------------------------------------------------

    def search(self, gallery: str, model: str, queries: np.ndarray, k: int) -> Optional[list[list[Candidate]]]:
        """The k best people for each query, from the gallery's current snapshot; None when the
        gallery does not hold `model`'s embeddings (it is being re-embedded)."""
        bound = self._index(gallery)
        if bound is None:
            return [[] for _ in range(len(queries))]
        if bound.model != model:
            return None
        return bound.index.search(queries, k)

    # -- following the served model -----------------------------------------------------------------

    async def _follow(self) -> None:
        assert self._wake is not None
        while True:
            try:
                await self._step()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("re-embedding galleries failed; trying again")
                await anyio.sleep(5)
            try:
                await asyncio.wait_for(self._wake.wait(), POLL_S)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()

    async def _step(self) -> None:
        served = self.models.current
        if served is None:
            return
        for name in await anyio.to_thread.run_sync(self.store.gallery_names):
            try:  # one indexed row per gallery: this runs twice a second
                model, _ = await anyio.to_thread.run_sync(self.store.meta, name)
            except GalleryError:  # deleted meanwhile
                continue
            if model is None:  # nothing enrolled yet
                continue
            if model != served.id or name in self._dirty:
                await self._reembed(name, served)
            if self.models.current is not served:
                return  # switched again: start over with the new one

    async def _reembed(self, name: str, served: ServedModel) -> None:
        """Embed every face of `name` that `served` has not embedded yet, from its stored crop, then
        search the new embeddings."""
        failed = self._failed.setdefault((name, served.id), set())
        self._progress[name] = {"model": served.id}
        log.info("gallery %s: embedding its faces with model %s", name, served.id)
        try:
            while True:
                if self.models.current is not served:
                    return
                rows = await anyio.to_thread.run_sync(
                    self.store.missing, name, served.id, REEMBED_BATCH, sorted(failed)
                )
                if not rows:
                    break

                def prepare(rows=rows) -> list[tuple[int, Any]]:
                    out = []
                    for fid, crop, kind in rows:
                        try:
                            out.append((fid, crop_input(served.verifier, crop, kind)))
                        except ImageError:  # the new model finds no face in it
                            failed.add(fid)
                    return out

                ready = await anyio.to_thread.run_sync(prepare)
                if not ready:
                    continue
                vectors = await self.models.embed(served, [x for _, x in ready])
                vectors = normalize_rows(vectors)
                await anyio.to_thread.run_sync(
                    self.store.put_embeddings, served.id, [(fid, v) for (fid, _), v in zip(ready, vectors)]
                )
            dim = int(served.verifier.info.get("embedding_size") or 0)
            await anyio.to_thread.run_sync(self._rebind, name, served.id, dim)
            log.info("gallery %s: now searches model %s's embeddings", name, served.id)
        finally:
            self._progress.pop(name, None)

    def _rebind(self, name: str, model: str, dim: int) -> None:
        with self.lock(name):
            if self.store.gallery(name) is None:
                return
            if not dim:
                first = next(self.store.iter_embeddings(name, model, chunk=1), None)
                dim = first[2].shape[1] if first else 0
            # the old model's matrix goes first: old and new side by side would double the memory
            # (searches wait for the lock meanwhile, then find the new one)
            self._bound.pop(name, None)
            index = self.store.load_index(name, model, dim)
            self.store.bind(name, model, dim)
            self._bound[name] = Bound(model, index)
            self._dirty.discard(name)


class GalleryFollower(GalleryService):
    """The galleries of an inference server: read only. The API server enrols, deletes and
    re-embeds; this one reloads a gallery's index when the database says it changed (another
    process committed, and the gallery's bound model or its faces differ from what is loaded), so
    identify on any inference server answers from the same gallery within about a second."""

    def __init__(self, settings: Settings, models: ModelManager) -> None:
        super().__init__(settings, models)
        self._seen_version: Optional[int] = None
        self._loaded: dict[str, tuple[str, tuple[int, int, int]]] = {}

    def _index(self, name: str) -> Optional[Bound]:
        return self._bound.get(name)

    async def _step(self) -> None:
        await anyio.to_thread.run_sync(self.sync)

    def sync(self) -> None:
        """Load what changed since the last look (in a thread)."""
        version = self.store.data_version()
        if version == self._seen_version:
            return
        self._seen_version = version
        names = set(self.store.gallery_names())
        for gone in set(self._bound) - names:
            self._bound.pop(gone, None)
            self._loaded.pop(gone, None)
        for name in sorted(names):
            try:
                model, dim = self.store.meta(name)
                if model is None or dim is None:
                    self._bound.pop(name, None)
                    continue
                sig = self.store.signature(name, model)
                if self._loaded.get(name) == (model, sig):
                    continue
                index = self.store.load_index(name, model, dim)
                self._bound[name] = Bound(model, index)
                self._loaded[name] = (model, sig)
                log.info("gallery %s: loaded %d faces of model %s", name, len(index), model)
            except GalleryError:  # deleted meanwhile
                self._bound.pop(name, None)
                self._loaded.pop(name, None)

    def load(self) -> None:
        self.sync()
