"""The sessions REST API: create (or import a peft adapter), list, get, delete, save, reset, download the adapter;
and the settings schema a session is created from. Documents are in ``server.http.uploads``."""

from __future__ import annotations

import asyncio
import io
import json
import zipfile
from asyncio import wrap_future

from fastapi import APIRouter, Request
from fastapi.responses import Response

from server.http.common import caller, finite, ready, user_of
from server.http.models import SessionCreate, SessionInfo, SessionList, SettingsSchema, settings_document
from ttt.engine import check_session_id

router = APIRouter()


def zip_folder(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:  # float weights barely compress: not worth the time
        for name, data in files.items():
            z.writestr(name, data)
    return out.getvalue()


@router.post("/v1/sessions", status_code=201, response_model=SessionInfo)
async def create_session(body: SessionCreate, request: Request):
    state, user = ready(request), user_of(request)
    sid = check_session_id(body.id) if body.id is not None else None
    adapter = None
    if body.adapter is not None:
        adapter = {
            "adapter_config.json": json.dumps(body.adapter.adapter_config).encode(),
            "adapter_model.safetensors": body.adapter.adapter_model,
        }
    settings = body.settings.model_dump(exclude_unset=True)
    return finite(await wrap_future(state.sessions.create(user, sid, settings, adapter)))


@router.get("/v1/sessions", response_model=SessionList)
def list_sessions(request: Request):
    state, user = ready(request), user_of(request)
    return {"object": "list", "data": finite(state.sessions.list(user))}


@router.get("/v1/sessions/{session_id}", response_model=SessionInfo)
def get_session(session_id: str, request: Request):
    state, user, sid = caller(request, session_id)
    return finite(state.sessions.info(user, sid))


@router.delete("/v1/sessions/{session_id}")
async def delete_session(session_id: str, request: Request):
    state, user, sid = caller(request, session_id)
    await wrap_future(state.sessions.delete(user, sid))
    return {"id": sid, "deleted": True}


@router.post("/v1/sessions/{session_id}/save", response_model=SessionInfo)
async def save_session(session_id: str, request: Request):
    state, user, sid = caller(request, session_id)
    return finite(await wrap_future(state.sessions.save(user, sid)))


@router.post("/v1/sessions/{session_id}/reset", response_model=SessionInfo)
async def reset_session(session_id: str, request: Request):
    state, user, sid = caller(request, session_id)
    return finite(await wrap_future(state.sessions.reset(user, sid)))


@router.get(
    "/v1/sessions/{session_id}/adapter",
    response_class=Response,
    responses={200: {"content": {"application/zip": {}}, "description": "a peft LoRA adapter folder"}},
)
async def download_adapter(session_id: str, request: Request):
    """The session's fast weights as a zip of a peft adapter folder (``PeftModel.from_pretrained`` loads it
    unzipped; ``POST /v1/sessions`` with ``adapter`` imports it). LoRA sessions only."""
    state, user, sid = caller(request, session_id)
    files = await wrap_future(state.sessions.adapter_files(user, sid))
    return Response(
        await asyncio.to_thread(zip_folder, files),  # megabytes: off the event loop
        media_type="application/zip",
        headers={"content-disposition": f'attachment; filename="{sid}-adapter.zip"'},
    )


@router.get("/v1/settings", response_model=SettingsSchema)
def settings_schema(request: Request):
    """Every session setting (type, default, documentation, bounds) and the memory presets: what a form
    that creates sessions is built from."""
    state = ready(request)
    user_of(request)  # a key is needed: the schema names the server's defaults
    return settings_document(state.registry.defaults)
