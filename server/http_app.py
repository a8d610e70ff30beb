"""The HTTP front door (FastAPI). Health probes here; the OpenAI-compatible chat endpoint is issue 4."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import JSONResponse


def create_app(state) -> FastAPI:
    """``state``: the running ``server.main.ServerState`` (engine, registry, scheduler, settings)."""
    app = FastAPI(title="ttt", version="0.1.0")

    @app.get("/healthz")
    def healthz():
        """The process is alive."""
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz():
        """The model is loaded and the scheduler accepts work."""
        if state.engine is None or state.closing:
            return JSONResponse({"status": "loading" if state.engine is None else "shutting down"}, status_code=503)
        return {"status": "ready", "model": state.engine.base.name}

    return app
