"""`ttt serve`: one engine, one scheduler, both front doors (gRPC and HTTP) in one process."""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass

import grpc
import uvicorn
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import ttt
from server.auth import KeyRing
from server.grpc_service import SessionsService
from server.http import create_app
from server.metrics import Metrics
from server.policy import Limits, StreamSlots
from server.proto.ttt.v1 import ttt_pb2, ttt_pb2_grpc
from server.registry import SessionRegistry
from server.scheduler import Scheduler
from server.service import SessionService
from server.settings import Settings
from ttt.decode import DecodeBatch
from ttt.storage import as_folder

log = logging.getLogger("ttt.server")
SERVICE_NAME = ttt_pb2.DESCRIPTOR.services_by_name["Sessions"].full_name


@dataclass
class ServerState:
    """What both front doors share; engine and registry are None while the model loads."""

    settings: Settings
    keyring: KeyRing
    scheduler: Scheduler
    metrics: Metrics
    engine: ttt.Engine | None = None
    registry: SessionRegistry | None = None
    streams: StreamSlots | None = None  # open ingest streams per user
    sessions: SessionService | None = None  # every session operation, for both doors
    # "loading" until both doors accept connections (the readiness probes say so), then "serving", "closing"
    phase: str = "loading"


class Server:
    """Start with ``start()``; ``grpc_port`` / ``http_port`` are the bound ports (useful with port 0)."""

    def __init__(self, settings: Settings):
        if settings.api_keys_file is None and not settings.loopback_only:
            raise SystemExit(f"refusing to serve {settings.host} without --api-keys-file: open mode is loopback only")
        self.settings = settings
        metrics = Metrics(
            lambda: scheduler.depth, lambda: self.state.registry.residency() if self.state.registry else {}
        )
        scheduler = Scheduler(
            settings.max_queue,
            settings.max_batch_sessions,
            metrics.batch_sessions.observe,
            settings.max_queue_per_user,
            unit_share=settings.ingest_share,
            on_answer_step=metrics.answer_rows.observe,
            max_batch_answering=settings.max_batch_sessions_answering,
            max_unit_seconds=settings.max_unit_seconds,
        )
        self.state = ServerState(
            settings,
            KeyRing(settings.api_keys_file),
            scheduler,
            metrics,
            streams=StreamSlots(settings.max_streams_per_user, settings.max_streams),
        )
        self.keyring = self.state.keyring
        self.stopped = threading.Event()

    def start(self) -> None:
        self._start_http()  # first, so that probes answer (503) while the model loads
        self._load_engine()
        self._start_grpc()
        self._autosave = threading.Thread(target=self._autosave_loop, name="ttt-autosave", daemon=True)
        self._autosave.start()
        self.state.phase = "serving"
        s, base = self.settings, self.state.engine.base
        mode = "open (no API keys, loopback only)" if self.keyring.open else f"API keys from {s.api_keys_file}"
        mode += ", TLS" if s.tls_cert is not None else ", no TLS"
        log.info(
            "serving %s on %s (%s): gRPC %d, HTTP %d; %s; sessions in %s (as %s)",
            base.name,
            base.device,
            str(base.dtype).removeprefix("torch."),
            self.grpc_port,
            self.http_port,
            mode,
            self.state.registry.root,
            self.state.registry.owner,
        )
        log.info("web console: %s", self.console_url)

    def _load_engine(self) -> None:
        """The model, the answers' decode batch and the sessions' registry and service, into the shared state."""
        s = self.settings
        # loaded by the device thread, which runs every forward after: a bf16 model loaded by another thread
        # decoded 1.5x slower on a CPU (oneDNN keeps state per thread; one row 43 ms a step against 63-71 ms)
        engine = self.state.scheduler.run_setup(ttt.load_engine, s.model, s.device, s.dtype)
        answers = DecodeBatch(
            engine.base.model,
            kv_budget=s.answer_kv_bytes,
            max_rows=s.max_answer_rows,
            prefill_chunk=s.prefill_chunk_tokens,
        )
        self.state.metrics.watch_answers(answers)
        self.state.metrics.watch_prefixes(engine.answer_prefixes)
        self.state.scheduler.answers = answers  # before the doors say ready: no answer is queued until then
        limits = Limits(
            s.max_sessions_per_user,
            s.max_bytes_per_user,
            s.device_budget_bytes,
            s.host_budget_bytes,
            s.max_session_bytes,
            s.max_memory_bytes_per_user,
        )
        registry = SessionRegistry(
            engine,
            s.data_dir,
            s.session_defaults,
            limits,
            self.state.metrics,
            busy=self.state.scheduler.waiting,
            store=as_folder(s.store, **s.store_options) if s.store else None,
            owner=s.replica_id,
            lease_seconds=s.lease_seconds,
        )
        self.state.engine, self.state.registry = engine, registry
        self.state.sessions = SessionService(self.state)

    def _start_grpc(self) -> None:
        s = self.settings
        options = [
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", s.max_message_bytes),
            # pings find clients that vanished without closing (their streams then end and free a thread)
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ]
        # Beyond the threads, calls wait in a bounded line; past it they get RESOURCE_EXHAUSTED at once.
        self.grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=s.grpc_threads),
            options=options,
            maximum_concurrent_rpcs=2 * s.grpc_threads,
        )
        ttt_pb2_grpc.add_SessionsServicer_to_server(SessionsService(self.state), self.grpc)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc)
        address = f"{s.host}:{s.grpc_port}"
        if s.tls_cert is not None:
            credentials = grpc.ssl_server_credentials([(s.tls_key.read_bytes(), s.tls_cert.read_bytes())])
            self.grpc_port = self.grpc.add_secure_port(address, credentials)
        else:
            self.grpc_port = self.grpc.add_insecure_port(address)
        self.grpc.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    @property
    def console_url(self) -> str:
        """The page at / of the HTTP door (a wildcard bind address is reached on loopback from this machine)."""
        host = "127.0.0.1" if self.settings.host in ("0.0.0.0", "::", "") else self.settings.host
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.settings.tls_cert is not None else 'http'}://{host}:{self.http_port}/"

    def _start_http(self) -> None:
        s = self.settings
        config = uvicorn.Config(
            create_app(self.state),
            host=s.host,
            port=s.http_port,
            log_level="warning",
            ssl_certfile=s.tls_cert,
            ssl_keyfile=s.tls_key,
        )
        self.http = uvicorn.Server(config)
        self.http.install_signal_handlers = lambda: None  # signals are ours (see serve())
        self._http_thread = threading.Thread(target=self.http.run, name="ttt-http", daemon=True)
        self._http_thread.start()
        while not self.http.started and self._http_thread.is_alive():
            self.stopped.wait(0.05)
        if not self.http.started:
            raise SystemExit(f"HTTP server could not start on {s.host}:{s.http_port}")
        self.http_port = self.http.servers[0].sockets[0].getsockname()[1]

    def _autosave_loop(self) -> None:
        registry, scheduler, s = self.state.registry, self.state.scheduler, self.settings
        # A quarter of a lease at most: a lease is renewed at half its time, and one tick may be late.
        while not self.stopped.wait(min(5.0, s.autosave_idle_seconds, s.lease_seconds / 4)):
            try:
                for user, sid in registry.dirty(s.autosave_idle_seconds):
                    scheduler.submit((user, sid), registry.save, user, sid)
                # Sessions grow after they are used (optimizer state, cached keys/values): re-check the budgets.
                scheduler.submit(("", "residency"), registry.enforce_budgets)
            except Exception:  # queue full or shutting down: the next tick or shutdown saves them
                log.warning("autosave or residency check deferred", exc_info=True)
            registry.renew_leases()  # whatever the queue says: each session's errors are its own

    def stop(self, grace: float = 10.0) -> None:
        """Stop accepting, let in-flight chunks finish, save every changed session, exit."""
        if self.stopped.is_set():
            return
        self.state.phase = "closing"
        self.stopped.set()
        self.health.enter_graceful_shutdown()
        self.grpc.stop(grace).wait()
        self.http.should_exit = True
        registry, scheduler = self.state.registry, self.state.scheduler
        saves = [scheduler.submit(key, registry.save, *key) for key in registry.dirty()]
        for f in saves:
            try:
                f.result()
            except Exception:
                log.exception("saving a session at shutdown failed")
        scheduler.shutdown()
        registry.release_all()
        self._http_thread.join(5)
        log.info("stopped; %d sessions saved", len(saves))


def serve(settings: Settings) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = Server(settings)
    server.start()
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    server.stop()
