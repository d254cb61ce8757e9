"""The web page: GET / and its static files under /ui/ (shipped in the package; nothing is fetched
from elsewhere). The page itself holds no data: it asks the API, with the key the user gives it."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parents[1] / "static"

router = APIRouter(tags=["page"])


@router.get("/", include_in_schema=False)
def index() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})


def mount(app) -> None:
    """Serve app/static at /ui (the page's script, plots and style)."""
    app.mount("/ui", StaticFiles(directory=STATIC), name="ui")
