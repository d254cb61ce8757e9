"""Galleries: enrol people, then ask who a new photo shows (1:N identification).

Routes validate, call app.galleries.GalleryService, and map its errors to 4xx answers; the store
and the search are faceid.gallery_store and faceid.gallery_index.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Callable, Optional

from fastapi import APIRouter, Body, Depends, HTTPException, Path, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from app.batcher import Timing
from app.deps import get_models, get_settings
from app.galleries import GalleryService
from app.model_manager import ModelManager
from app.paths import FieldError
from app.routes.inference import (
    _DETECT,
    _IMAGE,
    IMAGE_ERRORS,
    _multipart,
    parse_detect,
    parse_threshold,
    resolve_threshold,
)
from app.routes.jobs import UNAUTHORIZED, error
from app.schemas import FaceOut, iso
from app.settings import Settings
from app.uploads import read_form
from faceid.gallery import (
    MAX_ENROLL_IMAGES,
    RULE,
    GalleryError,
    check_gallery_name,
    check_person_name,
    normalize_rows,
)
from faceid.gallery_store import NewFace

router = APIRouter(tags=["galleries"])

GALLERY = Path(description="the gallery's name: letters, digits, _ . -", max_length=64)
PERSON = Path(description="the person's name, unique in the gallery", max_length=128)
MAX_K = 100
MAX_IMPORT = 1000

NOT_FOUND = {
    404: error(
        "no such gallery, person or face", "no gallery 'staff'; GET /galleries lists them, POST /galleries creates one"
    )
}
REEMBEDDING = {
    409: error(
        "the gallery is being re-embedded for the served model",
        "gallery 'staff' is being re-embedded for model 3f2b...: 120 of 400 faces; "
        "retry when GET /galleries/staff shows status ready",
    )
}


# --- schemas ------------------------------------------------------------------------------------


class GalleryIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"name": "staff"}]})
    name: str = Field(description="1 to 64 letters, digits, _ . -", max_length=64)


class ReembeddingOut(BaseModel):
    model: str = Field(description="the served model the faces are being embedded with")
    done: int
    total: int = Field(description="faces that have a crop to embed again, or are done")
    failed: int = Field(description="faces in whose crop the new model finds no face (left out of searches)")
    percent: float
    running: bool


class GalleryOut(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    name: str
    created_at: Optional[str]
    status: str = Field(
        description="empty | ready | reembedding (the served model changed; identify answers 409 until done) | no_model"
    )
    model: Optional[str] = Field(description="the model whose embeddings the gallery searches")
    dim: Optional[int]
    people: int
    faces: int
    searchable_faces: int = Field(description="faces with an embedding by the gallery's model")
    faces_without_crop: int = Field(description="imported embeddings: they cannot be embedded again by another model")
    rule: str = Field(description="a person's score: best = the best score of their faces")
    reembedding: Optional[ReembeddingOut] = None


class GalleryList(BaseModel):
    galleries: list[GalleryOut]


class PersonSummary(BaseModel):
    name: str
    created_at: Optional[str]
    faces: int


class PeopleOut(BaseModel):
    gallery: str
    people: list[PersonSummary]


class FaceEntry(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    id: int
    created_at: Optional[str]
    source: Optional[str] = Field(description="the uploaded file's name, or imported")
    has_crop: bool
    face: Optional[dict[str, Any]] = Field(description="where the face was in the uploaded photo")
    models: list[str] = Field(description="models that have embedded this face")


class PersonOut(BaseModel):
    gallery: str
    name: str
    created_at: Optional[str]
    faces: list[FaceEntry]


class EnrolledFace(BaseModel):
    id: int
    source: Optional[str]
    face: Optional[FaceOut]


class EnrollOut(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    gallery: str
    person: str
    created: bool = Field(description="true: a new person; false: faces added to the person of that name")
    enrolled: list[EnrolledFace]
    faces: int = Field(description="the person's faces now")
    model: str


class Candidate(BaseModel):
    person: str
    score: float = Field(description="cosine similarity of the probe face and the person's best face")
    face_id: int = Field(description="that face")


class FaceResult(BaseModel):
    face: Optional[FaceOut] = Field(description="the face in the probe photo (null without detection)")
    person: Optional[str] = Field(
        description="the best candidate when its score reaches the threshold, else null: unknown"
    )
    score: Optional[float] = Field(description="the best candidate's score")
    candidates: list[Candidate]


class IdentifyOut(BaseModel):
    model_config = ConfigDict(
        protected_namespaces=(),
        json_schema_extra={
            "examples": [
                {
                    "gallery": "staff",
                    "model": "3f2b...",
                    "rule": "best",
                    "threshold": 0.52,
                    "threshold_name": "far_1e-3",
                    "person": "Ann_Lee",
                    "score": 0.71,
                    "candidates": [
                        {"person": "Ann_Lee", "score": 0.71, "face_id": 12},
                        {"person": "Bob_Ray", "score": 0.18, "face_id": 40},
                    ],
                    "faces": [{"face": None, "person": "Ann_Lee", "score": 0.71, "candidates": []}],
                }
            ]
        },
    )
    gallery: str
    model: str
    rule: str = Field(description="best: a person scores their best face's similarity")
    threshold: float
    threshold_name: str
    person: Optional[str] = Field(description="the decision for the largest face: a name, or null (unknown)")
    score: Optional[float]
    candidates: list[Candidate] = Field(description="the largest face's top-k people, best first")
    faces: list[FaceResult] = Field(description="every face identified, largest first")


class ImportFace(BaseModel):
    model_config = ConfigDict(extra="forbid")
    person: str = Field(max_length=128)
    embedding: list[float] = Field(min_length=1, max_length=8192)
    source: Optional[str] = Field(default=None, max_length=255)


class ImportIn(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model: str = Field(
        description="the id of the model that computed the embeddings (GET /model's id); it must be the served model",
        max_length=128,
    )
    faces: list[ImportFace] = Field(min_length=1, max_length=MAX_IMPORT)


class ImportOut(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    gallery: str
    model: str
    imported: int
    people_created: int


class DeletedOut(BaseModel):
    deleted: str
    faces: int


# --- helpers ------------------------------------------------------------------------------------


async def get_galleries(request: Request) -> GalleryService:
    service = getattr(request.app.state, "galleries", None)
    if service is None:
        raise HTTPException(503, "the service is starting; retry in a moment")
    return service


async def call(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` in a thread, its gallery errors as HTTP answers."""
    try:
        return await run_in_threadpool(fn, *args)
    except GalleryError as e:
        raise HTTPException(e.status, str(e)) from None


