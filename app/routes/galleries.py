"""Galleries: enrol people, then ask who a new photo shows (1:N identification).

Routes validate, call app.galleries.GalleryService, and map its errors to 4xx answers; the store
and the search are faceid.gallery_store and faceid.gallery_index, the request and response schemas
app.gallery_schemas. Identification (POST /galleries/{gallery}/identify) is app/routes/identify.py.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Callable

from fastapi import APIRouter, Body, Depends, HTTPException, Request, Response
from starlette.concurrency import run_in_threadpool

from app.deps import get_models, get_settings
from app.galleries import GalleryService
from app.gallery_schemas import (
    ENROLL_FORM,
    GALLERY,
    NOT_FOUND,
    PERSON,
    REEMBEDDING,
    DeletedOut,
    EnrolledFace,
    EnrollOut,
    FaceEntry,
    GalleryIn,
    GalleryList,
    GalleryOut,
    ImportIn,
    ImportOut,
    PeopleOut,
    PersonOut,
    PersonSummary,
)
from app.model_manager import ModelManager
from app.model_schemas import FaceOut
from app.paths import FieldError
from app.routes.inference import IMAGE_ERRORS, parse_detect, parse_min_face
from app.routes.jobs import UNAUTHORIZED, error
from app.schemas import iso
from app.settings import Settings
from app.uploads import read_form
from faceid.gallery import MAX_ENROLL_IMAGES, GalleryError, check_gallery_name, check_person_name, normalize_rows
from faceid.gallery_store import NewFace

router = APIRouter(tags=["galleries"])


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
    openapi_extra=ENROLL_FORM,
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
        fields={"detect", "min_face"},
        repeated={"images": MAX_ENROLL_IMAGES},
        required={"images"},
        max_file_bytes=settings.max_upload_bytes,
    )
    detect = parse_detect(parts)
    min_face = parse_min_face(parts, served)
    uploads = parts["images"]
    found = await asyncio.gather(
        *(
            galleries.decode(served, bytes(p.data), f"images[{i}]", detect, False, p.filename, min_face)
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
        enrolled=[
            EnrolledFace(id=i, source=n.source, face=FaceOut.model_validate(n.face) if n.face else None)
            for i, n in zip(ids, new)
        ],
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
