"""The HTTP front door (FastAPI): OpenAI-compatible chat, sessions REST, health and metrics.

Model work goes through the scheduler like gRPC's; errors use OpenAI's JSON error shape.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import math
import time
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import Base64Bytes, BaseModel, ConfigDict, Field, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from server.auth import AuthError
from server.console import mount_console
from server.documents import DocumentFeed
from server.errors import AlreadyExists, Forbidden, NotFound, QuotaExceeded, TooLarge
from server.guard import Guard
from server.openai_protocol import ChatRequest, CompletionRequest, TokenText, UnsupportedParameter
from server.registry import merge
from server.scheduler import QueueFull, ShuttingDown
from ttt.config import PRESETS, SCHEMA, SECTIONS, SessionConfig, describe
from ttt.engine import check_session_id
from ttt.generate import SamplingParams, TokenStream
from ttt.store import BaseModelMismatch, SessionFormatError, peft_files

log = logging.getLogger("ttt.server.http")

# exception type -> (HTTP status, OpenAI error type)
ERRORS = [
    (AuthError, 401, "authentication_error"),
    (Forbidden, 403, "permission_error"),
    (TooLarge, 413, "invalid_request_error"),  # before QuotaExceeded, its base
    (NotFound, 404, "not_found_error"),
    (AlreadyExists, 409, "conflict_error"),
    ((QuotaExceeded, QueueFull), 429, "rate_limit_error"),
    ((SessionFormatError, BaseModelMismatch), 409, "conflict_error"),
    (ShuttingDown, 503, "service_unavailable"),
    ((ValueError, OverflowError), 400, "invalid_request_error"),  # OverflowError: a number too big, e.g. in a layers spec
]


def error_response(status: int, kind: str, message: str, code: str | None = None,
                   param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status)


def status_of(e: Exception) -> tuple[int, str]:
    """(HTTP status, OpenAI error type) of an exception; (500, "server_error") for one we did not expect."""
    return next(((s, k) for types, s, k in ERRORS if isinstance(e, types)), (500, "server_error"))


def refusal(e: Exception) -> JSONResponse:
    """The error response of a known exception (its message names no path or other user)."""
    status, kind = status_of(e)
    message = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return error_response(status, kind, message, param=getattr(e, "param", None))


def finite(value):
    """``value`` with NaN and infinities (a loss with nothing to average, a diverged chunk) as None: JSON has no NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


# ---- request bodies ------------------------------------------------------------------------------


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

    memory: Literal[tuple(PRESETS)] = Field(None, description="a named preset the other settings override: "
                                            + ", ".join(PRESETS) + ' (default "balanced")')
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
    settings: SessionSettings = Field(default_factory=SessionSettings, description='partial session config, e.g. {"ingest": {"lr": 0.001}}')
    adapter: PeftAdapter | None = Field(None, description="start from this LoRA adapter (then only ingest settings)")


# ---- response bodies ------------------------------------------------------------------------------


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
DOCUMENT_STREAM = {200: {"content": {"text/event-stream": {"schema": {
    "type": "string",
    "description": '`data: {...}` events: one {"object": "document.started", "session_id", "tokens_ingested", '
                   '"pending_tokens", "document_bytes"} once the upload is accepted; one {"object": "document.chunk", '
                   '...ChunkProgress, "tokens_received", "bytes_read"} per chunk as it trains; one {"object": '
                   '"document.summary", ...} at the end; then `data: [DONE]`. A failure after the 200 is one '
                   '{"error": {...}} event.'}}}}}


class SettingField(BaseModel):
    section: str
    name: str
    type: str = Field(description='JSON Schema type name(s): "integer", "number", "string", "boolean", "array"; '
                      '"number|null" when it may be null')
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
    return {"memory": memory, "presets": PRESETS, "defaults": configs,
            "fields": [describe(s, configs[memory][s.section][s.name]) for s in SCHEMA]}


