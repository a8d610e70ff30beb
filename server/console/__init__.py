"""The web console: a page at ``/`` that uses only the public HTTP API (sessions, documents with their live
loss curve, chat beside the base model). Static files of this package: no build step, nothing from a CDN."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"
PREFIX = "/console"


def is_console_path(path: str) -> bool:
    """The page and its files: served without a key (they hold no data; the page asks for a key itself)."""
    return path == "/" or path.startswith(f"{PREFIX}/")


def mount_console(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    def console_page():
        return FileResponse(STATIC / "index.html", headers={"cache-control": "no-cache"})

    app.mount(PREFIX, StaticFiles(directory=STATIC), name="console")
