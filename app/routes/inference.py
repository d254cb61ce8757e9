"""POST /embed and POST /verify: multipart uploads, answered by the served model."""

from __future__ import annotations

import asyncio
import math
import re
from typing import Any, Optional, Union

from fastapi import APIRouter, Depends, Request, Response

from app.batcher import Timing
from app.deps import get_models, get_settings
from app.model_manager import NO_MODEL, ModelManager
from app.model_schemas import EmbedBatchOut, EmbedOut, FaceOut, VerifyOut
from app.paths import FieldError
from app.routes.jobs import UNAUTHORIZED, Responses, error
from app.settings import Settings
from app.uploads import read_form
from faceid.errors import ConfigError
from faceid.faces import DetectorSpec, least_min_face
from faceid.images import ACCEPTED_FORMATS

router = APIRouter(tags=["inference"])

THRESHOLD_NAMES = ("acc", "far_1e-2", "far_1e-3")

_IMAGE = {"type": "string", "format": "binary", "description": ACCEPTED_FORMATS}


def _multipart(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": {"type": "object", "properties": properties, "required": required}}
            },
        }
    }


IMAGE_ERRORS: Responses = {
    **UNAUTHORIZED,
    400: error(
        "a malformed multipart body", "the multipart body ended before its closing boundary; the upload was cut off"
    ),
    413: error(
        "a file over FACEID_MAX_UPLOAD_MB, or an image over FACEID_MAX_PIXELS",
        "image too large: image1 is 20000x20000 = 400,000,000 pixels, over the limit of 40,000,000",
    ),
    415: error(
        "not multipart/form-data",
        "send the image as multipart/form-data (field image), not "
        "application/json; for example curl -F image=@photo.jpg",
    ),
    422: error(
        "not a usable image, or a missing field", f"not an image: image1; accepted formats are {ACCEPTED_FORMATS}"
    ),
    503: error("no model yet", NO_MODEL),
}


def parse_threshold(raw: Optional[str]) -> Union[None, str, float]:
    """The `threshold` form field: empty -> None (the model's `acc` threshold), a cosine value in
    [-1, 1], or the name of an operating point the model carries (acc, far_1e-2, far_1e-3, and
    pairs_acc for a model trained with a pairs file; GET /model lists them)."""
    if raw is None or not raw.strip():
        return None
    value = raw.strip()
    if re.fullmatch(r"[a-z][a-z0-9_.-]{0,31}", value) and value not in ("nan", "inf", "infinity"):
        return value
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or not -1.0 <= number <= 1.0:
        raise FieldError(
            "threshold",
            f"{value[:40]!r} is neither a cosine value in [-1, 1] nor the name of "
            f"one of the model's thresholds ({', '.join(THRESHOLD_NAMES)}, and pairs_acc for a "
            "model trained with a pairs file; GET /model lists them)",
        )
    return number


_DETECT = {
    "type": "string",
    "enum": ["true", "false"],
    "default": "true",
    "description": "false: the image is already an aligned face crop; skip detection (models "
    "trained with alignment only)",
}


def parse_detect(parts: dict[str, Any]) -> bool:
    """The `detect` form field: true (default) or false."""
    raw = parts.get("detect")
    if raw is None:
        return True
    value = raw.data.decode("utf-8", errors="replace").strip().lower()
    if value in ("", "true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise FieldError(
        "detect",
        f"{value[:40]!r} is not true or false; send detect=false to skip face "
        "detection for an image that is already an aligned face crop",
    )


MIN_FACE = {
    "type": "number",
    "minimum": 2,
    "maximum": 100,
    "description": "find faces down to this percent of the photo's longer side (default: the model's "
    "own, about 8): smaller finds a small face in a large photo, or the faces of a group photo, at "
    "more cost; larger looks only for large faces (selfies, ID photos, webcam frames), at less "
    "cost. For a model trained on aligned faces; 2 is the least with the default detector",
}


def parse_min_face(parts: dict[str, Any], served: Any) -> Optional[float]:
    """The `min_face` form field: a percent of the photo's longer side, from the least the served
    model's detector reaches (faceid.faces.least_min_face) to 100; empty: the model's own."""
    raw = parts.get("min_face")
    value = raw.data.decode("utf-8", errors="replace").strip() if raw is not None else ""
    if not value:
        return None
    prep = getattr(served.verifier, "preparation", None)
    least = least_min_face(prep.detector if prep is not None and prep.aligned else DetectorSpec())
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not least <= number <= 100:
        raise FieldError(
            "min_face",
            f"{value[:20]!r} is not a number from {least:g} to 100 (the smallest face to find, in "
            "percent of the photo's longer side)",
        )
    return number


def face_of(image: Any) -> Optional[FaceOut]:
    """The detected face a prepared upload was made from (None without detection)."""
    face_json = getattr(image, "face_json", None)
    found = face_json() if face_json is not None else None
    return FaceOut.model_validate(found) if found is not None else None


def resolve_threshold(served: Any, threshold: Union[None, str, float]) -> None:
    """Check the threshold against the model before any work: a name it lacks is a 422."""
    try:
        served.verifier.resolve_threshold(threshold)
    except ConfigError:
        names = sorted((served.verifier.info.get("thresholds") or {}).keys())
        raise FieldError(
            "threshold",
            f"{str(threshold)[:40]!r} is neither a cosine value in [-1, 1] nor "
            f"an operating point of this model ({', '.join(names)})",
        ) from None


