"""Faces of a dataset's images, detected once and cached.

`find_faces(paths, spec, ...)` returns every face of each file. What a detector found in a file is
kept in a SQLite file per detector setting (`<cache dir>/faces-v2-<spec.key>.sqlite`), keyed by
the file's absolute path, size and modification time: a later run or job reads it back, a changed
image is detected again on its own, and other detector settings have a cache of their own. A face's
box and landmarks are in the full-size photo's pixels, whatever scale a large JPEG was decoded at
for detection.

The cache folder is FACEID_CACHE_DIR, else `$XDG_CACHE_HOME/faceid`, else `~/.cache/faceid`.
Detection runs in `workers` processes on a CPU (one compute thread each), or on the GPU when
`device` is one (the files decoded by the workers). Progress is logged every few seconds and
handed to `progress(done, total)`.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch

from faceid.database import use_wal
from faceid.faces import DetectorSpec, Face, FaceDetector, build_detector, shrink_for_detection
from faceid.images import open_image_scaled

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


def cache_dir() -> Path:
    env = os.environ.get("FACEID_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "faceid"


# v2: every face in the full-size photo's pixels, found on a JPEG decoded reduced as far as its
# longer side stays at max_side or more. The caches before it (faces-<key>.sqlite) decoded as far
# as the shorter side allowed and held such a photo's faces in the reduced decoding's pixels; they
# are not read.
CACHE_FORMAT = "v2"


class FaceCache:
    """path -> faces, for one detector setting, valid while the file's size and mtime hold."""

    def __init__(self, spec: DetectorSpec, folder: Optional[Path] = None) -> None:
        folder = folder or cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"faces-{CACHE_FORMAT}-{spec.key}.sqlite"
        self.db = sqlite3.connect(self.path, timeout=60)
        use_wal(self.db, 60)
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS faces (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, faces TEXT)"
        )

    @staticmethod
    def _stamp(path: Path) -> Optional[tuple[int, int]]:
        try:
            st = path.stat()
        except OSError:
            return None
        return st.st_size, st.st_mtime_ns

    def get_many(self, paths: Sequence[Path]) -> list[Optional[list[Face]]]:
        out: list[Optional[list[Face]]] = []
        cur = self.db.cursor()
        for p in paths:
            stamp = self._stamp(p)
            row = (
                cur.execute("SELECT size, mtime_ns, faces FROM faces WHERE path = ?", (str(p.absolute()),)).fetchone()
                if stamp
                else None
            )
            if row is None or (row[0], row[1]) != stamp:
                out.append(None)
            else:
                out.append([Face.from_json(f) for f in json.loads(row[2])])
        return out

    def put_many(self, items: Sequence[tuple[Path, list[Face]]]) -> None:
        rows = []
        for p, faces in items:
            stamp = self._stamp(p)
            if stamp is not None:
                rows.append((str(p.absolute()), stamp[0], stamp[1], json.dumps([f.to_json(exact=True) for f in faces])))
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO faces VALUES (?, ?, ?, ?)", rows)

    def close(self) -> None:
        self.db.close()


# Files per detector call in a worker on a CPU: MTCNN's R- and O-nets run once for all of their
# candidates, so a folder's faces are found about twice as fast as one photo at a time
# (bench/README.md, face_cache_speed)
DETECT_CHUNK = 8