def gallery_out(d: dict[str, Any]) -> GalleryOut:
    return GalleryOut(**{**d, "created_at": iso(d["created_at"])})


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


# --- galleries ------------------------------------------------------------------------------------


@router.post(
    "/galleries",
    status_code=201,
    response_model=GalleryOut,
    summary="Create a gallery",
    responses={
        **UNAUTHORIZED,
        409: error("it exists", "gallery 'staff' exists already; ..."),
        422: error("a bad name", "gallery: 'a/b' is not a gallery name: ..."),
    },
)
async def create_gallery(
    body: Annotated[GalleryIn, Body()], galleries: GalleryService = Depends(get_galleries)
) -> GalleryOut:
    """JSON `{"name": "staff"}`. A gallery holds people, each with one or more faces."""
    check_gallery_name(body.name)
    await call(galleries.store.create_gallery, body.name)
    return gallery_out(await call(galleries.describe, body.name))


@router.get("/galleries", response_model=GalleryList, summary="List the galleries", responses=UNAUTHORIZED)
async def list_galleries(galleries: GalleryService = Depends(get_galleries)) -> GalleryList:
    names = await call(galleries.store.gallery_names)
    out = []
    for n in names:
        try:
            out.append(gallery_out(await call(galleries.describe, n)))
        except HTTPException:  # deleted meanwhile
            continue
    return GalleryList(galleries=out)


@router.get(
    "/galleries/{gallery}",
    response_model=GalleryOut,
    summary="A gallery: counts, model, status",
    responses={**UNAUTHORIZED, **NOT_FOUND},
)
async def get_gallery(
    gallery: Annotated[str, GALLERY], galleries: GalleryService = Depends(get_galleries)
) -> GalleryOut:
    """`status` is `reembedding` while the gallery's faces are embedded again for a newly served
    model; `reembedding` then shows the progress."""
    return gallery_out(await call(galleries.describe, gallery))


@router.delete(
    "/galleries/{gallery}",
    response_model=DeletedOut,
    summary="Delete a gallery and its people",
    responses={**UNAUTHORIZED, **NOT_FOUND},
)
async def delete_gallery(
    gallery: Annotated[str, GALLERY], galleries: GalleryService = Depends(get_galleries)
) -> DeletedOut:
    g = await call(galleries.delete_gallery, gallery)
    return DeletedOut(deleted=gallery, faces=g["faces"])


# --- people ---------------------------------------------------------------------------------------


