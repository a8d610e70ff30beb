from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FastWeightSettings(_message.Message):
    __slots__ = ("kind", "layers", "targets", "rank", "alpha", "mlp_hidden", "seed")
    KIND_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    MLP_HIDDEN_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    kind: str
    layers: str
    targets: _containers.RepeatedScalarFieldContainer[str]
    rank: int
    alpha: float
    mlp_hidden: int
    seed: int
    def __init__(self, kind: _Optional[str] = ..., layers: _Optional[str] = ..., targets: _Optional[_Iterable[str]] = ..., rank: _Optional[int] = ..., alpha: _Optional[float] = ..., mlp_hidden: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class IngestSettings(_message.Message):
    __slots__ = ("chunk_tokens", "context_tokens", "steps_per_chunk", "lr", "optimizer", "max_grad_norm", "sink_tokens", "weight_decay", "measure_loss_after", "activation_checkpointing", "surprise_power", "betas")
    CHUNK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STEPS_PER_CHUNK_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    MAX_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    SINK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    MEASURE_LOSS_AFTER_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_CHECKPOINTING_FIELD_NUMBER: _ClassVar[int]
    SURPRISE_POWER_FIELD_NUMBER: _ClassVar[int]
    BETAS_FIELD_NUMBER: _ClassVar[int]
    chunk_tokens: int
    context_tokens: int
    steps_per_chunk: int
    lr: float
    optimizer: str
    max_grad_norm: float
    sink_tokens: int
    weight_decay: float
    measure_loss_after: bool
    activation_checkpointing: str
    surprise_power: float
    betas: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, chunk_tokens: _Optional[int] = ..., context_tokens: _Optional[int] = ..., steps_per_chunk: _Optional[int] = ..., lr: _Optional[float] = ..., optimizer: _Optional[str] = ..., max_grad_norm: _Optional[float] = ..., sink_tokens: _Optional[int] = ..., weight_decay: _Optional[float] = ..., measure_loss_after: _Optional[bool] = ..., activation_checkpointing: _Optional[str] = ..., surprise_power: _Optional[float] = ..., betas: _Optional[_Iterable[float]] = ...) -> None: ...

class RecallSettings(_message.Message):
    __slots__ = ("exact_tokens", "pool_tokens", "spans_per_chunk", "span_tokens", "peak_tokens", "replay_spans", "replay_steps", "replay_lr", "study_spans", "study_top_k", "exact_select", "dense_spans_per_chunk", "notes_alone")
    EXACT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    POOL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SPANS_PER_CHUNK_FIELD_NUMBER: _ClassVar[int]
    SPAN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PEAK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REPLAY_SPANS_FIELD_NUMBER: _ClassVar[int]
    REPLAY_STEPS_FIELD_NUMBER: _ClassVar[int]
    REPLAY_LR_FIELD_NUMBER: _ClassVar[int]
    STUDY_SPANS_FIELD_NUMBER: _ClassVar[int]
    STUDY_TOP_K_FIELD_NUMBER: _ClassVar[int]
    EXACT_SELECT_FIELD_NUMBER: _ClassVar[int]
    DENSE_SPANS_PER_CHUNK_FIELD_NUMBER: _ClassVar[int]
    NOTES_ALONE_FIELD_NUMBER: _ClassVar[int]
    exact_tokens: int
    pool_tokens: int
    spans_per_chunk: int
    span_tokens: int
    peak_tokens: int
    replay_spans: int
    replay_steps: int
    replay_lr: float
    study_spans: int
    study_top_k: int
    exact_select: str
    dense_spans_per_chunk: int
    notes_alone: bool
    def __init__(self, exact_tokens: _Optional[int] = ..., pool_tokens: _Optional[int] = ..., spans_per_chunk: _Optional[int] = ..., span_tokens: _Optional[int] = ..., peak_tokens: _Optional[int] = ..., replay_spans: _Optional[int] = ..., replay_steps: _Optional[int] = ..., replay_lr: _Optional[float] = ..., study_spans: _Optional[int] = ..., study_top_k: _Optional[int] = ..., exact_select: _Optional[str] = ..., dense_spans_per_chunk: _Optional[int] = ..., notes_alone: _Optional[bool] = ...) -> None: ...

class SessionSettings(_message.Message):
    __slots__ = ("fast", "ingest", "memory", "recall")
    FAST_FIELD_NUMBER: _ClassVar[int]
    INGEST_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    RECALL_FIELD_NUMBER: _ClassVar[int]
    fast: FastWeightSettings
    ingest: IngestSettings
    memory: str
    recall: RecallSettings
    def __init__(self, fast: _Optional[_Union[FastWeightSettings, _Mapping]] = ..., ingest: _Optional[_Union[IngestSettings, _Mapping]] = ..., memory: _Optional[str] = ..., recall: _Optional[_Union[RecallSettings, _Mapping]] = ...) -> None: ...

class CreateSessionRequest(_message.Message):
    __slots__ = ("session_id", "settings", "adapter")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    settings: SessionSettings
    adapter: PeftAdapter
    def __init__(self, session_id: _Optional[str] = ..., settings: _Optional[_Union[SessionSettings, _Mapping]] = ..., adapter: _Optional[_Union[PeftAdapter, _Mapping]] = ...) -> None: ...

class PeftAdapter(_message.Message):
    __slots__ = ("adapter_config", "adapter_model")
    ADAPTER_CONFIG_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_MODEL_FIELD_NUMBER: _ClassVar[int]
    adapter_config: bytes
    adapter_model: bytes
    def __init__(self, adapter_config: _Optional[bytes] = ..., adapter_model: _Optional[bytes] = ...) -> None: ...

