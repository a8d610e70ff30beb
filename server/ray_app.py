"""Sessions served by a Ray Serve cluster (``ttt serve --ray``): one engine per replica, sessions multiplexed by id.

    HTTP client --> Ray Serve's HTTP proxy --> Front ----locate("<user>/<session>")----> Replica x N
                                                  \\--- the request, streamed as it comes ---> that replica's HTTP door
    gRPC client --> GrpcFront (this process) ------locate----> Replica; the call or stream --> its gRPC door

Each Replica runs a whole ``server.main.Server`` (engine, registry, scheduler, both doors) on private ports, over
one session store that all replicas share (``--store``, ``ttt.storage``). Placement goes through Ray: ``locate`` is
called through the deployment handle with ``multiplexed_model_id="<user>/<session>"``, so Serve routes it to the
replica that holds the session (model multiplexing); that replica loads it on first use, taking its lease
(``ttt.lease``), and answers with its doors' addresses. The request's bytes then go to that door unchanged: every
endpoint, stream, limit and error is the single-process server's own, and an ingest stream stays on the replica
that holds the session's lease until it ends. When Serve's LRU drops a session from a replica, or the replica shuts
down, the session is saved and its lease released; a replica that dies holds its sessions until their leases
expire (``--lease-seconds``), after which any replica loads them from their last checkpoint. docs/scale-out.md
has the failure model.
"""

# No ``from __future__ import annotations``: Serve's ingress rebuilds the route methods, and FastAPI must see
# ``request: Request`` as a class, not a string, to hand the request over.
import asyncio
import contextlib
import json
import logging
import re
import signal
import threading
import time
import uuid
from collections.abc import Callable
from concurrent import futures

import grpc
import httpx
import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from google.protobuf import message_factory
from ray import serve
from starlette.background import BackgroundTask

from server.auth import KeyRing
from server.errors import AuthError, NotFound
from server.proto.ttt.v1 import ttt_pb2 as pb
from server.settings import Settings
from ttt.lease import LeaseHeld, check_free

log = logging.getLogger(__name__)
APP = "ttt"
SESSIONS_PER_REPLICA = 256  # sessions a replica keeps for Serve's multiplexing before its LRU parks one
SESSION_PATH = re.compile(r"^/v1/sessions/([^/]+)")
CONNECT_SECONDS = 3.0  # a replica's door that does not connect within this is taken for dead
HOP_HEADERS = {"host", "connection", "keep-alive", "transfer-encoding", "te", "upgrade", "content-length"}


# ---- replicas --------------------------------------------------------------------------------------------------


class Held:
    """A session one replica holds for Serve's multiplexer. When Serve's LRU lets it go, the session is saved and its
    lease released (``registry.park``), so that the next replica Serve picks can load it."""

    def __init__(self, server, user: str, session_id: str):
        self.server, self.key = server, (user, session_id)
        self.released = False

    def __del__(self):  # called by Serve when it lets the session go, and again when garbage collected
        if self.released:
            return
        self.released = True
        state = self.server.state
        with contextlib.suppress(Exception):  # shutting down: Server.stop saves and releases every session
            state.scheduler.submit(self.key, state.registry.park, *self.key)


@serve.deployment(max_ongoing_requests=1000)  # routing by session must not fall back for lack of room
class Replica:
    """One engine, its sessions and its private doors (``server.main.Server``)."""

    def __init__(self, settings: dict):
        from server.main import Server

        replica = serve.get_replica_context().replica_id.unique_id
        self.server = Server(Settings(**{**settings, "grpc_port": 0, "http_port": 0, "replica_id": replica}))
        self.server.start()
        host = self.server.settings.host
        if host in ("0.0.0.0", "::"):  # bound everywhere: the address the other nodes reach this one by
            host = ray.util.get_node_ip_address()
        scheme = "https" if self.server.settings.tls_cert else "http"
        self.address = {
            "replica": replica,
            "http": f"{scheme}://{host}:{self.server.http_port}",
            "grpc": f"{host}:{self.server.grpc_port}",
            "base_model": self.server.state.engine.base.name,
        }
        self.server.state.registry.address = json.dumps(self.address)  # in its leases: where to find it

    @serve.multiplexed(max_num_models_per_replica=SESSIONS_PER_REPLICA)
    async def hold(self, model_id: str) -> Held:
        user, session_id = model_id.split("/", 1)
        await asyncio.to_thread(self._load, user, session_id)
        return Held(self.server, user, session_id)

    def _load(self, user: str, session_id: str) -> None:
        """The session in memory here (LeaseHeld: another replica holds it); a new one is created here later."""
        state = self.server.state
        try:
            state.registry.check_exists(user, session_id)
        except ValueError:  # a bad id: the door answers that request itself
            return
        except NotFound:  # new here; LeaseHeld if another replica created it and has not saved it yet
            check_free(state.registry.folder(user, session_id), state.registry.owner)
            return
        state.scheduler.run((user, session_id), state.registry.get, user, session_id)

    async def locate(self) -> dict:
        """This replica's doors, once it holds the session the call was routed by (or ``held`` and how long)."""
        model_id = serve.get_multiplexed_model_id()
        if model_id:
            try:
                await self.hold(model_id)
            except LeaseHeld as e:  # Serve has not heard yet which replica holds it, or that one died
                holder = json.loads(e.address) if e.address else None
                return {"held": str(e), "retry_after": max(0.0, e.expires - time.time()), "holder": holder}
        return self.address

    def __del__(self):
        self.server.stop()


