"""The web console: a page at ``/`` that uses only the public HTTP API (sessions, documents with their live
loss curve, chat beside the base model). Static files of this package: no build step, nothing from a CDN."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"
PREFIX = "/console"

# No other site may frame the page (an open server trusts its loopback origin: a framed console would act for the
# site that framed it), and the page loads nothing but its own files.
HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data: blob:; frame-ancestors 'none'; "
    "base-uri 'none'; form-action 'self'",
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


def is_console_path(path: str) -> bool:
    """The page and its files: served without a key (they hold no data; the page asks for a key itself)."""
    return path == "/" or path.startswith(f"{PREFIX}/")


class WithHeaders:
    """ASGI wrapper: ``HEADERS`` on every response of the app it wraps."""

    def __init__(self, app):
        self.app = app
        self.raw = [(k.encode(), v.encode()) for k, v in HEADERS.items()]

    async def __call__(self, scope, receive, send):
        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.raw]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def mount_console(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    def console_page():
        return FileResponse(STATIC / "index.html", headers={"cache-control": "no-cache", **HEADERS})

    app.mount(PREFIX, WithHeaders(StaticFiles(directory=STATIC)), name="console")
