"""The fronts of ``ttt serve --ray`` (server/ray_app.py): they find the replica that holds a request's session and
pass the request on to that replica's own door, as bytes.

``Locator`` asks the replicas' deployment handle, routed by ``multiplexed_model_id="<user>/<session>"``; ``Front``
is the HTTP ingress deployment behind Serve's HTTP proxy; ``GrpcFront`` the ``ttt.v1.Sessions`` service in the
``ttt serve --ray`` process. A front reads only what names the session: a path, a small JSON body's ``model`` or
``id``, or the first message of an ``Ingest`` stream.
"""

# No ``from __future__ import annotations``: Serve's ingress rebuilds the route methods, and FastAPI must see
# ``request: Request`` as a class, not a string, to hand the request over.
import asyncio
import json
import logging
import re
import threading
import time
import uuid

import grpc
import httpx
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from google.protobuf import message_factory
from ray import serve

from server.auth import KeyRing
from server.errors import INTERNAL, AuthError, TooLarge, message_of, status_of
from server.http.common import error_response
from server.proto.ttt.v1 import ttt_pb2 as pb
from server.settings import Settings
from ttt.lease import LeaseHeld

log = logging.getLogger(__name__)
SESSION_PATH = re.compile(r"^/v1/sessions/([^/]+)")
MAX_ONGOING = 1000  # requests one replica or front takes at once
CONNECT_SECONDS = 3.0  # a replica's door that does not connect within this is taken for dead
# Headers of one connection, not passed on. The client's Host is: the replica's open-mode check of Host and Origin
# (server/guard.py: DNS rebinding, foreign pages) must judge the client's request, not the front's.
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "content-length"}


