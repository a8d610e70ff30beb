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
expire (``TTT_LEASE_SECONDS``), after which any replica loads them from their last checkpoint. The fronts are in
server/ray_fronts.py; docs/scale-out.md has the failure model.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import threading
import time
from collections.abc import Callable
from concurrent import futures

import grpc
import ray
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from ray import serve

from server.auth import KeyRing
from server.errors import NotFound
from server.ray_fronts import MAX_ONGOING, SERVICE, Front, GrpcFront, Locator, Refused
from server.settings import Settings
from ttt.lease import LeaseHeld, check_free

log = logging.getLogger(__name__)
APP = "ttt"
SESSIONS_PER_REPLICA = 256  # sessions a replica keeps for Serve's multiplexing before its LRU parks one


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


# Routing by session must not fall back for lack of room; stopping saves every changed session, which takes time.
@serve.deployment(max_ongoing_requests=MAX_ONGOING, graceful_shutdown_timeout_s=300)
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
            except Exception as e:  # what the door would answer: the store away, a damaged session, a full queue
                return {"refused": vars(Refused.of(e))}
        return self.address

    def __del__(self):
        self.server.stop()


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
    front = Front.options(ray_actor_options={"num_cpus": 0})  # it only passes bytes on: no core of its own
    serve.run(front.bind(replica, replica_settings), name=APP, route_prefix="/")
    return serve.get_deployment_handle("Replica", app_name=APP)


def start_grpc_front(settings: Settings, replicas) -> tuple[grpc.Server, int, Callable[[], None]]:
    """The gRPC front on settings' host and grpc_port: (server, bound port, stop)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="ttt-grpc-front", daemon=True)
    thread.start()
    locate = Locator(replicas, KeyRing(settings.api_keys_file), settings.lease_seconds + 5)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=settings.grpc_threads))
    front = GrpcFront(locate, loop)
    server.add_generic_rpc_handlers([front])
    probes = health.HealthServicer()  # the same health service as `ttt serve`'s, for the same probes
    health_pb2_grpc.add_HealthServicer_to_server(probes, server)
    port = server.add_insecure_port(f"{settings.host}:{settings.grpc_port}")
    server.start()
    for name in ("", SERVICE.full_name):
        probes.set(name, health_pb2.HealthCheckResponse.SERVING)

    def stop() -> None:
        probes.enter_graceful_shutdown()
        server.stop(5).wait()
        front.close()
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
