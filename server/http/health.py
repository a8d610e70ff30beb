"""Probes and metrics: open to every caller (``/metrics`` needs a key with ``private_pages``)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from server.http.common import ready, server_state

router = APIRouter()


@router.get("/healthz")
def healthz():
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(request: Request):
    """The model is loaded and the server accepts work (503 otherwise); ``api_keys``: requests need a key."""
    state = ready(request)
    return {"status": "ready", "model": state.engine.base.name, "api_keys": not state.keyring.open}


@router.get("/metrics")
def metrics(request: Request):
    return Response(server_state(request).metrics.exposition(), media_type="text/plain; version=0.0.4")
