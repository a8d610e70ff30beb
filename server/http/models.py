"""The HTTP door's request and response bodies (OpenAI's own are in ``server.openai_protocol``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Base64Bytes, BaseModel, ConfigDict, Field, create_model

from ttt.config import DEFAULT_MEMORY, PRESETS, SCHEMA, SECTIONS, SessionConfig, describe, merge

# ---- request bodies ----

# Session settings, typed so that a wrong type or an absurd size is a 400 here, not a failure deep in the engine.
# Derived from the one schema, ttt.config.SCHEMA (types, documentation, caps; gRPC applies the same caps); the
# dataclasses check the values further.


def _settings_model(section: str) -> type[BaseModel]:
    fields = {}
    for spec in SCHEMA:
        if spec.section == section:
            caps = {k: v for k in ("ge", "le", "max_length") if (v := getattr(spec, k)) is not None}
            if spec.type in (float, float | None):
                caps["allow_inf_nan"] = False
            fields[spec.name] = (spec.type, Field(None, description=spec.doc, **caps))
    return create_model(f"{section.title()}Settings", __config__=ConfigDict(extra="forbid"), **fields)


FastSettings, IngestSettings, RecallSettings = (_settings_model(s) for s in SECTIONS)


class SessionSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    memory: Literal[tuple(PRESETS)] = Field(
        None,
        description=f'a named preset the other settings override: {", ".join(PRESETS)} (default "{DEFAULT_MEMORY}")',
    )
    fast: FastSettings = Field(None)
    ingest: IngestSettings = Field(None)
    recall: RecallSettings = Field(None)


class PeftAdapter(BaseModel):
    """A peft LoRA adapter folder's two files, as ``ttt.store.export_peft`` or peft's save_pretrained write them."""

    model_config = ConfigDict(extra="forbid")

    adapter_config: dict = Field(description="the content of adapter_config.json")
    adapter_model: Base64Bytes = Field(description="adapter_model.safetensors, base64-encoded")


class SessionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(None, description="client-chosen id; omitted: the server picks one")
    settings: SessionSettings = Field(
        default_factory=SessionSettings, description='partial session config, e.g. {"ingest": {"lr": 0.001}}'
    )
    adapter: PeftAdapter | None = Field(None, description="start from this LoRA adapter (then only ingest settings)")


# ---- response bodies ----


class SessionInfo(BaseModel):
    """One session: what it has read and where it is (gRPC's SessionInfo)."""

    id: str
    tokens_ingested: int = Field(description="tokens trained on")
    pending_tokens: int = Field(description="tokens received, not trained yet")
    document_bytes: int = Field(
        description="bytes of the unfinished document received: a resumed upload sends the "
        "rest from here (its document_offset)"
    )
    chunks: int
    rolled_back_chunks: int = Field(description="chunks whose update was not applied (non-finite)")
    last_loss_before: float | None
    last_loss_after: float | None
    fast_weight_bytes: int = Field(description="0 while the session is only on disk")
    memory: str = Field(description="the preset it started from")
    memory_spans: int = Field(description="surprising spans kept")
    exact_tokens_read: int = Field(description="of their tokens, those every answer reads now")
    resident_bytes: int
    restored_from: str | None = Field(description="the checkpoint loaded when the newest was damaged")
    warnings: list[str]
    created_at: float
    updated_at: float
    residency: str = Field(description='"device", "host" or "disk"')
    disk_bytes: int


class SessionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[SessionInfo]


class ChunkProgress(BaseModel):
    """One trained chunk (gRPC's ChunkProgress)."""

    index: int = Field(description="chunk number within the session")
    tokens: int
    loss_before: float | None = Field(description="mean NLL of the chunk before its update (honest)")
    loss_after: float | None = Field(description="after the update (null when not measured)")
    seconds: float
    tokens_per_second: float
    tokens_ingested: int = Field(description="the session's total so far")
    pending_tokens: int
    rolled_back: bool = Field(description="the update was not applied (non-finite)")
    error: str | None


class DocumentSummary(BaseModel):
    """An upload, ingested (gRPC's IngestSummary, with every chunk's progress)."""

    session_id: str
    tokens_received: int = Field(description="tokens this upload added")
    chunks_trained: int
    tokens_ingested: int = Field(description="the session's total")
    pending_tokens: int
    mean_loss_before: float | None
    seconds: float
    bytes_read: int = Field(description="bytes of the body read")
    chunks: list[ChunkProgress]


# With ``Accept: text/event-stream`` the upload answers server-sent events instead, each a JSON object:
DOCUMENT_STREAM = {
    200: {
        "content": {
            "text/event-stream": {
                "schema": {
                    "type": "string",
                    "description": '`data: {...}` events: one {"object": "document.started", "session_id", '
                    '"tokens_ingested", '
                    '"pending_tokens", "document_bytes"} once the upload is accepted; one {"object": "document.chunk", '
                    '...ChunkProgress, "tokens_received", "bytes_read"} per chunk as it trains; one {"object": '
                    '"document.summary", ...} at the end; then `data: [DONE]`. A failure after the 200 is one '
                    '{"error": {...}} event.',
                }
            }
        }
    }
}


class SettingField(BaseModel):
    section: str
    name: str
    type: str = Field(
        description='JSON Schema type name(s): "integer", "number", "string", "boolean", "array"; '
        '"number|null" when it may be null'
    )
    default: object = Field(description="what a new session gets under the server's default preset")
    doc: str
    minimum: float | None
    maximum: float | None
    max_length: int | None
    per_chunk: bool = Field(description="an ingest stream may change it for its own chunks")


class SettingsSchema(BaseModel):
    memory: str = Field(description="the server's default preset")
    presets: dict[str, dict] = Field(description="each preset's settings over the dataclass defaults")
    defaults: dict[str, dict] = Field(description="the full settings a new session gets under each preset")
    fields: list[SettingField]


def settings_document(server_defaults: dict) -> dict:
    """``SettingsSchema`` under the server's session defaults: what a form that creates sessions shows."""
    configs = {p: SessionConfig.from_dict(merge(server_defaults, {"memory": p})).to_dict() for p in PRESETS}
    memory = SessionConfig.from_dict(server_defaults).memory
    return {
        "memory": memory,
        "presets": PRESETS,
        "defaults": configs,
        "fields": [describe(s, configs[memory][s.section][s.name]) for s in SCHEMA],
    }