class Locator:
    """Finds the replica for a session through the deployment handle. Serve routes by session to the replica that
    holds it once it has heard so; until then a replica that finds the lease taken answers with the holder's doors
    (from the lease). A holder the front cannot reach (it died) is waited out: its lease expires, then any replica
    loads the session. Gives up (LeaseHeld) after ``wait`` seconds."""

    def __init__(self, replicas, keys: KeyRing, wait: float):
        self.replicas, self.keys, self.wait = replicas, keys, wait
        self.base_model: str | None = None

    async def __call__(self, authorization: str | None, session_id: str | None, unreachable: set[str]) -> dict:
        handle = self.replicas
        if session_id and session_id != self.base_model:
            user = self.keys.user_for(authorization)  # AuthError: 401 before any replica loads anything
            handle = handle.options(multiplexed_model_id=f"{user}/{session_id}")
        deadline = time.monotonic() + self.wait
        while True:
            found = await handle.locate.remote()
            if "held" not in found:
                self.base_model = found["base_model"]
                return found
            if found["holder"] and found["holder"]["replica"] not in unreachable:
                return found["holder"]
            if time.monotonic() + 0.5 > deadline:
                raise LeaseHeld(found["held"], "", time.time() + found["retry_after"])
            await asyncio.sleep(min(0.5 + found["retry_after"], 2.0, max(0.0, deadline - time.monotonic())))


# ---- the HTTP front --------------------------------------------------------------------------------------------

front_app = FastAPI(title="ttt (Ray Serve front)", docs_url=None, redoc_url=None, openapi_url=None)


def error_response(status: int, kind: str, message: str, **headers) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


@serve.deployment(max_ongoing_requests=1000)
@serve.ingress(front_app)
class Front:
    """Sends each HTTP request to the replica that holds its session (any replica when it names none)."""

    def __init__(self, replicas, settings: dict):
        s = Settings(**settings)
        self.locate = Locator(replicas, KeyRing(s.api_keys_file), s.lease_seconds + 5)
        self.max_body = s.max_request_bytes
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=CONNECT_SECONDS))

    @front_app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
    async def forward(self, request: Request, path: str):
        body, session_id = await self._session_of(request)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_HEADERS]
        unreachable: set[str] = set()
        while True:
            try:
                target = await self.locate(request.headers.get("authorization"), session_id, unreachable)
            except AuthError as e:
                return error_response(401, "authentication_error", str(e))
            except LeaseHeld as e:
                wait = str(max(1, round(e.expires - time.time())))
                return error_response(503, "service_unavailable", str(e), **{"retry-after": wait})
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
            except httpx.ConnectError:  # the holder died (nothing of the body was read): wait out its lease
                unreachable.add(target["replica"])
        return StreamingResponse(
            upstream.aiter_raw(),
            status_code=upstream.status_code,
            headers={k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS - {"content-length"}},
            background=BackgroundTask(upstream.aclose),
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
        body = await request.body()
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
        self.channels: dict[str, grpc.Channel] = {}

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
            except AuthError as e:
                context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
            except LeaseHeld as e:
                context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
            address = target["grpc"]
            if address not in self.channels:
                self.channels[address] = grpc.insecure_channel(address)
            try:
                grpc.channel_ready_future(self.channels[address]).result(timeout=CONNECT_SECONDS)
                return self.channels[address]
            except grpc.FutureTimeoutError:
                unreachable.add(target["replica"])

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


# ---- ttt serve --ray -------------------------------------------------------------------------------------------


def deploy(settings: Settings, replicas: int, gpus_per_replica: float = 0.0, cpus_per_replica: float = 1.0):
    """Deploy the replicas and the HTTP front on the connected Ray cluster (Serve's proxy on settings' host and
    http_port); returns the replicas' handle."""
    if settings.store is None:
        log.warning("no --store: replicas share %s/users (a folder every node must see)", settings.data_dir)
    serve.start(http_options={"host": settings.host, "port": settings.http_port})
    replica_settings = settings.model_dump(mode="json")
    replica = Replica.options(
        num_replicas=replicas, ray_actor_options={"num_gpus": gpus_per_replica, "num_cpus": cpus_per_replica}
    ).bind(replica_settings)
    serve.run(Front.bind(replica, replica_settings), name=APP, route_prefix="/")
    return serve.get_deployment_handle("Replica", app_name=APP)


def start_grpc_front(settings: Settings, replicas) -> tuple[grpc.Server, int, Callable[[], None]]:
    """The gRPC front on settings' host and grpc_port: (server, bound port, stop)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="ttt-grpc-front", daemon=True)
    thread.start()
    locate = Locator(replicas, KeyRing(settings.api_keys_file), settings.lease_seconds + 5)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=settings.grpc_threads))
    server.add_generic_rpc_handlers([GrpcFront(locate, loop)])
    port = server.add_insecure_port(f"{settings.host}:{settings.grpc_port}")
    server.start()

    def stop() -> None:
        server.stop(5).wait()
        loop.call_soon_threadsafe(loop.stop)

    return server, port, stop


def serve_ray(settings: Settings, replicas: int, address: str | None, gpus_per_replica: float) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.tls_cert is not None:
        raise SystemExit("--ray does not serve TLS yet: put a TLS-terminating proxy in front of it")
    ray.init(address=address)
    handle = deploy(settings, replicas, gpus_per_replica)
    _, port, stop = start_grpc_front(settings, handle)
    log.info("Ray Serve: %d replicas; HTTP %s:%d, gRPC %d", replicas, settings.host, settings.http_port, port)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    stop()
    serve.delete(APP)  # each replica stops its server: saves its sessions, releases their leases