class Refused(Exception):
    """What a front answers instead of passing a request on: the status the replica's door would have given."""

    def __init__(self, http: int, grpc: str, kind: str, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.http, self.grpc, self.kind, self.message, self.retry_after = http, grpc, kind, message, retry_after

    @classmethod
    def of(cls, e: Exception, retry_after: float | None = None) -> "Refused":
        status = status_of(e)
        if status is INTERNAL:
            log.error("locating a session failed", exc_info=e)
        return cls(status.http, status.grpc, status.kind, message_of(e), retry_after)


class Locator:
    """Finds the replica for a session through the deployment handle. Serve routes by session to the replica that
    holds it once it has heard so; until then a replica that finds the lease taken answers with the holder's doors
    (from the lease). A replica the front cannot reach (``unreachable``: it died) is waited out: its lease expires,
    then any replica loads the session. Refused after ``wait`` seconds of that, or at once with the replica's
    refusal."""

    def __init__(self, replicas, keys: KeyRing, wait: float):
        self.replicas, self.keys, self.wait = replicas, keys, wait
        self.base_model: str | None = None

    async def __call__(self, authorization: str | None, session_id: str | None, unreachable: set[str]) -> dict:
        handle = self.replicas
        if session_id and session_id != self.base_model:
            try:
                user = self.keys.user_for(authorization)  # 401 before any replica loads anything
            except AuthError as e:
                raise Refused.of(e) from None
            handle = handle.options(multiplexed_model_id=f"{user}/{session_id}")
        deadline = time.monotonic() + self.wait
        while True:
            found = await handle.locate.remote()
            if "refused" in found:
                raise Refused(**found["refused"])
            target = found["holder"] if "held" in found else found
            if target is not None and target["replica"] not in unreachable:
                self.base_model = target["base_model"]
                return target
            wait = found.get("retry_after", 1.0)
            if time.monotonic() + 0.5 > deadline:
                gone = found.get("held") or "the replica for this session does not answer: retry"
                raise Refused.of(LeaseHeld(gone, "", time.time() + wait), retry_after=wait)
            await asyncio.sleep(min(0.5 + wait, 2.0, max(0.0, deadline - time.monotonic())))


# ---- the HTTP front --------------------------------------------------------------------------------------------

front_app = FastAPI(title="ttt (Ray Serve front)", docs_url=None, redoc_url=None, openapi_url=None)


async def _relayed(upstream: httpx.Response):
    """The replica's response as it comes; its connection is given back however the relay ends (a client that
    leaves cancels it)."""
    try:
        async for piece in upstream.aiter_raw():
            yield piece
    finally:
        await upstream.aclose()


# What a route method calls is defined above it: Serve's ingress copies the class when it is defined (a helper
# defined below it was a NameError at the first request).
@serve.deployment(max_ongoing_requests=MAX_ONGOING)
@serve.ingress(front_app)
class Front:
    """Sends each HTTP request to the replica that holds its session (any replica when it names none)."""

    def __init__(self, replicas, settings: dict):
        s = Settings(**settings)
        self.locate = Locator(replicas, KeyRing(s.api_keys_file), s.lease_seconds + 5)
        self.max_body = s.max_request_bytes
        # As many connections as requests at once (streams hold theirs), and never a wait without end for one.
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(None, connect=CONNECT_SECONDS, pool=60.0),
            limits=httpx.Limits(max_connections=MAX_ONGOING, max_keepalive_connections=64),
        )

    @front_app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
    async def forward(self, request: Request, path: str):
        try:
            return await self._forward(request)
        except Refused as e:
            response = error_response(e.http, e.kind, e.message)
            if e.retry_after is not None:
                response.headers["retry-after"] = str(max(1, round(e.retry_after)))
            return response

    async def _forward(self, request: Request) -> StreamingResponse:
        body, session_id = await self._session_of(request)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_HEADERS]
        unreachable: set[str] = set()
        while True:
            target = await self.locate(request.headers.get("authorization"), session_id, unreachable)
            upstream = self.client.build_request(
                request.method,
                f"{target['http']}{request.url.path}",
                params=request.query_params,
                headers=headers,
                content=body if body is not None else request.stream(),
            )
            try:
                upstream = await self.client.send(upstream, stream=True)
                break
            except (httpx.ConnectError, httpx.ConnectTimeout):  # died (nothing of the body was read): wait it out
                unreachable.add(target["replica"])
        return StreamingResponse(
            _relayed(upstream),
            status_code=upstream.status_code,
            headers={k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS - {"content-length"}},
        )

    async def _session_of(self, request: Request) -> tuple[bytes | None, str | None]:
        """The session the request is about, and its body when it had to be read to say (None: stream it on).

        The path names it (``/v1/sessions/{id}/...``), or a small JSON body does: ``model`` of a chat or completion,
        ``id`` of a new session (one is picked here when absent, so that the session is born where it is routed).
        """
        path = request.url.path
        if match := SESSION_PATH.match(path):
            return None, match.group(1)
        if request.method != "POST" or path not in ("/v1/sessions", "/v1/chat/completions", "/v1/completions"):
            return None, None
        if int(request.headers.get("content-length") or 0) > self.max_body:
            return None, None  # the replica refuses it (413) as it streams in
        body = b""
        async for piece in request.stream():  # bounded: a body without a length is read no further than the limit
            body += piece
            if len(body) > self.max_body:
                raise Refused.of(TooLarge(f"request body over {self.max_body} bytes"))
        try:
            doc = json.loads(body)
        except ValueError:
            return body, None  # the replica says what is wrong with it
        if not isinstance(doc, dict):
            return body, None
        if path == "/v1/sessions":
            if doc.get("id") is None:
                doc["id"] = uuid.uuid4().hex
                body = json.dumps(doc).encode()
            return body, str(doc["id"])
        model = doc.get("model")
        return body, model if isinstance(model, str) else None


# ---- the gRPC front --------------------------------------------------------------------------------------------

SERVICE = pb.DESCRIPTOR.services_by_name["Sessions"]


def _request_type(method: str):
    return message_factory.GetMessageClass(SERVICE.methods_by_name[method].input_type)