def zip_folder(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return out.getvalue()


# ---- the app -------------------------------------------------------------------------------------


class CountRequests:
    """ASGI middleware: one metrics count per request, by route and status (streaming-safe).

    An unexpected exception becomes a logged 500 in the error shape here, rather than in Starlette's
    outermost handler, which re-raises it to the server: uvicorn would log it again and drop the connection.
    A client that goes away mid-request (e.g. mid-upload) is counted as 499 and not logged as an error.
    """

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]
        started = [False]

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0], started[0] = message["status"], True
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except ClientDisconnect:
            if not started[0]:
                status[0] = 499
        except Exception:
            log.exception("internal error in %s %s", scope["method"], scope["path"])
            if started[0]:
                raise
            status[0] = 500
            await error_response(500, "server_error", "internal error")(scope, receive, send)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            # a stream that failed after its 200 counts as what it failed with
            final = scope.get("state", {}).get("status_after_start", status[0])
            self.metrics.request("http", f"{scope['method']} {route}", str(final))


MAX_TOKENS_DEFAULT = 512


@dataclass
class Event:
    """One step of an answer, for the event loop: a text delta (and its tokens' logprobs), the echoed prompt
    (``echo``: its logprobs), or the end (``done``: the finished stream; the logprobs not sent yet)."""

    index: int
    text: str | None = None
    logprobs: list = field(default_factory=list)
    done: TokenStream | None = None
    echo: bool = False


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def failure_event(request: Request, e: Exception) -> dict:
    """A failure after a stream's 200: said in the stream, logged and counted under its real status."""
    status, kind = status_of(e)
    log.log(logging.ERROR if status == 500 else logging.WARNING, "stream failed after its 200", exc_info=e)
    request.state.status_after_start = status
    return {"error": {"message": str(e) if status != 500 else "internal error", "type": kind, "code": status}}


def wants_events(request: Request) -> bool:
    return "text/event-stream" in request.headers.get("accept", "")


def usage(streams: list[TokenStream]) -> dict:
    prompt, completion = sum(s.prompt_tokens for s in streams), sum(s.completion_tokens for s in streams)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def include_usage(body) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


class UploadBody:
    """A request body read by a task of its own while the response streams: its pieces (a few held at a time),
    then ``gone`` once the client leaves. (Starlette's streaming response would read the body itself to watch for
    the client leaving; one reader owns ``receive`` here instead.)"""

    def __init__(self, request: Request):
        self.gone = False
        self._pieces: asyncio.Queue = asyncio.Queue(maxsize=4)
        self._reader = asyncio.create_task(self._read(request.receive))

    async def _read(self, receive) -> None:
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.gone = True
                await self._pieces.put(ClientDisconnect())
                return
            more = message.get("more_body", False)
            await self._pieces.put(message.get("body", b""))
        await self._pieces.put(None)
        while (await receive())["type"] != "http.disconnect":  # also what the server says once the response ends
            pass
        self.gone = True

    async def __aiter__(self):
        while (piece := await self._pieces.get()) is not None:
            if isinstance(piece, ClientDisconnect):
                raise piece
            yield piece

    def close(self) -> None:
        self._reader.cancel()


class UploadEvents(StreamingResponse):
    """Server-sent events that go out while the request body is still being read (by ``UploadBody``)."""

    async def __call__(self, scope, receive, send):
        await self.stream_response(send)


