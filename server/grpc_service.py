"""gRPC handlers: authenticate, validate, hand model work to the scheduler, stream progress.

Where a chunk of text goes: ``Ingest`` -> ``Session.append_text`` (tokenize, no device) ->
``scheduler.run(key, session.train_next_chunk)`` -> ``ttt.ingest.train_chunk`` (score, step) on the worker.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import math
import time

import grpc

from server.auth import AuthError, KeyRing
from server.proto.ttt.v1 import ttt_pb2 as pb
from server.proto.ttt.v1 import ttt_pb2_grpc as pb_grpc
from server.registry import AlreadyExists, NotFound, QuotaExceeded, SessionRegistry
from server.scheduler import QueueFull, Scheduler, ShuttingDown
from server.settings import Settings
from ttt import SessionConfig
from ttt.engine import check_session_id
from ttt.session import STEP_SETTINGS
from ttt.store import BaseModelMismatch, SessionFormatError

log = logging.getLogger(__name__)

# Exception -> status code; the message is the exception's own text (it names no path or other user).
STATUS = [
    (AuthError, grpc.StatusCode.UNAUTHENTICATED),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    ((QuotaExceeded, QueueFull), grpc.StatusCode.RESOURCE_EXHAUSTED),
    ((SessionFormatError, BaseModelMismatch), grpc.StatusCode.FAILED_PRECONDITION),
    (ShuttingDown, grpc.StatusCode.UNAVAILABLE),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),  # includes UnicodeDecodeError
]


class DocumentTooLarge(QuotaExceeded):
    pass


def _abort(context, e: Exception):
    if isinstance(e, grpc.RpcError) and not context.is_active():
        raise e  # the client cancelled or went away (the request iterator says so): not a server error
    for types, code in STATUS:
        if isinstance(e, types):
            detail = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
            context.abort(code, detail)
    log.exception("internal error")
    context.abort(grpc.StatusCode.INTERNAL, "internal error")


def rpc(method):
    """Map our exceptions to status codes, for unary and streaming handlers alike."""
    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def stream(self, request, context):
            try:
                yield from method(self, request, context)
            except Exception as e:
                _abort(context, e)

        return stream

    @functools.wraps(method)
    def unary(self, request, context):
        try:
            return method(self, request, context)
        except Exception as e:
            _abort(context, e)

    return unary


def settings_dict(msg: pb.SessionSettings) -> dict:
    """The fields the client set, as a partial SessionConfig dict."""
    out = {}
    for section in ("fast", "ingest"):
        sub = getattr(msg, section)
        values = {f.name: v for f, v in sub.ListFields()}
        if "targets" in values:
            values["targets"] = list(values["targets"])
        if values:
            out[section] = values
    return out


def stream_settings(config: SessionConfig, requested: dict) -> dict:
    """The step settings an Ingest stream asks for; the others shape the session and must match it."""
    current = config.to_dict()
    fixed = [
        f"{section}.{name}"
        for section, values in requested.items()
        for name, value in values.items()
        if not (section == "ingest" and name in STEP_SETTINGS)
        and current[section][name] != (list(value) if name == "targets" else value)
    ]
    if fixed:
        raise ValueError(f"{', '.join(sorted(fixed))} can only be set when the session is created")
    step = {k: v for k, v in requested.get("ingest", {}).items() if k in STEP_SETTINGS}
    dataclasses.replace(config.ingest, **step)  # validates them now, not at the first chunk
    return step


def info_message(info: dict) -> pb.SessionInfo:
    nan_to_zero = lambda x: 0.0 if x is None or (isinstance(x, float) and math.isnan(x)) else x
    return pb.SessionInfo(
        session_id=info["id"],
        tokens_ingested=info["tokens_ingested"],
        pending_tokens=info["pending_tokens"],
        chunks=info["chunks"],
        rolled_back_chunks=info["rolled_back_chunks"],
        last_loss_before=nan_to_zero(info["last_loss_before"]),
        last_loss_after=nan_to_zero(info["last_loss_after"]),
        bytes=info["fast_weight_bytes"],
        created_at=info["created_at"],
        updated_at=info["updated_at"],
        residency=info["residency"],
        document_bytes=info["document_bytes"],
    )


class SessionsService(pb_grpc.SessionsServicer):
    def __init__(self, registry: SessionRegistry, scheduler: Scheduler, keyring: KeyRing, settings: Settings):
        self.registry, self.scheduler, self.keyring, self.settings = registry, scheduler, keyring, settings

    def _user(self, context) -> str:
        auth = dict(context.invocation_metadata()).get("authorization")
        return self.keyring.user_for(auth)

    def _info(self, user: str, session_id: str) -> pb.SessionInfo:
        return info_message(self.registry.info(user, session_id))

    @rpc
    def CreateSession(self, request, context):
        user = self._user(context)
        sid = check_session_id(request.session_id) if request.session_id else None
        session = self.scheduler.run((user, sid), self.registry.create, user, sid, settings_dict(request.settings))
        return self._info(user, session.id)

    @rpc
    def GetSession(self, request, context):
        return self._info(self._user(context), check_session_id(request.session_id))

    @rpc
    def ListSessions(self, request, context):
        user = self._user(context)
        return pb.ListSessionsResponse(sessions=[self._info(user, sid) for sid in self.registry.ids(user)])

    @rpc
    def DeleteSession(self, request, context):
        user, sid = self._user(context), check_session_id(request.session_id)
        self.scheduler.run((user, sid), self.registry.delete, user, sid)
        return pb.DeleteSessionResponse()

    @rpc
    def SaveSession(self, request, context):
        user, sid = self._user(context), check_session_id(request.session_id)
        self.scheduler.run((user, sid), self.registry.save, user, sid)
        return self._info(user, sid)

    @rpc
    def ResetSession(self, request, context):
        user, sid = self._user(context), check_session_id(request.session_id)
        self.scheduler.run((user, sid), self.registry.reset, user, sid)
        return self._info(user, sid)

    @rpc
    def Ingest(self, request_iterator, context):
        user = self._user(context)
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("message") != "start":
            raise ValueError("the first message of an Ingest stream must be `start`")
        start = first.start
        sid = check_session_id(start.session_id)
        key = (user, sid)
        requested = settings_dict(start.settings)
        try:
            session = self.scheduler.run(key, self.registry.get, user, sid)
        except NotFound:
            if not start.create_if_missing:
                raise
            session = self.scheduler.run(key, self.registry.create, user, sid, requested)
        step_settings = stream_settings(session.config, requested)

        t0 = time.perf_counter()
        received = trained = 0
        loss_sum = 0.0
        limit = self.settings.max_document_tokens

        def train_ready():
            nonlocal trained, loss_sum
            while context.is_active() and session.chunks_ready:
                report = self.scheduler.run(key, functools.partial(session.train_next_chunk, **step_settings))
                if report is None:
                    return
                trained += 1
                if math.isfinite(report.loss_before):
                    loss_sum += report.loss_before
                if self.registry.chunks_since_save(user, sid) >= self.settings.autosave_every_chunks:
                    self.scheduler.submit(key, self.registry.save, user, sid)
                yield pb.IngestResponse(chunk=pb.ChunkProgress(
                    index=report.index,
                    tokens=report.tokens,
                    loss_before=report.loss_before,
                    loss_after=report.loss_after if report.loss_after is not None else math.nan,
                    seconds=report.seconds,
                    tokens_per_second=report.tokens / report.seconds if report.seconds > 0 else 0.0,
                    tokens_ingested=session.stats.tokens_ingested,
                    pending_tokens=len(session.pending),
                    rolled_back=report.rolled_back,
                    error=report.error or "",
                ))

        for request in request_iterator:
            kind = request.WhichOneof("message")
            if kind == "start":
                raise ValueError("`start` may only be the first message")
            if kind is None or (kind == "text" and not request.text) or (kind == "utf8" and not request.utf8):
                raise ValueError("empty message: send text, utf8 bytes or token ids")
            with session.lock:
                before = session.stats.tokens_ingested + len(session.pending)
                saved_text = session.text_stream.state()
                if kind == "tokens":
                    # Token ids end the text before them: its held-back tail goes first, keeping the order.
                    tail = session.text_stream.flush()
                    try:
                        session.append_tokens(tail + list(request.tokens.ids))
                    except ValueError:
                        session.text_stream.load_state(saved_text)  # refused ids change nothing
                        raise
                else:
                    session.append_text(request.text if kind == "text" else request.utf8)
                added = session.stats.tokens_ingested + len(session.pending) - before
                if received + added > limit:
                    # Over the limit changes nothing: drop this piece's tokens and tokenizer progress.
                    del session.pending[len(session.pending) - added :]
                    session.text_stream.load_state(saved_text)
                    raise DocumentTooLarge(f"document over the limit of {limit} tokens per stream")
                received += added
            yield from train_ready()
            if not context.is_active():
                return  # cancelled: trained chunks stay, the rest stays pending for the next stream

        if start.end_of_document:
            with session.lock:
                before = session.stats.tokens_ingested + len(session.pending)
                session.end_document()
                received += session.stats.tokens_ingested + len(session.pending) - before
            yield from train_ready()
        yield pb.IngestResponse(summary=pb.IngestSummary(
            session_id=sid,
            tokens_received=received,
            chunks_trained=trained,
            tokens_ingested=session.stats.tokens_ingested,
            pending_tokens=len(session.pending),
            mean_loss_before=loss_sum / trained if trained else math.nan,
            seconds=time.perf_counter() - t0,
        ))
