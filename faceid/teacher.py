"""A teacher for distillation: dlib's face recognition network, an optional extra.

dlib's ResNet (Davis King's `dlib_face_recognition_resnet_model_v1`, public domain, shipped with its
5-point landmark model in the `face-recognition-models` package; the network runs in `dlib-bin`)
maps a face to 128 numbers. It was trained on about three million faces, far more than a FaceID
user has, and separates LFW's fold-1 pairs at AUC 0.998. With `distill dlib` a run computes these
descriptors once for every training image and trains its own network to reproduce them
(faceid.objectives) beside its ArcFace loss. The served model never needs dlib.

`pip install 'faceid[teacher]'` installs both packages. Descriptors are cached like faces
(faceid.facecache): a SQLite file per detector setting in the cache folder, keyed by the file's
content.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from faceid.database import use_wal
from faceid.errors import DataError
from faceid.facecache import CACHE_FORMAT, Pace, cache_dir, find_faces
from faceid.faces import DetectorSpec, Face, pick_face
from faceid.images import open_image
from faceid.teacher_files import check_teacher, models_dir

log = logging.getLogger(__name__)

TEACHER_DIM = 128
CHIP_SIZE, CHIP_PADDING = 150, 0.25  # the face chips dlib's network was trained on


class DlibTeacher:
    """RGB image (+ the face FaceID's detector found) -> dlib's 128-number descriptor, unit length."""

    def __init__(self) -> None:
        import dlib  # type: ignore[import-untyped]

        folder = models_dir()
        self._dlib = dlib
        self.shapes = dlib.shape_predictor(str(folder / "shape_predictor_5_face_landmarks.dat"))
        self.net = dlib.face_recognition_model_v1(str(folder / "dlib_face_recognition_resnet_model_v1.dat"))

    def chip(self, rgb: np.ndarray, face: Optional[Face]) -> np.ndarray:
        """dlib's own 150 px chip: its 5-point model placed in the detector's box (the middle
        60% of the image when no face was found)."""
        h, w = rgb.shape[:2]
        if face is None:
            x1, y1, x2, y2 = 0.2 * w, 0.2 * h, 0.8 * w, 0.8 * h
        else:
            x1, y1, x2, y2 = face.box
        rect = self._dlib.rectangle(int(round(x1)), int(round(y1)), int(round(x2)), int(round(y2)))
        return self._dlib.get_face_chip(rgb, self.shapes(rgb, rect), CHIP_SIZE, CHIP_PADDING)

    def describe(self, chips: Sequence[np.ndarray]) -> np.ndarray:
        """[N] chips -> float32 [N, 128], each row of unit length."""
        out = np.asarray(self.net.compute_face_descriptor(list(chips)), dtype=np.float32).reshape(-1, TEACHER_DIM)
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


_TEACHER: Optional[DlibTeacher] = None


def _teacher() -> DlibTeacher:
    global _TEACHER
    if _TEACHER is None:
        _TEACHER = DlibTeacher()
    return _TEACHER


class _DescribeFiles(torch.utils.data.Dataset):
    """Item i: (i, descriptor [128] or None, error)."""

    def __init__(self, paths: Sequence[Path], faces: Sequence[Optional[Face]]) -> None:
        self.paths, self.faces = list(paths), list(faces)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            rgb = np.asarray(open_image(self.paths[i]).convert("RGB"))
        except Exception as e:  # unreadable: the caller's image check reports it
            return i, None, f"{type(e).__name__}: {e}"
        t = _teacher()
        return i, t.describe([t.chip(rgb, self.faces[i])])[0], ""


def file_digest(path: Path) -> Optional[str]:
    """The file's content hash (None when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            return hashlib.blake2b(f.read(), digest_size=20).hexdigest()
    except OSError:
        return None


class TeacherCache:
    """file content -> descriptor (one SQLite file per teacher and detector setting). Keyed by the
    content's hash: a copy or a link of a photo (a job's data folder holds hard links or copies)
    is not described again, and a changed photo is."""

    def __init__(self, name: str, spec: DetectorSpec, folder: Optional[Path] = None) -> None:
        folder = folder or cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        # the faces' format (faceid.facecache.CACHE_FORMAT): descriptors of chips cut where it put them
        self.path = folder / f"teacher-{CACHE_FORMAT}-{name}-{spec.key}.sqlite"
        self.db = sqlite3.connect(self.path, timeout=60)
        use_wal(self.db, 60)
        self.db.execute("CREATE TABLE IF NOT EXISTS descriptors (digest TEXT PRIMARY KEY, v BLOB)")

    def get_vectors(self, digests: Sequence[Optional[str]]) -> list[Optional[np.ndarray]]:
        out: list[Optional[np.ndarray]] = []
        cur = self.db.cursor()
        for d in digests:
            row = cur.execute("SELECT v FROM descriptors WHERE digest = ?", (d,)).fetchone() if d else None
            blob = row[0] if row is not None else b""
            ok = len(blob) == 4 * TEACHER_DIM
            out.append(np.frombuffer(blob, dtype=np.float32).copy() if ok else None)
        return out

    def put_vectors(self, items: Sequence[tuple[Optional[str], np.ndarray]]) -> None:
        rows = [(d, np.asarray(v, np.float32).tobytes()) for d, v in items if d]
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO descriptors VALUES (?, ?)", rows)

    def close(self) -> None:
        self.db.close()


def teacher_vectors(
    paths: Sequence[Path],
    name: str = "dlib",
    spec: DetectorSpec = DetectorSpec(),
    *,
    workers: int = 0,
    progress: Optional[Callable[[int, int], None]] = None,
    what: str = "images",
    folder: Optional[Path] = None,
) -> np.ndarray:
    """float32 [N, 128]: the teacher's descriptor of each file, from the cache where it holds
    them, computed otherwise (in `workers` processes) and cached. The face each is taken from is
    the largest the detector `spec` finds (faceid.facecache, cached too). Raises ConfigError when
    the teacher is not installed, DataError when a file cannot be read."""
    check_teacher(name)
    paths = [Path(p) for p in paths]
    cache = TeacherCache(name, spec, folder)
    try:
        digests = [file_digest(p) for p in paths]
        found = cache.get_vectors(digests)
        todo = [i for i, v in enumerate(found) if v is None]
        if todo:
            faces = find_faces([paths[i] for i in todo], spec, workers=workers, what=what, folder=folder)
            picked = [pick_face(f or []) for f in faces]
            log.info(
                "%s: computing %s descriptors of %d of %d images (the rest cached)", what, name, len(todo), len(paths)
            )
            loader = torch.utils.data.DataLoader(
                _DescribeFiles([paths[i] for i in todo], picked), batch_size=None, num_workers=workers
            )
            pace = Pace(len(todo))
            pending: list[tuple[Optional[str], np.ndarray]] = []
            for done, (j, vec, error) in enumerate(loader, start=1):
                if error:
                    raise DataError(f"{paths[todo[j]]}: cannot compute its teacher descriptor ({error})")
                found[todo[j]] = vec
                pending.append((digests[todo[j]], vec))
                if len(pending) >= 256:
                    cache.put_vectors(pending)
                    pending = []
                report = pace.due(done)
                if report is not None:
                    log.info(
                        "%s: %s descriptors %d/%d, %.1f images/s, %.0f s left", what, name, done, len(todo), *report
                    )
                    if progress is not None:
                        progress(done, len(todo))
            cache.put_vectors(pending)
        if not found:
            return np.zeros((0, TEACHER_DIM), np.float32)
        return np.stack([np.asarray(v, np.float32) for v in found])
    finally:
        cache.close()
