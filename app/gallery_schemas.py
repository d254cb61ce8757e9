"""The request and response schemas of the gallery routes (app/routes/galleries.py): the path
parameters, the multipart forms, the documented errors, and the JSON models."""

from __future__ import annotations

from typing import Any, Optional

from fastapi import Path
from pydantic import BaseModel, ConfigDict, Field

from app.model_schemas import FaceOut
from app.routes.inference import _DETECT, _IMAGE, MIN_FACE, _multipart
from app.routes.jobs import Responses, error
from faceid.gallery import MAX_ENROLL_IMAGES

MAX_IMPORT = 1000  # faces in one POST /galleries/{gallery}/embeddings
GALLERY = Path(description="the gallery's name: letters, digits, _ . -", max_length=64)
PERSON = Path(description="the person's name, unique in the gallery", max_length=128)
MAX_K = 100

NOT_FOUND: Responses = {
    404: error(
        "no such gallery, person or face", "no gallery 'staff'; GET /galleries lists them, POST /galleries creates one"
    )
}
REEMBEDDING: Responses = {
    409: error(
        "the gallery is being re-embedded for the served model",
        "gallery 'staff' is being re-embedded for model 3f2b...: 120 of 400 faces; "
        "retry when GET /galleries/staff shows status ready",
    )
}

ENROLL_FORM = _multipart(
    {
        "images": {
            "type": "array",
            "items": _IMAGE,
            "description": f"1 to {MAX_ENROLL_IMAGES} photos of the person, each in a field named images",
        },
        "detect": _DETECT,
        "min_face": MIN_FACE,
    },
    ["images"],
)
IDENTIFY_FORM = _multipart(
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
        "min_face": MIN_FACE,
    },
    ["image"],
)


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
