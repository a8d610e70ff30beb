"""The gRPC door: authenticate, translate messages into ``server.service.SessionService`` calls and back,
stream progress; exceptions become status codes through ``server.errors``.

Where a chunk of text goes: ``Ingest`` -> ``DocumentFeed.add`` (server/documents.py) ->
``Session.append`` (tokenize, no device) -> ``scheduler.submit_batchable(key, train_batch, ...)`` ->
``ttt.session.train_sessions`` -> ``ttt.batch.train_group`` (score, step; one session, or a batch with other
sessions' chunks waiting at the same time) -> ``Session.record_chunk`` (window, surprising spans and their
rehearsal: ``ttt.memory``) on the worker.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import threading
import time
from collections.abc import Iterator

import grpc

from server.documents import DocumentFeed, chunk_progress
from server.errors import INTERNAL, StreamIdle, message_of, status_of
from server.proto.ttt.v1 import ttt_pb2 as pb
from server.proto.ttt.v1 import ttt_pb2_grpc as pb_grpc
from server.scheduler import result_for_client
from ttt.config import SECTIONS, check_caps
from ttt.engine import check_session_id
from ttt.ingest import ChunkReport

log = logging.getLogger(__name__)


def status_name(e: Exception) -> str:
    """The status code a failed call ends with, for the metrics (a client that went away: CANCELLED)."""
    return "CANCELLED" if isinstance(e, grpc.RpcError) else status_of(e).grpc


def _abort(context, e: Exception):
    if isinstance(e, grpc.RpcError) and not context.is_active():
        raise e  # the client cancelled or went away (the request iterator says so): not a server error
    status = status_of(e)
    if status is INTERNAL:
        log.exception("internal error")
    context.abort(getattr(grpc.StatusCode, status.grpc), message_of(e))


def rpc(method):
    """Map our exceptions to status codes, for unary and streaming handlers alike."""
    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def stream(self, request, context):
            try:
                yield from method(self, request, context)
            except Exception as e:
                self.metrics.request("grpc", method.__name__, status_name(e))
                _abort(context, e)
            self.metrics.request("grpc", method.__name__, "OK")

        return stream

    @functools.wraps(method)
    def unary(self, request, context):
        try:
            result = method(self, request, context)
        except Exception as e:
            self.metrics.request("grpc", method.__name__, status_name(e))
            _abort(context, e)
        self.metrics.request("grpc", method.__name__, "OK")
        return result

    return unary


def settings_dict(msg: pb.SessionSettings) -> dict:
    """The fields the client set, as a partial SessionConfig dict."""
    out: dict = {"memory": msg.memory} if msg.memory else {}  # "" (or unset): the server's default preset
    for section in SECTIONS:
        sub = getattr(msg, section)
        values = {f.name: list(v) if f.is_repeated else v for f, v in sub.ListFields()}
        if values:
            out[section] = values
    return check_caps(out)


def progress_message(report: ChunkReport, session) -> pb.ChunkProgress:
    progress = chunk_progress(report, session)
    return pb.ChunkProgress(
        **{
            **progress,
            "loss_after": math.nan if report.loss_after is None else report.loss_after,
            "error": report.error or "",
        }
    )


# SessionInfo fields the proto names otherwise; the rest keep their names.
PROTO_NAMES = {"id": "session_id", "fast_weight_bytes": "bytes"}


def info_message(info: dict) -> pb.SessionInfo:
    """A session's info (registry.info) as the proto message: no field is optional there, None becomes 0 or ""."""
    fields = {PROTO_NAMES.get(k, k): v for k, v in info.items()}
    for name in ("last_loss_before", "last_loss_after"):
        loss = fields[name]
        fields[name] = 0.0 if loss is None or math.isnan(loss) else loss
    fields["restored_from"] = fields["restored_from"] or ""
    return pb.SessionInfo(**fields)