def create_app(state) -> FastAPI:
    """``state``: the running ``server.main.ServerState`` (engine, registry, scheduler, settings, keyring, metrics)."""
    app = FastAPI(title="ttt", version="0.1.0", description="Test-time-training inference server")

    def openapi() -> dict:
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

    app.openapi = openapi

    async def _known_error(request: Request, e: Exception):
        return refusal(e)

    for types, _, _ in ERRORS:
        for t in types if isinstance(types, tuple) else (types,):
            app.add_exception_handler(t, _known_error)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        if isinstance(cause := first.get("ctx", {}).get("error"), UnsupportedParameter):
            return refusal(cause)
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        message = f"{where}: {first.get('msg', 'invalid request')}".strip(": ")
        return error_response(400, "invalid_request_error", message, param=where or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_errors(request: Request, e: StarletteHTTPException):
        return error_response(e.status_code, "invalid_request_error", str(e.detail))

    s = state.settings
    app.add_middleware(Guard, keyring=state.keyring, max_body=s.max_request_bytes, private_pages=s.private_pages,
                       refuse=refusal)
    app.add_middleware(CountRequests, metrics=state.metrics)  # the outermost: refusals are counted too

    def ready():
        if state.phase != "serving":
            raise ShuttingDown("the server is starting" if state.phase == "loading" else "the server is shutting down")

    def user_of(request: Request) -> str:
        return request.state.user  # the Guard checked the key before the body was read

    def caller(request: Request, session_id: str) -> tuple[str, str]:
        """(user, session id) of a request on one session, once the server is ready and the key is known."""
        ready()
        return user_of(request), check_session_id(session_id)

    async def on_device(key, fn, *args):
        """Run ``fn`` as one scheduler unit without blocking the event loop."""
        return await asyncio.wrap_future(state.scheduler.submit(key, fn, *args))

    def model_session(model: str) -> str | None:
        """The session a request's ``model`` names; None for the base model."""
        return None if model == state.engine.base.name else check_session_id(model)

    async def answerer(user: str, sid: str | None, method: str) -> Callable[..., TokenStream]:
        """``Session.generate``/``complete`` of the user's session (404 now if unknown), or the engine's."""
        if sid is None:
            return getattr(state.engine, method)
        # not a device unit: it would wait behind the session's chunks, which the answer does not (chat ahead of
        # ingest); the session is loaded, if it must be, when the answer is admitted
        await asyncio.to_thread(state.registry.check_exists, user, sid)

        def on_worker(*args, **kwargs):  # the session, brought back if it was moved meanwhile
            return getattr(state.registry.get(user, sid), method)(*args, **kwargs)

        return on_worker

    class Answers:
        """A request's answers, decoded in the scheduler's batch (each row on one view of its session's weights);
        their deltas and logprobs reach the event loop as Events; a client that leaves drops its rows."""

        def __init__(self, request: Request, key, makers: list[Callable[[], TokenStream]]):
            # Events pass from the device thread to the event loop without a thread of their own waiting on them
            # (a waiting thread per stream would cap the concurrent streams at the thread pool's size).
            self.request, self.loop, self.events = request, asyncio.get_running_loop(), asyncio.Queue()
            self.sent = [0] * len(makers)  # logprobs handed out, per row
            self.seen: set[int] = set()  # rows that have reported (the first report ends the prompt's prefill)
            self.started: float | None = None
            # key (user, None): base-model answers count against the user's queue limit like the rest
            self.run = state.scheduler.submit_answers(key, makers, self._on_step)
            self.future = self.run.future
            self.future.add_done_callback(self._measure)
            self.future.add_done_callback(lambda future: self._put(None))  # after every Event of the request

        def _put(self, event: Event | None) -> None:
            """From the device thread: ``event`` into the loop's queue (None: the end)."""
            try:
                self.loop.call_soon_threadsafe(self.events.put_nowait, event)
            except RuntimeError:  # the loop has closed (shutdown): nobody is listening
                pass

        def _on_step(self, index: int, row: TokenStream) -> None:
            """On the worker, after a step that changed ``row``: its news as Events."""
            if self.started is None:
                self.started = time.perf_counter()
            if index not in self.seen and row.echo:
                self._put(Event(index, echo=True, logprobs=row.echo_logprobs))
            self.seen.add(index)
            for delta in row.take():
                self._put(Event(index, delta, row.logprobs[self.sent[index] :]))
                self.sent[index] = len(row.logprobs)
            if row.finish_reason is not None:
                self._put(Event(index, logprobs=row.logprobs[self.sent[index] :], done=row))

        def _measure(self, future) -> None:
            if self.started is not None and not future.cancelled() and future.exception() is None:
                tokens = sum(row.completion_tokens for row in future.result())
                state.metrics.answer(tokens, time.perf_counter() - self.started)

        async def result(self) -> list[TokenStream]:
            """Every answer, finished; a client that disconnects first stops them (or keeps them from starting)."""
            result = asyncio.wrap_future(self.future)
            while True:
                try:
                    return await asyncio.wait_for(asyncio.shield(result), 0.5)
                except asyncio.TimeoutError:  # TimeoutError itself only from Python 3.11
                    if await self.request.is_disconnected():
                        self.run.cancel()
                        raise ClientDisconnect() from None

        def stream(self, events: Callable[[Event], list[dict]], first: list[dict], usage_chunk: dict | None):
            """A server-sent events response: ``first``, ``events(event)`` for each Event, then (when asked) the
            usage, then [DONE]. A failure after the 200 is said in the stream, logged and counted."""

            async def body():
                try:
                    for payload in first:
                        yield sse(payload)
                    while (event := await self.events.get()) is not None:
                        for payload in events(event):
                            yield sse(payload)
                    try:
                        streams = self.future.result()
                    except Exception as e:
                        yield sse(failure_event(self.request, e))
                        return
                    if usage_chunk is not None:
                        yield sse({**usage_chunk, "usage": usage(streams)})
                    yield "data: [DONE]\n\n"
                finally:
                    self.run.cancel()  # a client that left: its rows leave the batch (or never join it)

            return StreamingResponse(body(), media_type="text/event-stream")

    def info(user: str, sid: str) -> dict:
        return finite(state.registry.info(user, sid))

    # ---- probes and metrics ----

    @app.get("/healthz")
    def healthz():
        """The process is alive."""
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz():
        """The model is loaded and the server accepts work (503 otherwise); ``api_keys``: requests need a key."""
        ready()
        return {"status": "ready", "model": state.engine.base.name, "api_keys": not state.keyring.open}

    @app.get("/metrics")
    def metrics():
        return Response(state.metrics.exposition(), media_type="text/plain; version=0.0.4")

    # ---- models ----

    @app.get("/v1/models")
    def list_models(request: Request):
        """The base model and the caller's sessions (each with the base model as parent)."""
        ready()
        user = user_of(request)
        base = state.engine.base.name
        data = [{"id": base, "object": "model", "created": 0, "owned_by": "ttt", "parent": None}]
        for sid in state.registry.ids(user):
            s = info(user, sid)
            data.append({"id": sid, "object": "model", "created": int(s["created_at"]), "owned_by": user, "parent": base})
        return {"object": "list", "data": data}

    # ---- chat ----

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        ready()
        user, sid = user_of(request), model_session(body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        sampling = dict(body.sampling(), max_tokens=body.max_completion_tokens or body.max_tokens or MAX_TOKENS_DEFAULT,
                        top_logprobs=(body.top_logprobs or 0) if body.logprobs else None)
        answer = await answerer(user, sid, "generate")  # an unknown session: 404 first
        # Bad messages, sampling settings or a prompt too long: a 400 before the answer is queued. The chat
        # template and the tokenizer run off the event loop: a long prompt must not stall other requests.
        await asyncio.to_thread(state.engine.prompt, messages, SamplingParams(**sampling))
        run = Answers(request, (user, sid), [lambda: answer(messages, stream=True, **sampling)])
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        text = TokenText(state.engine.base.tokenizer)

        def logprobs(entries) -> dict | None:
            return {"content": [text.chat_entry(e) for e in entries], "refusal": None} if body.logprobs else None

        if not body.stream:
            (stream,) = await run.result()
            return {
                "id": cid, "object": "chat.completion", "created": created, "model": body.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": stream.text},
                             "logprobs": logprobs(stream.logprobs), "finish_reason": stream.finish_reason}],
                "usage": usage([stream]),
            }

        def chunk(choice: dict, **extra) -> dict:
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                    "choices": [choice] if choice else [], **extra}

        def events(event: Event) -> list[dict]:
            if event.done is not None:
                return [chunk({"index": 0, "delta": {}, "logprobs": logprobs(event.logprobs),
                               "finish_reason": event.done.finish_reason})]
            return [chunk({"index": 0, "delta": {"content": event.text}, "logprobs": logprobs(event.logprobs),
                           "finish_reason": None})]

        first = chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                       "finish_reason": None})
        return run.stream(events, [first], chunk({}, usage=None) if include_usage(body) else None)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        """Text completion without a chat template (lm-evaluation-harness's ``local-completions``): each prompt
        after the session's window, as in chat; ``echo`` with ``logprobs`` scores the prompt itself."""
        ready()
        user, sid = user_of(request), model_session(body.model)
        sampling = dict(body.sampling(), max_tokens=body.max_tokens, top_logprobs=body.logprobs)
        params = SamplingParams(**sampling)
        engine = state.engine

        def check() -> list[list[int]]:
            ids = [engine.text_ids(p) for p in body.prompts()]
            for one in ids:
                engine.prompt(one, params)  # too long for the context: 400 now
            if body.max_tokens == 0 and not body.echo:
                raise UnsupportedParameter("max_tokens", "max_tokens 0 needs echo: true")
            return ids

        answer = await answerer(user, sid, "complete")
        prompts = await asyncio.to_thread(check)
        run = Answers(request, (user, sid), [
            (lambda ids=ids: answer(ids, echo=body.echo, stream=True, **sampling)) for ids in prompts])
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        text = TokenText(engine.base.tokenizer)
        originals = [p if isinstance(p, str) else engine.base.tokenizer.decode(p) for p in body.prompts()]

        def choice(index: int, piece: str, entries, offset: int, finish: str | None) -> dict:
            logprobs = text.completion_logprobs(entries, offset) if body.logprobs is not None else None
            return {"index": index, "text": piece, "logprobs": logprobs, "finish_reason": finish}

        if not body.stream:
            streams = await run.result()
            choices = []
            for i, st in enumerate(streams):
                echoed = originals[i] if body.echo else ""
                offset = 0 if body.echo else len(originals[i])
                c = choice(i, echoed + st.text, st.echo_logprobs + st.logprobs, offset, st.finish_reason)
                choices.append(c)
            return {"id": cid, "object": "text_completion", "created": created, "model": body.model,
                    "choices": choices, "usage": usage(streams)}

        def chunk(choices: list[dict], **extra) -> dict:
            return {"id": cid, "object": "text_completion", "created": created, "model": body.model,
                    "choices": choices, **extra}

        # where each choice's next token starts in its text (OpenAI's offsets count from the prompt's start)
        offsets = [0 if body.echo else len(o) for o in originals]

        def events(event: Event) -> list[dict]:
            i = event.index
            piece = originals[i] if event.echo else event.text or ""
            out = choice(i, piece, event.logprobs, offsets[i], event.done.finish_reason if event.done else None)
            offsets[i] += sum(len(text.text(e.token)) for e in event.logprobs)
            return [chunk([out])]

        return run.stream(events, [], chunk([], usage=None) if include_usage(body) else None)

    # ---- sessions REST ----

    @app.post("/v1/sessions", status_code=201)
    async def create_session(body: SessionCreate, request: Request):
        ready()
        user = user_of(request)
        sid = check_session_id(body.id) if body.id is not None else None
        settings = body.settings.model_dump(exclude_unset=True)
        if body.adapter is not None:
            files = {"adapter_config.json": json.dumps(body.adapter.adapter_config).encode(),
                     "adapter_model.safetensors": body.adapter.adapter_model}
            session = await on_device((user, sid), state.registry.import_adapter, user, sid, files, settings)
        else:
            session = await on_device((user, sid), state.registry.create, user, sid, settings)
        return info(user, session.id)

    @app.get("/v1/sessions")
    def list_sessions(request: Request):
        ready()
        user = user_of(request)
        return {"object": "list", "data": [info(user, sid) for sid in state.registry.ids(user)]}

    @app.get("/v1/sessions/{session_id}")
    def get_session(session_id: str, request: Request):
        return info(*caller(request, session_id))

    @app.delete("/v1/sessions/{session_id}")
    async def delete_session(session_id: str, request: Request):
        user, sid = caller(request, session_id)
        await on_device((user, sid), state.registry.delete, user, sid)
        return {"id": sid, "deleted": True}

    @app.post("/v1/sessions/{session_id}/save")
    async def save_session(session_id: str, request: Request):
        user, sid = caller(request, session_id)
        await on_device((user, sid), state.registry.save, user, sid)
        return info(user, sid)

    @app.post("/v1/sessions/{session_id}/reset")
    async def reset_session(session_id: str, request: Request):
        user, sid = caller(request, session_id)
        await on_device((user, sid), state.registry.reset, user, sid)
        return info(user, sid)

    async def document_events(request: Request, user: str, sid: str, end_of_document: bool):
        """``document.started`` (once the stream slot and the session are held: refusals come before it), a
        ``document.chunk`` per trained chunk, then ``document.summary``."""
        with state.streams.hold(user), state.registry.pinned(user, sid):
            session = await on_device((user, sid), state.registry.get, user, sid)
            s = state.settings
            feed = DocumentFeed(session, user, state.scheduler, state.registry, max_tokens=s.max_document_tokens,
                                max_pieces=s.max_pieces_per_stream, autosave_every=s.autosave_every_chunks,
                                on_chunk=state.metrics.chunk)
            yield {"object": "document.started", "session_id": sid, "tokens_ingested": session.stats.tokens_ingested,
                   "pending_tokens": len(session.pending), "document_bytes": session.text_stream.bytes_received}
            body = UploadBody(request)
            try:
                async for event in feed.events(body, end_of_document, gone=lambda: body.gone):
                    yield finite(event)
            finally:
                body.close()

    @app.post("/v1/sessions/{session_id}/documents", response_model=DocumentSummary, responses=DOCUMENT_STREAM)
    async def add_document(session_id: str, request: Request, end_of_document: bool = True):
        """A ``text/plain`` body, read as a stream and chunked as over gRPC. Answers when it is ingested, with
        every chunk's progress; with ``Accept: text/event-stream``, one event per chunk as it trains."""
        user, sid = caller(request, session_id)
        events = document_events(request, user, sid, end_of_document)
        started = await anext(events)  # an unknown session, a stream too many: refused before the 200
        if wants_events(request):
            async def stream():
                try:
                    yield sse(started)
                    async for event in events:
                        yield sse(event)
                except ClientDisconnect:  # mid-upload: nobody reads the stream any more
                    request.state.status_after_start = 499
                    raise
                except Exception as e:
                    yield sse(failure_event(request, e))
                    return
                finally:
                    await events.aclose()  # a client that left: no further chunk is pulled
                yield "data: [DONE]\n\n"

            return UploadEvents(stream(), media_type="text/event-stream")
        chunks, summary = [], {}
        async for event in events:  # to its end: the stream slot and the pin are released there
            kind = event.pop("object")
            if kind == "document.chunk":
                chunks.append(event)
            else:
                summary = event
        return {**summary, "chunks": chunks}

    @app.get("/v1/sessions/{session_id}/adapter", response_class=Response,
             responses={200: {"content": {"application/zip": {}}, "description": "a peft LoRA adapter folder"}})
    async def download_adapter(session_id: str, request: Request):
        """The session's fast weights as a zip of a peft adapter folder (``PeftModel.from_pretrained`` loads it
        unzipped; ``POST /v1/sessions`` with ``adapter`` imports it). LoRA sessions only."""
        user, sid = caller(request, session_id)
        files = await on_device((user, sid), lambda: peft_files(state.registry.get(user, sid)))
        return Response(zip_folder(files), media_type="application/zip",
                        headers={"content-disposition": f'attachment; filename="{sid}-adapter.zip"'})

    @app.get("/v1/settings", response_model=SettingsSchema)
    def settings_schema(request: Request):
        """Every session setting (type, default, documentation, bounds) and the memory presets: what a form
        that creates sessions is built from."""
        ready()
        user_of(request)
        return settings_document(state.registry.defaults)

    mount_console(app)

    return app
