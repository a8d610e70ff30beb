"""Documents uploaded over HTTP: the body is read piece by piece while the chunks it completes train, and the
answer is either every chunk's progress at the end or, with ``Accept: text/event-stream``, one event per chunk."""

from __future__ import annotations

import asyncio
from asyncio import wrap_future
from collections.abc import AsyncGenerator

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from starlette.requests import ClientDisconnect

from server.http.common import caller, failure_event, finite, sse, wants_events
from server.http.models import DOCUMENT_STREAM, DocumentSummary

router = APIRouter()


class UploadBody:
    """A request body read by a task of its own while the response streams: its pieces (a few held at a time),
    then ``gone`` once the client leaves. (Starlette's streaming response would read the body itself to watch for
    the client leaving; one reader owns ``receive`` here instead.)"""

    def __init__(self, request: Request):
        self.gone = False
        self._pieces: asyncio.Queue = asyncio.Queue(maxsize=4)
        self._reader = asyncio.create_task(self._read(request.receive))

    async def _read(self, receive) -> None:
        try:
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
            while (await receive())["type"] != "http.disconnect":  # also what the server says once it has answered
                pass
        except Exception as e:  # the reader never dies silently: the route would wait for a piece forever
            await self._pieces.put(e)
        self.gone = True

    async def __aiter__(self):
        while (piece := await self._pieces.get()) is not None:
            if isinstance(piece, Exception):
                raise piece
            yield piece

    def close(self) -> None:
        self._reader.cancel()


class UploadEvents(StreamingResponse):
    """An upload's events as server-sent events, sent while the request body is still being read (by
    ``UploadBody``: Starlette's response would read ``receive`` itself to watch for the client leaving). The
    events are closed, the session's stream released, however the response ends, even before its first byte."""

    def __init__(self, request: Request, started: dict, events: AsyncGenerator[dict, None]):
        self.events = events
        super().__init__(self._sse(request, started, events), media_type="text/event-stream")

    @staticmethod
    async def _sse(request: Request, started: dict, events: AsyncGenerator[dict, None]):
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
        yield "data: [DONE]\n\n"

    async def __call__(self, scope, receive, send):
        try:
            await self.stream_response(send)
        except OSError:  # how a server of ASGI spec 2.4 says the client has gone
            raise ClientDisconnect() from None
        finally:
            await self.body_iterator.aclose()
            await self.events.aclose()  # no further chunk is pulled


async def document_events(state, request: Request, user: str, sid: str, end_of_document: bool, offset: int | None):
    """``document.started`` (once the stream slot and the session are held: refusals come before it), a
    ``document.chunk`` per trained chunk, then ``document.summary``."""
    with state.sessions.stream_slot(user), state.sessions.feeding(user, sid):
        feed = await wrap_future(state.sessions.open_feed(user, sid, document_offset=offset))
        session = feed.session
        yield {
            "object": "document.started",
            "session_id": sid,
            "tokens_ingested": session.stats.tokens_ingested,
            "pending_tokens": len(session.pending),
            "document_bytes": session.text_stream.bytes_received,
        }
        body = UploadBody(request)
        try:
            async for event in feed.events(body, end_of_document, gone=lambda: body.gone):
                yield finite(event)
        finally:
            body.close()


@router.post("/v1/sessions/{session_id}/documents", response_model=DocumentSummary, responses=DOCUMENT_STREAM)
async def add_document(
    session_id: str,
    request: Request,
    end_of_document: bool = True,
    document_offset: int | None = Query(
        None,
        ge=0,
        description="where this body starts in the session's unfinished document (its "
        "document_bytes): another value is a 409 and nothing is read, so a resumed upload never repeats bytes",
    ),
):
    """A ``text/plain`` body, read as a stream and chunked as over gRPC. Answers when it is ingested, with
    every chunk's progress; with ``Accept: text/event-stream``, one event per chunk as it trains. One document
    stream per session at a time (409)."""
    state, user, sid = caller(request, session_id)
    events = document_events(state, request, user, sid, end_of_document, document_offset)
    started = await anext(events)  # an unknown session, a stream too many: refused before the 200
    if wants_events(request):
        return UploadEvents(request, started, events)
    chunks, summary = [], {}
    async for event in events:  # to its end: the stream slot and the pin are released there
        kind = event.pop("object")
        if kind == "document.chunk":
            chunks.append(event)
        else:
            summary = event
    return {**summary, "chunks": chunks}