@router.get(
    "/galleries/{gallery}/people",
    response_model=PeopleOut,
    summary="The people of a gallery",
    responses={**UNAUTHORIZED, **NOT_FOUND},
)
async def list_people(
    gallery: Annotated[str, GALLERY], galleries: GalleryService = Depends(get_galleries)
) -> PeopleOut:
    people = await call(galleries.store.people, gallery)
    return PeopleOut(
        gallery=gallery, people=[PersonSummary(**{**p, "created_at": iso(p["created_at"])}) for p in people]
    )


@router.get(
    "/galleries/{gallery}/people/{person}",
    response_model=PersonOut,
    summary="A person and their faces",
    responses={**UNAUTHORIZED, **NOT_FOUND},
)
async def get_person(
    gallery: Annotated[str, GALLERY], person: Annotated[str, PERSON], galleries: GalleryService = Depends(get_galleries)
) -> PersonOut:
    p = await call(galleries.store.person, gallery, person)
    return PersonOut(
        gallery=gallery,
        name=p["name"],
        created_at=iso(p["created_at"]),
        faces=[FaceEntry(**{**f, "created_at": iso(f["created_at"])}) for f in p["faces"]],
    )


@router.delete(
    "/galleries/{gallery}/people/{person}",
    response_model=DeletedOut,
    summary="Delete a person",
    responses={**UNAUTHORIZED, **NOT_FOUND},
)
async def delete_person(
    gallery: Annotated[str, GALLERY], person: Annotated[str, PERSON], galleries: GalleryService = Depends(get_galleries)
) -> DeletedOut:
    n = await call(galleries.delete_person, gallery, person)
    return DeletedOut(deleted=person, faces=n)


@router.delete(
    "/galleries/{gallery}/people/{person}/faces/{face_id}",
    response_model=DeletedOut,
    summary="Delete one face of a person",
    responses={**UNAUTHORIZED, **NOT_FOUND},
)
async def delete_face(
    gallery: Annotated[str, GALLERY],
    person: Annotated[str, PERSON],
    face_id: int,
    galleries: GalleryService = Depends(get_galleries),
) -> DeletedOut:
    """The person stays, with no faces if this was the last one."""
    await call(galleries.delete_face, gallery, person, face_id)
    return DeletedOut(deleted=str(face_id), faces=1)


@router.get(
    "/galleries/{gallery}/people/{person}/faces/{face_id}/crop",
    summary="The face crop a face was embedded from (PNG)",
    responses={**UNAUTHORIZED, **NOT_FOUND, 200: {"content": {"image/png": {}}}},
)
async def face_crop(
    gallery: Annotated[str, GALLERY],
    person: Annotated[str, PERSON],
    face_id: int,
    galleries: GalleryService = Depends(get_galleries),
) -> Response:
    crop = await call(galleries.store.crop, gallery, person, face_id)
    if crop is None:
        raise HTTPException(404, f"face {face_id} was imported as an embedding; it has no crop")
    return Response(crop, media_type="image/png")


@router.post(
    "/galleries/{gallery}/people/{person}/faces",
    status_code=201,
    response_model=EnrollOut,
    summary="Enroll 1 to 16 photos of a person",
    openapi_extra=_multipart(
        {
            "images": {
                "type": "array",
                "items": _IMAGE,
                "description": f"1 to {MAX_ENROLL_IMAGES} photos of the person, each in a field named images",
            },
            "detect": _DETECT,
        },
        ["images"],
    ),
    responses={**IMAGE_ERRORS, **NOT_FOUND},
)
async def enroll(
    request: Request,
    gallery: Annotated[str, GALLERY],
    person: Annotated[str, PERSON],
    settings: Settings = Depends(get_settings),
    models: ModelManager = Depends(get_models),
    galleries: GalleryService = Depends(get_galleries),
) -> EnrollOut:
    """multipart field `images`, sent once per photo. Each photo's largest face is enrolled; a
    photo without a usable face refuses the whole request with a 422 naming it (`images[2]`), and
    nothing is enrolled. A name that exists adds the faces to that person (names are unique in a
    gallery: give two people of the same name distinct names, such as `Ann_Lee_2`)."""
    check_person_name(person)
    served = models.require()
    await call(galleries.store.require, gallery)  # 404 before reading the upload
    parts = await read_form(
        request,
        files=set(),
        fields={"detect"},
        repeated={"images": MAX_ENROLL_IMAGES},
        required={"images"},
        max_file_bytes=settings.max_upload_bytes,
    )
    detect = parse_detect(parts)
    uploads = parts["images"]
    found = await asyncio.gather(
        *(
            galleries.decode(served, bytes(p.data), f"images[{i}]", detect, False, p.filename)
            for i, p in enumerate(uploads)
        )
    )
    inputs = [faces[0] for faces in found]
    vectors = normalize_rows(await models.embed(served, [f.prepared for f in inputs]))
    new = [
        NewFace(vector=v, source=(p.filename or f"images[{i}]")[:255], crop=f.crop, kind=f.kind, face=f.face)
        for i, (p, f, v) in enumerate(zip(uploads, inputs, vectors))
    ]
    created, ids = await call(galleries.enroll, gallery, person, served.id, new)
    total = len((await call(galleries.store.person, gallery, person))["faces"])
    return EnrollOut(
        gallery=gallery,
        person=person,
        created=created,
        faces=total,
        model=served.id,
        enrolled=[EnrolledFace(id=i, source=n.source, face=n.face) for i, n in zip(ids, new)],
    )