class Watchdog:
    """Cancels an RPC whose client keeps it waiting for its next message too long.

    A blocked read of a gRPC request iterator cannot time out by itself, and while it waits it holds one of the
    server's threads. Time spent on the server (training a chunk) is not counted: only the reads are watched.
    """

    def __init__(self, context):
        self.context = context
        self.deadline = math.inf  # monotonic time when the read in progress is too late
        self._done = threading.Event()

    def __enter__(self) -> Watchdog:
        threading.Thread(target=self._run, name="ttt-ingest-watchdog", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()

    def _run(self) -> None:
        while not self._done.wait(min(1.0, max(0.0, self.deadline - time.monotonic()))):
            if time.monotonic() >= self.deadline:
                self.context.cancel()  # the blocked read returns
                return

    def watch(self, requests: Iterator, first_seconds: float, seconds: float) -> Iterator:
        """``requests``, each read allowed ``seconds`` (the first ``first_seconds``); StreamIdle when one is late."""
        allowed = first_seconds
        while True:
            self.deadline = time.monotonic() + allowed
            try:
                message = next(requests, None)
            except grpc.RpcError:  # after a cancel the iterator may raise instead of ending
                if time.monotonic() < self.deadline:
                    raise
                message = None
            late, self.deadline = time.monotonic() >= self.deadline, math.inf
            if late:
                raise StreamIdle(f"no message within {allowed:g} s: the stream was cancelled")
            if message is None:
                return
            yield message
            allowed = seconds


class SessionsService(pb_grpc.SessionsServicer):
    """The gRPC door: messages to ``server.service.SessionService`` calls and back."""

    def __init__(self, state):
        """``state``: the running ``server.main.ServerState``."""
        self.sessions, self.keyring, self.settings, self.metrics = (
            state.sessions,
            state.keyring,
            state.settings,
            state.metrics,
        )

    def _user(self, context) -> str:
        auth = dict(context.invocation_metadata()).get("authorization")
        return self.keyring.user_for(auth)

    @rpc
    def CreateSession(self, request, context):
        user = self._user(context)
        sid = check_session_id(request.session_id) if request.session_id else None
        adapter = None
        if request.HasField("adapter"):
            adapter = {
                "adapter_config.json": request.adapter.adapter_config,
                "adapter_model.safetensors": request.adapter.adapter_model,
            }
        return info_message(self.sessions.create(user, sid, settings_dict(request.settings), adapter).result())

    @rpc
    def GetSession(self, request, context):
        return info_message(self.sessions.info(self._user(context), request.session_id))

    @rpc
    def ListSessions(self, request, context):
        return pb.ListSessionsResponse(sessions=[info_message(i) for i in self.sessions.list(self._user(context))])

    @rpc
    def DeleteSession(self, request, context):
        self.sessions.delete(self._user(context), request.session_id).result()
        return pb.DeleteSessionResponse()

    @rpc
    def SaveSession(self, request, context):
        return info_message(self.sessions.save(self._user(context), request.session_id).result())

    @rpc
    def ResetSession(self, request, context):
        return info_message(self.sessions.reset(self._user(context), request.session_id).result())

    @rpc
    def Ingest(self, request_iterator, context):
        user = self._user(context)
        s = self.settings
        # The slot is taken before the first read: idle streams count against their user from the start.
        with self.sessions.stream_slot(user), Watchdog(context) as watchdog:
            requests = watchdog.watch(request_iterator, s.ingest_start_seconds, s.ingest_idle_seconds)
            first = next(requests, None)
            if first is None or first.WhichOneof("message") != "start":
                raise ValueError("the first message of an Ingest stream must be `start`")
            start = first.start
            sid = check_session_id(start.session_id)
            with self.sessions.feeding(user, sid):
                opening = self.sessions.open_feed(
                    user,
                    sid,
                    requested=settings_dict(start.settings),
                    create_if_missing=start.create_if_missing,
                    is_active=context.is_active,
                    time_left=context.time_remaining,  # grpc: ~1e19 s without a deadline (never due)
                )
                feed = result_for_client(opening, context.is_active)
                if feed is None:
                    return  # the client has gone while the device was busy
                yield from self._ingest(feed, start, requests, context)

    def _ingest(self, feed: DocumentFeed, start: pb.IngestStart, request_iterator, context):
        session = feed.session
        for request in request_iterator:
            kind = request.WhichOneof("message")
            if kind == "start":
                raise ValueError("`start` may only be the first message")
            piece = list(request.tokens.ids) if kind == "tokens" else getattr(request, kind) if kind else None
            for report in feed.add(piece):
                yield pb.IngestResponse(chunk=progress_message(report, session))
            if not context.is_active():
                return  # cancelled: trained chunks stay, the rest stays pending for the next stream
        if not context.is_active():
            return  # cancelled while the client was silent (Watchdog): the document is not ended
        if start.end_of_document:
            for report in feed.end():
                yield pb.IngestResponse(chunk=progress_message(report, session))
        yield pb.IngestResponse(summary=pb.IngestSummary(**feed.summary()))
