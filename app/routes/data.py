"""GET /data: what a job can train on, the ImageFolder roots and pairs files under the data root
(the web page offers them in its form). Symbolic links are not followed: a job could not use what
lies behind one that leaves the root, and the listing stays inside it."""

from __future__ import annotations

import os
import re
from pathlib import Path

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from app.deps import get_settings
from app.routes.jobs import UNAUTHORIZED
from app.settings import Settings
from faceid.images import IMAGE_EXTENSIONS

router = APIRouter(tags=["jobs"])

MAX_DEPTH = 3  # data/<a>/<b>/<c>: deep enough for sample/train or lfw/split/train
MAX_ENTRIES = 200  # of each kind
_PAIRS_HEADER = re.compile(r"^\d+\s+\d+\s*$")  # LFW pairs.txt: "<folds> <pairs per fold>"


class FolderOut(BaseModel):
    path: str = Field(description="relative to the data root, as POST /jobs takes it")
    people: int = Field(description="sub-folders holding at least one image")


class DataOut(BaseModel):
    folders: list[FolderOut] = Field(description="ImageFolder roots: 2+ sub-folders (people) with images")
    pairs_files: list[str] = Field(description="LFW-style pairs files (.txt)")


def _has_image(folder: str) -> bool:
    try:
        with os.scandir(folder) as it:
            return any(e.is_file(follow_symlinks=False) and e.name.lower().endswith(IMAGE_EXTENSIONS) for e in it)
    except OSError:
        return False


def _is_pairs_file(path: str) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            first = f.readline()
            second = f.readline()
    except OSError:
        return False
    return bool(_PAIRS_HEADER.match(first)) or len(first.rstrip("\n").split("\t")) in (3, 4) and bool(second)


def list_data(root: Path) -> DataOut:
    folders: list[FolderOut] = []
    pairs: list[str] = []
    root_s = str(root)
    for here, dirs, files in os.walk(root_s, followlinks=False):
        rel = os.path.relpath(here, root_s)
        depth = 0 if rel == "." else rel.count(os.sep) + 1
        dirs.sort()
        people = sum(1 for d in dirs if _has_image(os.path.join(here, d))) if depth else 0
        if people >= 2:
            if len(folders) < MAX_ENTRIES:
                folders.append(FolderOut(path=Path(rel).as_posix(), people=people))
            dirs[:] = []  # its sub-folders are people, not datasets
            continue
        if depth >= MAX_DEPTH:
            dirs[:] = []
        for name in sorted(files):
            if name.lower().endswith(".txt") and len(pairs) < MAX_ENTRIES and _is_pairs_file(os.path.join(here, name)):
                pairs.append((Path(rel) / name).as_posix() if depth else name)
    return DataOut(folders=folders, pairs_files=pairs)


@router.get(
    "/data", response_model=DataOut, summary="What a job can train on under the data root", responses=UNAUTHORIZED
)
def get_data(settings: Settings = Depends(get_settings)) -> DataOut:
    """The ImageFolder roots (two or more people with images) and LFW-style pairs files under
    FACEID_DATA_DIR, up to three folders deep, paths as `train`, `val` and `pairs_file` take them."""
    return list_data(settings.data_dir)