@router.post(
    "/galleries/{gallery}/embeddings",
    status_code=201,
    response_model=ImportOut,
    summary="Import precomputed embeddings (migrating a gallery)",
    responses={
        **UNAUTHORIZED,
        **NOT_FOUND,
        **REEMBEDDING,
        422: error(
            "another model, another size, or bad values",
            "model: these embeddings are from model 'abc'; the served model is '3f2b...'",
        ),
    },
)
async def import_embeddings(
    gallery: Annotated[str, GALLERY],
    body: Annotated[ImportIn, Body()],
    models: ModelManager = Depends(get_models),
    galleries: GalleryService = Depends(get_galleries),
) -> ImportOut:
    """JSON `{"model": "<GET /model's id>", "faces": [{"person": "Ann_Lee", "embedding": [...]}, ...]}`,
    up to 1000 faces a request. They must come from the served model (its id and embedding size):
    embeddings of two models are never compared. Imported faces have no crop, so a later model
    cannot embed them again: after a model switch they are left out of searches until imported
    again (`faces_without_crop` counts them)."""
    served = models.require()
    if body.model != served.id:
        raise FieldError(
            "model",
            f"these embeddings are from model {body.model[:80]!r}; the served model is "
            f"{served.id!r}: embeddings of two models are never compared. Export them again with "
            "the served model, or serve theirs (POST /models/{job_id}/activate)",
        )
    dim = int(served.verifier.info.get("embedding_size") or 0) or None
    for i, f in enumerate(body.faces):
        try:
            check_person_name(f.person)
        except Exception as e:
            raise FieldError(f"faces[{i}].person", str(e).split(": ", 1)[-1]) from None
    if len({len(f.embedding) for f in body.faces}) > 1:
        raise FieldError("faces", f"the embeddings have different lengths; all must have the model's {dim} values")
    vectors = normalize_rows([f.embedding for f in body.faces], dim, field="faces")
    bound, _ = await call(galleries.store.meta, gallery)
    if bound is not None and bound != served.id:
        raise HTTPException(
            409,
            f"gallery {gallery!r} is being re-embedded for the served model; import when "
            f"GET /galleries/{gallery} shows status ready",
        )
    by_person: dict[str, list[NewFace]] = {}
    for f, v in zip(body.faces, vectors):
        by_person.setdefault(f.person, []).append(NewFace(vector=v, source=f.source or "imported"))
    created = 0
    for person, faces in by_person.items():
        c, _ = await call(galleries.enroll, gallery, person, served.id, faces)
        created += int(c)
    return ImportOut(gallery=gallery, model=served.id, imported=len(body.faces), people_created=created)


# --- identify -----------------------------------------------------------------------------------------


@router.post(
    "/galleries/{gallery}/identify",
    response_model=IdentifyOut,
    summary="Who is this?",
    openapi_extra=_multipart(
        {
            "image": _IMAGE,
            "threshold": {
                "type": "string",
                "examples": ["far_1e-3", "acc", "0.4"],
                "description": "far_1e-3 (default) | far_1e-2 | acc, or a cosine value in "
                "[-1, 1]: under it the answer is unknown (null)",
            },
            "k": {
                "type": "integer",
                "minimum": 1,
                "maximum": MAX_K,
                "default": 5,
                "description": "how many people to list per face",
            },
            "faces": {
                "type": "string",
                "enum": ["all", "largest"],
                "default": "all",
                "description": "identify every face in the photo, or only the largest",
            },
            "detect": _DETECT,
        },
        ["image"],
    ),
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
    """multipart field `image`, optional `threshold`, `k`, `faces`, `detect`. For each face in the
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
        fields={"threshold", "k", "faces", "detect"},
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
    bound, _ = await call(galleries.store.meta, gallery)
    if bound is not None and bound != served.id:
        await reembedding(galleries, gallery)
    inputs = await galleries.decode(
        served, bytes(parts["image"].data), "image", detect, all_faces, parts["image"].filename
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
                face=f.face,
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