class SessionRef(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class SessionInfo(_message.Message):
    __slots__ = ("session_id", "tokens_ingested", "pending_tokens", "chunks", "rolled_back_chunks", "last_loss_before", "last_loss_after", "bytes", "created_at", "updated_at", "residency", "document_bytes", "resident_bytes", "disk_bytes", "restored_from", "warnings", "memory", "memory_spans", "exact_tokens_read")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_INGESTED_FIELD_NUMBER: _ClassVar[int]
    PENDING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    ROLLED_BACK_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    LAST_LOSS_BEFORE_FIELD_NUMBER: _ClassVar[int]
    LAST_LOSS_AFTER_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    RESIDENCY_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESTORED_FROM_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    MEMORY_SPANS_FIELD_NUMBER: _ClassVar[int]
    EXACT_TOKENS_READ_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    tokens_ingested: int
    pending_tokens: int
    chunks: int
    rolled_back_chunks: int
    last_loss_before: float
    last_loss_after: float
    bytes: int
    created_at: float
    updated_at: float
    residency: str
    document_bytes: int
    resident_bytes: int
    disk_bytes: int
    restored_from: str
    warnings: _containers.RepeatedScalarFieldContainer[str]
    memory: str
    memory_spans: int
    exact_tokens_read: int
    def __init__(self, session_id: _Optional[str] = ..., tokens_ingested: _Optional[int] = ..., pending_tokens: _Optional[int] = ..., chunks: _Optional[int] = ..., rolled_back_chunks: _Optional[int] = ..., last_loss_before: _Optional[float] = ..., last_loss_after: _Optional[float] = ..., bytes: _Optional[int] = ..., created_at: _Optional[float] = ..., updated_at: _Optional[float] = ..., residency: _Optional[str] = ..., document_bytes: _Optional[int] = ..., resident_bytes: _Optional[int] = ..., disk_bytes: _Optional[int] = ..., restored_from: _Optional[str] = ..., warnings: _Optional[_Iterable[str]] = ..., memory: _Optional[str] = ..., memory_spans: _Optional[int] = ..., exact_tokens_read: _Optional[int] = ...) -> None: ...

class ListSessionsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListSessionsResponse(_message.Message):
    __slots__ = ("sessions",)
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[SessionInfo]
    def __init__(self, sessions: _Optional[_Iterable[_Union[SessionInfo, _Mapping]]] = ...) -> None: ...

class DeleteSessionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class IngestStart(_message.Message):
    __slots__ = ("session_id", "create_if_missing", "settings", "end_of_document")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CREATE_IF_MISSING_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    END_OF_DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    create_if_missing: bool
    settings: SessionSettings
    end_of_document: bool
    def __init__(self, session_id: _Optional[str] = ..., create_if_missing: _Optional[bool] = ..., settings: _Optional[_Union[SessionSettings, _Mapping]] = ..., end_of_document: _Optional[bool] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class IngestRequest(_message.Message):
    __slots__ = ("start", "text", "utf8", "tokens")
    START_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    UTF8_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    start: IngestStart
    text: str
    utf8: bytes
    tokens: TokenIds
    def __init__(self, start: _Optional[_Union[IngestStart, _Mapping]] = ..., text: _Optional[str] = ..., utf8: _Optional[bytes] = ..., tokens: _Optional[_Union[TokenIds, _Mapping]] = ...) -> None: ...

class ChunkProgress(_message.Message):
    __slots__ = ("index", "tokens", "loss_before", "loss_after", "seconds", "tokens_per_second", "tokens_ingested", "pending_tokens", "rolled_back", "error")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOSS_BEFORE_FIELD_NUMBER: _ClassVar[int]
    LOSS_AFTER_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    TOKENS_INGESTED_FIELD_NUMBER: _ClassVar[int]
    PENDING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ROLLED_BACK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    index: int
    tokens: int
    loss_before: float
    loss_after: float
    seconds: float
    tokens_per_second: float
    tokens_ingested: int
    pending_tokens: int
    rolled_back: bool
    error: str
    def __init__(self, index: _Optional[int] = ..., tokens: _Optional[int] = ..., loss_before: _Optional[float] = ..., loss_after: _Optional[float] = ..., seconds: _Optional[float] = ..., tokens_per_second: _Optional[float] = ..., tokens_ingested: _Optional[int] = ..., pending_tokens: _Optional[int] = ..., rolled_back: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...

class IngestSummary(_message.Message):
    __slots__ = ("session_id", "tokens_received", "chunks_trained", "tokens_ingested", "pending_tokens", "mean_loss_before", "seconds")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_TRAINED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_INGESTED_FIELD_NUMBER: _ClassVar[int]
    PENDING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MEAN_LOSS_BEFORE_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    tokens_received: int
    chunks_trained: int
    tokens_ingested: int
    pending_tokens: int
    mean_loss_before: float
    seconds: float
    def __init__(self, session_id: _Optional[str] = ..., tokens_received: _Optional[int] = ..., chunks_trained: _Optional[int] = ..., tokens_ingested: _Optional[int] = ..., pending_tokens: _Optional[int] = ..., mean_loss_before: _Optional[float] = ..., seconds: _Optional[float] = ...) -> None: ...

class IngestResponse(_message.Message):
    __slots__ = ("chunk", "summary")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    chunk: ChunkProgress
    summary: IngestSummary
    def __init__(self, chunk: _Optional[_Union[ChunkProgress, _Mapping]] = ..., summary: _Optional[_Union[IngestSummary, _Mapping]] = ...) -> None: ...
