"""Server settings: command-line flags over ``TTT_*`` environment variables over defaults, one typed object."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The names of ttt.model.DTYPES (this module stays free of torch: the CLI builds its flags from it).
DtypeName = Literal["auto", "float32", "bfloat16"]


def _default_data_dir() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "ttt"


class Settings(BaseSettings):
    """Every field can be set as ``TTT_<NAME>`` (e.g. ``TTT_GRPC_PORT=50052``)."""

    # A field's docstring is its description (in the JSON schema and the docs).
    model_config = SettingsConfigDict(env_prefix="TTT_", extra="ignore", use_attribute_docstrings=True)

    model: str | None = None
    """local Hugging Face model folder; empty: the embedded default"""
    device: str | None = None
    """cuda, cpu, ...; empty: CUDA when available"""
    dtype: DtypeName = "auto"
    """the base model's weights and activations: auto = bfloat16 on CUDA, float32 on CPU (bfloat16 on a CPU with
    native bf16, AVX512-BF16 or AMX, runs about twice as fast; fast weights stay float32 either way)"""
    host: str = "127.0.0.1"
    """bind address of both servers"""
    grpc_port: int = Field(50051, ge=0, le=65535)
    """0 picks a free port"""
    http_port: int = Field(8000, ge=0, le=65535)
    """0 picks a free port"""
    data_dir: Path = Field(default_factory=_default_data_dir)
    """where sessions are saved (under users/), unless ``store`` names another place"""
    store: str | None = None
    """the session store: a folder or an fsspec URL (``s3://bucket/prefix``; ttt.storage says what each backend
    guarantees); empty: <data_dir>/users"""
    store_options: dict = Field(default_factory=dict)
    """fsspec storage options of ``store`` as JSON, e.g. {"client_kwargs": {"endpoint_url": "http://minio:9000"}}"""
    replica_id: str | None = None
    """this server's name in the sessions' leases (one writer per session); empty: <host name>:<store>, so that a
    restarted server takes its own sessions back at once: give each server sharing a store its own"""
    lease_seconds: float = Field(30.0, gt=0)
    """how long a session's lease lasts without renewal: a server that vanished holds its sessions this long"""
    api_keys_file: Path | None = None
    """JSON {user: [sha256 of key, ...]}; none: open, loopback only"""
    tls_cert: Path | None = None
    """PEM certificate (chain): both doors serve TLS (with tls_key)"""
    tls_key: Path | None = None
    """PEM private key of tls_cert"""

    # Fast-weight defaults for new sessions, as a partial SessionConfig dict, e.g. {"ingest": {"lr": 0.001}}.
    session_defaults: dict = Field(default_factory=dict)

    # Limits
    max_message_bytes: int = Field(4 << 20, gt=0)
    """largest gRPC message"""
    max_request_bytes: int = Field(8 << 20, gt=0)
    """largest HTTP request body (413), but document uploads: those are read piece by piece and bounded by
    max_document_tokens"""
    private_pages: bool = False
    """/metrics and the API pages (/docs, /redoc, /openapi.json) need a key too; the probes /healthz and /readyz stay
    open"""
    max_document_tokens: int = Field(20_000_000, gt=0)
    """tokens one ingest stream may add"""
    max_sessions_per_user: int = Field(256, gt=0)
    max_bytes_per_user: int = Field(16 << 30, gt=0)
    """checkpoints on disk per user (estimated before writing)"""
    max_session_bytes: int = Field(2 << 30, gt=0)
    """memory one session may hold, priced from its settings and the model before anything is allocated (429 /
    RESOURCE_EXHAUSTED)"""
    max_memory_bytes_per_user: int = Field(8 << 30, gt=0)
    """priced memory of one user's sessions in memory, summed"""
    max_pieces_per_stream: int = Field(1_000_000, gt=0)
    """messages (or HTTP body pieces) in one ingest stream"""
    max_streams_per_user: int = Field(8, gt=0)
    """ingest streams one user may have open at once"""
    max_streams: int = Field(24, gt=0)
    """ingest streams open at once in all (each gRPC one holds a thread)"""
    grpc_threads: int = Field(32, gt=0)
    """gRPC handler threads; keep it above max_streams so that unary calls always find one"""
    ingest_start_seconds: float = Field(10.0, gt=0)
    """an Ingest stream must send its start within this"""
    ingest_idle_seconds: float = Field(300.0, gt=0)
    """an Ingest stream that sends nothing for this long is cancelled (what it sent stays)"""
    max_queue: int = Field(1024, gt=0)
    """units of work waiting for the device before requests are refused"""
    max_queue_per_user: int = Field(64, gt=0)
    """units of one user's work waiting for the device (429 / RESOURCE_EXHAUSTED beyond): one user cannot fill the
    queue"""
    max_batch_sessions: int = Field(8, ge=1)
    """sessions whose ready chunks may train in one batched step (1: one at a time)"""

    # Answers: every chat and completion being decoded advances one token per step in one batched forward
    max_answer_rows: int = Field(32, ge=1)
    """answers decoded together in one step (1: one at a time); more wait for a row to leave"""
    answer_kv_bytes: int = Field(2 << 30, gt=0)
    """keys/values of the answers being decoded (their prompts and tokens); a request that does not fit waits, one
    that never can is a 400"""
    prefill_chunk_tokens: int = Field(512, gt=0)
    """prompt tokens prefilled per step, between decode steps (a long prompt delays the other answers by one piece at
    a time; 256 split most of the default model's chat prompts, 130-170 tokens, across two steps)"""
    max_batch_sessions_answering: int = Field(1, ge=1)
    """max_batch_sessions while answers wait or decode: an answer waits for at most this many sessions' chunks"""
    max_unit_seconds: float = Field(1.0, gt=0)
    """a batch of sessions' chunks is cut to what is expected to train within this (by the last batches' seconds per
    chunk; at least one chunk): an answer that arrives meanwhile waits for it"""
    ingest_share: float = Field(0.25, gt=0, lt=1)
    """share of the device time that ingest and other units get while answers are being decoded (answers come first;
    ingest never starves)"""

    # Residency: the least recently used sessions move device -> host memory -> disk (saved first) over these
    # budgets; sessions with an open stream or queued work stay. On a CPU-only server the device is host memory:
    # a device -> host move is bookkeeping only, but it is still counted against each budget.
    device_budget_bytes: int = Field(8 << 30, ge=0)
    """session tensors kept on the device"""
    host_budget_bytes: int = Field(32 << 30, ge=0)
    """idle session tensors kept in host memory"""

    # Autosave of sessions changed since their last checkpoint
    autosave_every_chunks: int = Field(32, gt=0)
    autosave_idle_seconds: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both tls_cert and tls_key")
        if self.max_streams >= self.grpc_threads:
            raise ValueError("max_streams must be below grpc_threads: unary calls need a thread while streams are open")
        return self

    @property
    def loopback_only(self) -> bool:
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host == "localhost"