class _DetectFiles(torch.utils.data.Dataset):
    """Item k: the results of files k * chunk to (k + 1) * chunk - 1, each (i, its faces or None,
    error), found with one detector call. With `detect` False the worker only decodes (for
    detection on the GPU): (i, (the shrunk image, the factor to the full-size photo), error). A
    large JPEG is decoded reduced (its longer side kept at max_side or more, faceid.faces.Photo);
    its faces are scaled back to the full-size photo's pixels, where they are aligned."""

    def __init__(self, paths: Sequence[Path], spec: DetectorSpec, detect: bool, chunk: int = 1) -> None:
        self.paths, self.spec, self.detect, self.chunk = list(paths), spec, detect, max(1, chunk)

    def __len__(self) -> int:
        return -(-len(self.paths) // self.chunk)

    def __getitem__(self, k: int) -> list:
        out: list[tuple[int, Any, str]] = []
        images: list[tuple[int, Any, int]] = []
        for i in range(k * self.chunk, min(len(self.paths), (k + 1) * self.chunk)):
            try:
                img, scale = open_image_scaled(self.paths[i], reduce_longer_to=self.spec.max_side)
            except Exception as e:  # unreadable: the caller's image check reports it
                out.append((i, None, f"{type(e).__name__}: {e}"))
                continue
            if self.detect:
                images.append((i, img, scale))
            else:
                small, factor = shrink_for_detection(img, self.spec)
                out.append((i, (small, factor * scale), ""))
        if images:
            if torch.utils.data.get_worker_info() is not None:
                torch.set_num_threads(1)
            found = build_detector(self.spec).detect([img for _, img, _ in images])
            out += [(i, [f.scaled(scale) for f in faces], "") for (i, _, scale), faces in zip(images, found)]
        return sorted(out, key=lambda item: item[0])


class Pace:
    """When to report a long loop's progress: every `every` seconds and at its end, with its rate
    (items/s) and the seconds left."""

    def __init__(self, total: int, every: float = 5.0) -> None:
        self.total, self.every = total, every
        self.start = self.last = time.monotonic()

    def due(self, done: int) -> Optional[tuple[float, float]]:
        """(rate, seconds left) when a report is due after `done` items, else None."""
        now = time.monotonic()
        if now - self.last < self.every and done < self.total:
            return None
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        return rate, (self.total - done) / max(rate, 1e-9)


def find_faces(
    paths: Sequence[Path],
    spec: DetectorSpec = DetectorSpec(),
    *,
    workers: int = 0,
    device: str | torch.device = "cpu",
    progress: Optional[Progress] = None,
    what: str = "images",
    folder: Optional[Path] = None,
) -> list[Optional[list[Face]]]:
    """Faces of each file (largest first; [] when none was found, None when it cannot be read),
    from the cache where it holds them, detected otherwise (and cached)."""
    paths = [Path(p) for p in paths]
    cache = FaceCache(spec, folder)
    try:
        found = cache.get_many(paths)
        todo = [i for i, f in enumerate(found) if f is None]
        if not todo:
            log.info("%s: faces of all %d images from the cache %s", what, len(paths), cache.path)
            return found
        log.info(
            "%s: detecting faces in %d of %d images (%d from the cache %s)",
            what,
            len(todo),
            len(paths),
            len(paths) - len(todo),
            cache.path,
        )
        device = torch.device(device)
        on_gpu = device.type == "cuda"
        loader = torch.utils.data.DataLoader(
            _DetectFiles([paths[i] for i in todo], spec, detect=not on_gpu, chunk=1 if on_gpu else DETECT_CHUNK),
            batch_size=None,
            num_workers=workers,
            collate_fn=None,
        )
        detector = build_detector(spec, device) if on_gpu else None
        pace = Pace(len(todo))
        pending: list[tuple[Path, list[Face]]] = []
        done = none_found = 0
        for j, result, error in _items(loader, detector):
            i = todo[j]
            done += 1
            if not error:
                found[i] = result
                none_found += not result
                pending.append((paths[i], result))
            if len(pending) >= 256:
                cache.put_many(pending)
                pending = []
            report = pace.due(done)
            if report is not None:
                log.info(
                    "%s: faces %d/%d (%.0f %%), %.0f images/s, %.0f s left, %d without a face so far",
                    what,
                    done,
                    len(todo),
                    100 * done / len(todo),
                    *report,
                    none_found,
                )
                if progress is not None:
                    progress(done, len(todo))
        cache.put_many(pending)
        return found
    finally:
        cache.close()


# (index into the files, their faces or the worker's result, an error message or "")
_Item = tuple[int, Any, str]


def _items(loader: Iterable[list[_Item]], detector: Optional[FaceDetector]) -> Iterator[_Item]:
    """(index, faces, error) per file: as the workers detected them, or detected here on the GPU
    in batches of same-size images."""
    items = (item for chunk in loader for item in chunk)
    if detector is None:
        yield from items
        return
    batch: list[tuple[int, Any, str]] = []

    def flush() -> Iterator[_Item]:
        ok = [(j, r) for j, r, e in batch if not e]
        faces = detector.detect([r[0] for _, r in ok]) if ok else []
        results = {j: [f.scaled(r[1]) for f in fs] for (j, r), fs in zip(ok, faces)}
        for j, _, e in batch:
            yield j, results.get(j), e

    for item in items:
        batch.append(item)
        if len(batch) >= 256:
            yield from flush()
            batch = []
    if batch:
        yield from flush()
