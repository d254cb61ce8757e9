"""POST /galleries/{gallery}/identify: who does a photo show, among a gallery's people?

The gallery routes and their helpers are app/routes/galleries.py, the schemas app.gallery_schemas.
"""

from __future__ import annotations

from typing import Annotated, Any, Optional

from fastapi import APIRouter, Depends, HTTPException, Request, Response

from app.batcher import Timing
from app.deps import get_models, get_settings
from app.galleries import GalleryService
from app.gallery_schemas import (
    GALLERY,
    IDENTIFY_FORM,
    MAX_K,
    NOT_FOUND,
    REEMBEDDING,
    Candidate,
    FaceResult,
    IdentifyOut,
)
from app.model_manager import ModelManager
from app.model_schemas import FaceOut
from app.paths import FieldError
from app.routes.galleries import call, get_galleries
from app.routes.inference import IMAGE_ERRORS, parse_detect, parse_min_face, parse_threshold, resolve_threshold
from app.settings import Settings
from app.uploads import read_form
from faceid.gallery import RULE, normalize_rows

router = APIRouter(tags=["galleries"])


def _form_text(parts: dict[str, Any], name: str) -> Optional[str]:
    raw = parts.get(name)
    return raw.data.decode("utf-8", errors="replace").strip() if raw is not None else None


def parse_k(raw: Optional[str]) -> int:
    if raw is None or raw == "":
        return 5
    try:
        k = int(raw)
    except ValueError:
        k = 0
    if not 1 <= k <= MAX_K:
        raise FieldError("k", f"{raw[:20]!r} is not a whole number from 1 to {MAX_K} (how many people to list)")
    return k


def parse_faces(raw: Optional[str]) -> bool:
    if raw is None or raw in ("", "all"):
        return True
    if raw == "largest":
        return False
    raise FieldError("faces", f"{raw[:20]!r}: use all (every face in the photo) or largest")


async def reembedding(galleries: GalleryService, gallery: str) -> None:
    """The 409 of a gallery that does not hold the served model's embeddings yet."""
    galleries.wake()
    g = await call(galleries.describe, gallery)
    p = g["reembedding"] or {}
    raise HTTPException(
        409,
        f"gallery {gallery!r} is being re-embedded for the served model {p.get('model')}: "
        f"{p.get('done', 0)} of {p.get('total', 0)} faces; retry when "
        f"GET /galleries/{gallery} shows status ready",
        headers={"Retry-After": "5"},
    )


@router.post(
    "/galleries/{gallery}/identify",
    response_model=IdentifyOut,
    summary="Who is this?",
    openapi_extra=IDENTIFY_FORM,
    responses={**IMAGE_ERRORS, **NOT_FOUND, **REEMBEDDING},
)
async def identify(
    request: Request,
    response: Response,
    gallery: Annotated[str, GALLERY],
    settings: Settings = Depends(get_settings),
    models: ModelManager = Depends(get_models),
    galleries: GalleryService = Depends(get_galleries),
) -> IdentifyOut:
    """multipart field `image`, optional `threshold`, `k`, `faces`, `detect`, `min_face`. For each face in the
    photo (largest first): the `k` most similar people, one entry per person scored by their best
    face, and the decision: the best person if their score reaches the threshold, else null
    (unknown). The threshold defaults to the served model's calibrated far_1e-3 (its false-accept
    rate of 1 in 1000 on different-person pairs)."""
    timing = Timing()
    served = models.require()
    await call(galleries.store.require, gallery)
    parts = await read_form(
        request,
        files={"image"},
        fields={"threshold", "k", "faces", "detect", "min_face"},
        required={"image"},
        max_file_bytes=settings.max_upload_bytes,
    )
    t = timing.since("read", timing.start)
    threshold = parse_threshold(_form_text(parts, "threshold"))
    if threshold is None:
        names = served.verifier.info.get("thresholds") or {}
        threshold = "far_1e-3" if "far_1e-3" in names else "acc"
    resolve_threshold(served, threshold)
    th_value, th_name = served.verifier.resolve_threshold(threshold)
    k = parse_k(_form_text(parts, "k"))
    all_faces = parse_faces(_form_text(parts, "faces"))
    detect = parse_detect(parts)
    min_face = parse_min_face(parts, served)
    bound, _ = await call(galleries.store.meta, gallery)
    if bound is not None and bound != served.id:
        await reembedding(galleries, gallery)
    inputs = await galleries.decode(
        served,
        bytes(parts["image"].data),
        "image",
        detect,
        all_faces,
        parts["image"].filename,
        min_face=min_face,
    )
    timing.since("decode", t)
    vectors = normalize_rows(await models.embed(served, [f.prepared for f in inputs], timing))
    t = timing.since("embed", t)
    found = await call(galleries.search, gallery, served.id, vectors, k)
    if found is None:
        await reembedding(galleries, gallery)
    timing.since("search", t)
    results = []
    for f, cands in zip(inputs, found):
        best = cands[0] if cands else None
        results.append(
            FaceResult(
                face=FaceOut.model_validate(f.face) if f.face else None,
                person=best.person if best is not None and best.score >= th_value else None,
                score=best.score if best is not None else None,
                candidates=[Candidate(person=c.person, score=c.score, face_id=c.face_id) for c in cands],
            )
        )
    response.headers["Server-Timing"] = timing.header()
    first = results[0]
    return IdentifyOut(
        gallery=gallery,
        model=served.id,
        rule=RULE,
        threshold=th_value,
        threshold_name=th_name,
        person=first.person,
        score=first.score,
        candidates=first.candidates,
        faces=results,
    )
