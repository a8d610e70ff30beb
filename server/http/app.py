"""The HTTP door (FastAPI): one thin router per group of endpoints over typed models, the logic below them once.

Model work goes through the scheduler like gRPC's; every error, the doors' one table (``server.errors``), in
OpenAI's JSON error shape.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.console import mount_console
from server.errors import STATUSES
from server.guard import Guard
from server.http import chat, health, sessions, uploads
from server.http.common import CountRequests, error_response, refusal
from server.openai_protocol import UnsupportedParameter


def create_app(state) -> FastAPI:
    """``state``: the running ``server.main.ServerState`` (engine, registry, scheduler, settings, keyring, metrics)."""
    app = FastAPI(title="ttt", version="0.1.0", description="Test-time-training inference server")
    app.state.server = state
    for module in (health, chat, sessions, uploads):
        app.include_router(module.router)
    mount_console(app)
    app.openapi = lambda: openapi(app)
    add_error_handlers(app)
    s = state.settings
    app.add_middleware(
        Guard, keyring=state.keyring, max_body=s.max_request_bytes, private_pages=s.private_pages, refuse=refusal
    )
    app.add_middleware(CountRequests, metrics=state.metrics)  # the outermost: refusals are counted too
    return app


def openapi(app: FastAPI) -> dict:
    """FastAPI documents validation errors as 422; we answer them as 400 in OpenAI's error shape."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for path in schema["paths"].values():
            for op in path.values():
                if "422" in op.get("responses", {}):
                    op["responses"]["400"] = {"description": "Invalid request (OpenAI error shape)"}
                    del op["responses"]["422"]
        app.openapi_schema = schema
    return app.openapi_schema


def add_error_handlers(app: FastAPI) -> None:
    async def known_error(request: Request, e: Exception):
        return refusal(e)

    for types, _ in STATUSES:
        for t in types if isinstance(types, tuple) else (types,):
            app.add_exception_handler(t, known_error)

    @app.exception_handler(RequestValidationError)
    async def validation(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        if isinstance(cause := first.get("ctx", {}).get("error"), UnsupportedParameter):
            return refusal(cause)
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        message = f"{where}: {first.get('msg', 'invalid request')}".strip(": ")
        return error_response(400, "invalid_request_error", message, param=where or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_errors(request: Request, e: StarletteHTTPException):
        return error_response(e.status_code, "invalid_request_error", str(e.detail))
