"""Galleries for 1:N identification: who, among the people enrolled, is this face?

No HTTP and no torch at import. Three modules:

- this one: the rules every part shares (gallery and person names, the errors and their HTTP
  statuses, the id of a checkpoint's model, unit-norm embedding rows), and the helpers that turn a
  photo into the face crops a gallery keeps (`prepare_faces`) and a stored crop back into what a
  model embeds (`crop_input`), the same for the server and the `faceid gallery` command;
- `faceid.gallery_store`: `GalleryStore`, the SQLite file of galleries, people, faces, crops and
  each model's embeddings;
- `faceid.gallery_index`: `GalleryIndex`, the in-memory matrix of one gallery and its search.
"""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

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


def prepare_faces(
    verifier: Any,
    img: Any,
    detect: bool = True,
    all_faces: bool = False,
    detector: Any = None,
    found: Optional[Sequence[Any]] = None,
) -> list[FaceInput]:
    """The faces of a decoded photo (PIL RGB, or a faceid.faces.Photo from `Verifier.read`) as
    `verifier` embeds them, largest first: every
    face (`all_faces`) or only the largest. A model trained on aligned faces detects them (raises
    faceid.faces.NoFaceError when there is none), with `detector` where given (a finer search,
    `Verifier.detector_for`), else its own, unless `found` holds them already (`detector`'s faces of
    the photo, in its full-size pixels: `Photo.faces_of`); with `detect` False, or for a model
    without alignment, the photo is the one face. A verifier without `prepare_face` (a test double)
    embeds the image as it is."""
    from PIL import Image

    from faceid.faces import Photo

    own = getattr(verifier, "detector", None)
    if own is not None and detect:
        import torch

        from faceid.faces import NoFaceError, aligned_crop
        from faceid.inference import Prepared

        photo = img if isinstance(img, Photo) else Photo(img)
        detector = detector or own
        faces = sorted(photo.faces(detector) if found is None else found, key=lambda f: f.area, reverse=True)
        if not faces:
            no_face = getattr(verifier, "no_face", None)  # the message, with the detector's limits
            raise no_face(photo, detector.spec) if no_face else NoFaceError("no face found in the image")
        chosen = faces if all_faces else faces[:1]
        out = []
        side = max(CROP_SIZE, int(verifier.img_size))
        reduced = getattr(getattr(verifier, "preparation", None), "reduced_decode", False)
        for f in chosen:
            tensor = torch.from_numpy(aligned_crop(photo, f, verifier.img_size, verifier.crop, reduced))
            crop = aligned_crop(photo, f, side, 1.0, reduced)
            prepared = Prepared(tensor, f, len(faces))
            out.append(
                FaceInput(prepared, _png(Image.fromarray(crop.transpose(1, 2, 0))), "aligned", prepared.face_json())
            )
        return out
    if isinstance(img, Photo):
        img = img.at(1)
    thumb = img.copy()
    thumb.thumbnail((IMAGE_THUMB_SIDE, IMAGE_THUMB_SIDE))
    prepare_face = getattr(verifier, "prepare_face", None)
    if prepare_face is not None:
        prepared = prepare_face(img, detect)
        kind = "aligned" if getattr(verifier, "detector", None) is not None else "image"
        if kind == "aligned":  # detect=false on an aligned model: the upload is a face crop already
            side = max(CROP_SIZE, int(verifier.img_size))
            thumb = img.convert("RGB").resize((side, side), Image.Resampling.BILINEAR)
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