class GrpcFront(grpc.GenericRpcHandler):
    """The ``ttt.v1.Sessions`` service of every replica behind one port: each call (each ``Ingest`` stream, whole)
    goes to the replica that holds its session, as bytes (nothing is parsed but the session id)."""

    def __init__(self, locate: Locator, loop: asyncio.AbstractEventLoop):
        self.locate, self.loop = locate, loop
        self.channels: dict[str, grpc.Channel] = {}  # by replica door
        self.lock = threading.Lock()

    def service(self, details):
        service, _, method = details.method.rpartition("/")
        if service != f"/{SERVICE.full_name}" or method not in SERVICE.methods_by_name:
            return None
        if method == "Ingest":
            return grpc.stream_stream_rpc_method_handler(self._ingest)
        return grpc.unary_unary_rpc_method_handler(lambda request, context: self._unary(method, request, context))

    def _channel(self, context, authorization: str | None, session_id: str | None) -> grpc.Channel:
        """A channel to the replica that holds the session (connected: nothing is sent to one that died)."""
        unreachable: set[str] = set()
        while True:
            found = asyncio.run_coroutine_threadsafe(self.locate(authorization, session_id, unreachable), self.loop)
            try:
                target = found.result()
            except Refused as e:
                context.abort(grpc.StatusCode[e.grpc], e.message)
            with self.lock:
                channel = self.channels.get(target["grpc"])
                if channel is None:
                    channel = self.channels[target["grpc"]] = grpc.insecure_channel(target["grpc"])
            ready = grpc.channel_ready_future(channel)
            try:
                ready.result(timeout=CONNECT_SECONDS)
                return channel
            except grpc.FutureTimeoutError:
                ready.cancel()
                unreachable.add(target["replica"])
                with self.lock:
                    self.channels.pop(target["grpc"], None)
                channel.close()

    def close(self) -> None:
        with self.lock:
            channels, self.channels = list(self.channels.values()), {}
        for channel in channels:
            channel.close()

    def _unary(self, method: str, request: bytes, context):
        message = _request_type(method).FromString(request)
        if method == "CreateSession" and not message.session_id:  # named here: born where it is routed
            message.session_id = uuid.uuid4().hex
            request = message.SerializeToString()
        metadata = _forwarded(context.invocation_metadata())
        channel = self._channel(context, _authorization(metadata), getattr(message, "session_id", "") or None)
        call = channel.unary_unary(f"/{SERVICE.full_name}/{method}")
        try:
            return call(request, metadata=metadata, timeout=_deadline(context))
        except grpc.RpcError as e:  # the replica's status and message, as this call's
            context.abort(e.code(), e.details())

    def _ingest(self, requests, context):
        first = next(requests, None)
        if first is None:
            return
        message = pb.IngestRequest.FromString(first)
        session_id = None
        if message.WhichOneof("message") == "start":
            if not message.start.session_id:  # named here: born where it is routed
                message.start.session_id = uuid.uuid4().hex
                first = message.SerializeToString()
            session_id = message.start.session_id
        metadata = _forwarded(context.invocation_metadata())
        channel = self._channel(context, _authorization(metadata), session_id)
        stream = channel.stream_stream(f"/{SERVICE.full_name}/Ingest")

        def pieces():
            yield first
            yield from requests

        responses = stream(pieces(), metadata=metadata, timeout=_deadline(context))
        context.add_callback(responses.cancel)  # the client left: so does the stream to the replica
        try:
            yield from responses
        except grpc.RpcError as e:  # the replica's status (UNAVAILABLE when it died), as this stream's
            context.abort(e.code(), e.details())


def _deadline(context) -> float | None:
    """The caller's time left, for the call to the replica (None: the caller set no deadline, which gRPC reports
    as a time left too large to pass on)."""
    left = context.time_remaining()
    return left if left is not None and left < 86_400 else None


def _forwarded(metadata) -> list[tuple[str, str]]:
    """The caller's metadata but what gRPC sets itself."""
    return [(k, v) for k, v in metadata if not k.startswith((":", "grpc-")) and k != "user-agent"]


def _authorization(metadata) -> str | None:
    return next((v for k, v in metadata if k == "authorization"), None)