@router.post(
    "/embed",
    response_model=EmbedOut,
    summary="Embed one face image",
    openapi_extra=_multipart({"image": _IMAGE, "detect": _DETECT, "min_face": MIN_FACE}, ["image"]),
    responses=IMAGE_ERRORS,
)
async def embed(
    request: Request,
    response: Response,
    settings: Settings = Depends(get_settings),
    models: ModelManager = Depends(get_models),
) -> EmbedOut:
    """multipart field `image`, optional `detect`, `min_face`. Returns its unit-norm embedding from the served
    model and, for a model trained on aligned faces, the face it found and embedded (the largest;
    a 422 naming the field when there is none). The `Server-Timing` header says where the
    request's time went (milliseconds)."""
    timing = Timing()
    served = models.require()  # 503 before reading an upload we could not use
    parts = await read_form(
        request,
        files={"image"},
        fields={"detect", "min_face"},
        required={"image"},
        max_file_bytes=settings.max_upload_bytes,
    )
    t = timing.since("read", timing.start)
    detect = parse_detect(parts)
    min_face = parse_min_face(parts, served)
    image = await models.decode(bytes(parts["image"].data), "image", served, detect, min_face)
    timing.since("decode", t)
    vectors = await models.embed(served, [image], timing)
    vector = vectors[0].tolist()  # Python floats, as float(x) for each
    response.headers["Server-Timing"] = timing.header()
    return EmbedOut(embedding=vector, dim=len(vector), model=served.id, face=face_of(image))


@router.post(
    "/embed/batch",
    response_model=EmbedBatchOut,
    summary="Embed several face images in one request",
    openapi_extra=_multipart(
        {
            "images": {
                "type": "array",
                "items": _IMAGE,
                "description": "1 to FACEID_BATCH_MAX_SIZE (16) files, each in a field named images",
            },
            "detect": _DETECT,
            "min_face": MIN_FACE,
        },
        ["images"],
    ),
    responses=IMAGE_ERRORS,
)
async def embed_batch(
    request: Request,
    response: Response,
    settings: Settings = Depends(get_settings),
    models: ModelManager = Depends(get_models),
) -> EmbedBatchOut:
    """multipart field `images`, sent once per image (`curl -F images=@a.jpg -F images=@b.jpg`),
    at most FACEID_BATCH_MAX_SIZE of them. Returns their embeddings in the order sent, from one
    forward pass (shared with other requests when there is room). One HTTP request for many
    images spends the service's per-request work once: for galleries, and for clients that
    want more images/s than one image per request allows. A file that is not a usable image
    fails the request, naming it (`images[2]`)."""
    timing = Timing()
    served = models.require()
    parts = await read_form(
        request,
        files=set(),
        fields={"detect", "min_face"},
        repeated={"images": settings.batch_max_size},
        required={"images"},
        max_file_bytes=settings.max_upload_bytes,
    )
    t = timing.since("read", timing.start)
    detect = parse_detect(parts)
    min_face = parse_min_face(parts, served)
    images = await asyncio.gather(
        *(models.decode(bytes(p.data), f"images[{i}]", served, detect, min_face) for i, p in enumerate(parts["images"]))
    )
    timing.since("decode", t)
    vectors = await models.embed(served, images, timing)
    response.headers["Server-Timing"] = timing.header()
    return EmbedBatchOut(
        embeddings=vectors.tolist(),
        count=len(images),
        dim=int(vectors.shape[1]),
        model=served.id,
        faces=[face_of(im) for im in images],
    )


@router.post(
    "/verify",
    response_model=VerifyOut,
    summary="Are two face images the same person?",
    openapi_extra=_multipart(
        {
            "image1": _IMAGE,
            "image2": _IMAGE,
            "threshold": {
                "type": "string",
                "examples": ["acc", "far_1e-3", "0.35"],
                "description": "a cosine value in [-1, 1] or acc | far_1e-2 | far_1e-3 "
                "(default acc: the model's best-accuracy threshold); "
                "GET /model lists the model's named thresholds",
            },
            "detect": _DETECT,
            "min_face": MIN_FACE,
        },
        ["image1", "image2"],
    ),
    responses=IMAGE_ERRORS,
)
async def verify(
    request: Request,
    response: Response,
    settings: Settings = Depends(get_settings),
    models: ModelManager = Depends(get_models),
) -> VerifyOut:
    """multipart fields `image1`, `image2`, optional `threshold`, `detect` and `min_face`. `match` is
    `similarity >= threshold`, the cosine similarity of the two embeddings; `face1` and `face2`
    are the faces compared (an image without a face is a 422 naming it). The `Server-Timing`
    header says where the request's time went (milliseconds)."""
    timing = Timing()
    served = models.require()
    parts = await read_form(
        request,
        files={"image1", "image2"},
        fields={"threshold", "detect", "min_face"},
        required={"image1", "image2"},
        max_file_bytes=settings.max_upload_bytes,
    )
    t = timing.since("read", timing.start)
    raw = parts.get("threshold")
    threshold = parse_threshold(raw.data.decode("utf-8", errors="replace") if raw else None)
    resolve_threshold(served, threshold)
    detect = parse_detect(parts)
    min_face = parse_min_face(parts, served)
    img1, img2 = await asyncio.gather(
        models.decode(bytes(parts["image1"].data), "image1", served, detect, min_face),
        models.decode(bytes(parts["image2"].data), "image2", served, detect, min_face),
    )
    timing.since("decode", t)
    vectors = await models.embed(served, [img1, img2], timing)
    result = served.verifier.compare(vectors[0], vectors[1], threshold)
    response.headers["Server-Timing"] = timing.header()
    return VerifyOut(
        similarity=result["similarity"],
        threshold=result["threshold"],
        threshold_name=result["threshold_name"],
        match=bool(result["match"]),
        model=served.id,
        face1=face_of(img1),
        face2=face_of(img2),
    )
