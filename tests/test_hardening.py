"""Hardening: input that used to reach the engine unchecked (and came back as 500 / INTERNAL) is refused
with a clear error at the door; one user cannot stall the server for others.

Each test here failed before its fix (issue 13's findings). The servers run the tiny random Llama on the CPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx
import pydantic
import pytest
import torch
from conftest import write_keys
from test_grpc_server import CHUNK, Client, Code
from test_grpc_server import running as grpc_running
from test_grpc_server import start as grpc_start
from test_http import (
    QUESTION,
    TINY,
    check_error,
    http,
    log_records,
    metric,
    metric_samples,
    running,
    upload,
)
from texts import book

import ttt
from clients.chat import ChatClient
from clients.client import TTTClient, TTTError
from server.auth import KeyRing
from server.grpc_service import settings_dict
from server.http.models import FastSettings
from server.proto.ttt.v1 import ttt_pb2 as pb
from server.settings import Settings
from ttt.config import FastWeightConfig, SessionConfig
from ttt.engine import check_session_id
from ttt.generate import MAX_STOP_CHARS, MAX_STOPS, SamplingParams
from ttt.peft import AdapterError, peft_session_config
from ttt.session import priced_bytes
from ttt.store import disk_bytes, load_session

KEY_A, KEY_B = "ttt-alice-hardening-key-0123456789", "ttt-bob-hardening-key-9876543210"

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
LORA_KEY = "base_model.model.model.layers.0.mlp.up_proj.lora_{}.weight"


# ---- values that used to pass the checks --------------------------------------------------------


@pytest.mark.parametrize("name", ["nl\n", "a\n", "ok\r\n"])
def test_ids_and_user_names_refuse_a_trailing_newline(name, tmp_path):
    with pytest.raises(ValueError):
        check_session_id(name)
    with pytest.raises(ValueError):
        KeyRing(write_keys(tmp_path, {name: "k"}))


@pytest.mark.parametrize("spec", ["last_fraction:1e308", "last_fraction:nan", "last_fraction:0", "last_fraction:-1"])
def test_layer_fractions_outside_0_1_are_refused(spec):
    with pytest.raises(ValueError, match="fraction"):
        FastWeightConfig(layers=spec).layer_indices(30)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_alpha_is_refused_on_both_doors(value):
    with pytest.raises(ValueError, match="alpha"):
        SessionConfig.from_dict({"fast": {"alpha": value}})
    with pytest.raises(ValueError, match="alpha"):
        settings_dict(pb.SessionSettings(fast=pb.FastWeightSettings(alpha=value)))
    with pytest.raises(pydantic.ValidationError):
        FastSettings(alpha=value)


def _adapter(config: dict, b_shape=(4, 1)) -> tuple[dict, dict]:
    return (
        {"peft_type": "LORA", **config},
        {LORA_KEY.format("A"): torch.zeros(1, 4), LORA_KEY.format("B"): torch.zeros(b_shape)},
    )


@pytest.mark.parametrize(
    "config,b_shape,problem",
    [
        ({"r": [1]}, (4, 1), "r must be"),
        ({"r": True}, (4, 1), "r must be"),
        ({"r": 1}, (4,), "matrices"),
        ({"r": 1, "lora_alpha": "nan"}, (4, 1), "lora_alpha"),
        ({"r": 1, "lora_alpha": None}, (4, 1), "lora_alpha"),
        ({"r": 1, "lora_alpha": float("nan")}, (4, 1), "finite"),
    ],
)
def test_crafted_adapters_are_refused_as_invalid(config, b_shape, problem):
    with pytest.raises(AdapterError, match=problem):
        peft_session_config(*_adapter(config, b_shape))


def test_stop_strings_are_bounded():
    SamplingParams(stop=["x" * MAX_STOP_CHARS] * MAX_STOPS)
    with pytest.raises(ValueError, match="stop"):
        SamplingParams(stop=["x"] * (MAX_STOPS + 1))
    with pytest.raises(ValueError, match="stop"):
        SamplingParams(stop=["x" * (MAX_STOP_CHARS + 1)])


# ---- the HTTP door: key, size and origin before the body -----------------------------------------

LIMIT = 16 << 10  # max_request_bytes of these servers


@pytest.fixture(scope="module")
def open_http(tiny_model_dir, tmp_path_factory):
    with running(tiny_model_dir, tmp_path_factory.mktemp("hardening-open") / "data", max_request_bytes=LIMIT) as server:
        yield server


@pytest.fixture(scope="module")
def keyed_http(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hardening-keyed")
    keys = write_keys(folder, {"alice": KEY_A, "bob": KEY_B})
    with running(
        tiny_model_dir, folder / "data", api_keys_file=keys, max_request_bytes=LIMIT, private_pages=True
    ) as server:
        yield server


def _streamed(pieces: int):
    """A body sent in 64 KB pieces without a Content-Length."""
    for _ in range(pieces):
        yield b" " * (64 << 10)


def test_the_key_is_checked_before_the_body_is_read(keyed_http):
    with http(keyed_http) as anonymous:
        # not JSON at all: without a key that is a 401 (the body was never parsed), not a 400
        check_error(anonymous.post("/v1/sessions", content=b"x" * (LIMIT + 1)), 401)
        check_error(anonymous.post("/v1/sessions", content=_streamed(4)), 401)
    with http(keyed_http, KEY_A) as alice:
        check_error(
            alice.post(
                "/v1/sessions", content=b"{" + b" " * LIMIT + b"}", headers={"content-type": "application/json"}
            ),
            413,
            match="limit",
        )
        r = alice.post("/v1/sessions", content=_streamed(4), headers={"content-type": "application/json"})
        check_error(r, 413, match="limit")  # no Content-Length: cut while it streams in
        assert alice.post("/v1/sessions", json={"id": "fits"}).status_code == 201


def test_a_chunked_body_that_also_declares_a_small_length_is_still_limited(keyed_http):
    """HTTP/1.1 lets Transfer-Encoding: chunked override Content-Length: the bytes are counted, not the header."""
    import socket

    piece = b"x" * 4096
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(2 * LIMIT // len(piece))) + b"0\r\n\r\n"
    head = (
        f"POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY_A}\r\n"
        "Content-Type: application/json\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", keyed_http.http_port), timeout=30) as sock:
        sock.sendall(head + chunks)
        reply = sock.recv(4096)
    assert reply.split(b"\r\n", 1)[0].split()[1] in (b"413", b"400"), reply[:200]  # never parsed as JSON


def test_documents_are_bounded_by_tokens_not_by_the_body_limit(open_http, tokenizer):
    text = book(0, 2 * LIMIT)
    with http(open_http) as api:
        settings = {"ingest": {"chunk_tokens": 1024, "context_tokens": 32}}
        assert api.post("/v1/sessions", json={"id": "big-doc", "settings": settings}).status_code == 201
        summary = upload(api, "big-doc", text.encode()).json()
    assert summary["tokens_ingested"] == len(tokenizer(text, add_special_tokens=False).input_ids)


@pytest.mark.parametrize(
    "headers",
    [
        {"origin": "https://evil.example"},
        {"origin": "null"},
        {"host": "evil.example"},  # a DNS name rebound to 127.0.0.1
        {"host": "evil.example:8000", "origin": "http://evil.example:8000"},
    ],
)
def test_open_mode_refuses_other_web_pages(open_http, headers):
    with http(open_http) as api:
        check_error(api.post("/v1/sessions", json={"id": "csrf"}, headers=headers), 403)
        check_error(
            api.post("/v1/sessions/csrf/documents", content=b"text", headers={**headers, "content-type": "text/plain"}),
            403,
        )
        assert api.get("/v1/sessions/csrf").status_code == 404  # nothing was made
        ok = api.get("/v1/models", headers={"origin": "http://localhost:3000"})
        assert ok.status_code == 200


def test_private_pages_need_a_key(keyed_http):
    with http(keyed_http) as anonymous, http(keyed_http, KEY_B) as bob:
        for path in ("/metrics", "/openapi.json", "/docs"):
            check_error(anonymous.get(path), 401)
            assert bob.get(path).status_code == 200
        assert anonymous.get("/healthz").status_code == 200 and anonymous.get("/readyz").status_code == 200


# ---- answers: off the event loop, stopped when the client leaves, failures counted ----------------


class Paced:
    """Slows the server's decode batch to a decode every 10 ms, keeps every row it saw and fails (with a secret
    message) at decode ``fail_after``."""

    def __init__(self, server, monkeypatch, fail_after: int | None = None):
        self.batch, self.fail_after, self.steps, self.rows = server.state.scheduler.answers, fail_after, 0, []
        self.real_decode = self.batch.decode
        monkeypatch.setattr(self.batch, "decode", self.decode)

    def decode(self):
        if self.steps == self.fail_after:
            raise RuntimeError("secret internal detail")
        time.sleep(0.01)
        self.steps += 1
        self.rows += [r for r in self.batch.rows if r not in self.rows]
        return self.real_decode()


def test_a_non_streaming_answer_stops_when_its_client_leaves(open_http, monkeypatch):
    paced = Paced(open_http, monkeypatch)
    body = {"model": open_http.state.engine.base.name, "messages": QUESTION, "max_tokens": 400}
    with http(open_http) as api:
        with pytest.raises(httpx.ReadTimeout):
            api.post("/v1/chat/completions", json=body, timeout=1.0)
        # the server polls its client every 0.5 s: within seconds the row leaves the batch
        for _ in range(100):
            if paced.rows and not len(paced.batch):
                break
            time.sleep(0.1)
        (row,) = paced.rows
        assert not len(paced.batch) and row.finish_reason is None, "still decoding for a client that left"
        assert row.completion_tokens < 400
        assert api.get("/healthz").status_code == 200


def test_a_streamed_chat_that_fails_after_its_200_is_logged_and_counted(open_http, monkeypatch):
    Paced(open_http, monkeypatch, fail_after=2)
    body = {"model": open_http.state.engine.base.name, "messages": QUESTION, "max_tokens": 5, "stream": True}
    with http(open_http) as api, log_records("ttt.server.http") as logged:
        before = metric_samples(api)
        with api.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert json.loads(events[-1][6:])["error"]["message"] == "internal error"
        after = metric_samples(api)
    assert len(logged) == 1 and "secret internal detail" in str(logged[0].exc_info[1])
    labels = dict(api="http", method="POST /v1/chat/completions")
    assert (
        metric(after, "ttt_requests_total", status="500", **labels)
        == metric(before, "ttt_requests_total", status="500", **labels) + 1
    )


def test_a_huge_prompt_does_not_stall_the_event_loop(open_http, monkeypatch):
    """The chat template and tokenizer of a prompt run in a worker thread: probes answer meanwhile."""
    engine, entered, release = open_http.state.engine, threading.Event(), threading.Event()
    real_prompt = engine.prompt

    def slow_prompt(*args, **kwargs):  # a stand-in for tokenizing megabytes
        entered.set()
        release.wait(30)
        return real_prompt(*args, **kwargs)

    monkeypatch.setattr(engine, "prompt", slow_prompt)
    body = {"model": engine.base.name, "messages": QUESTION, "max_tokens": 1, "stream": True}
    with http(open_http) as api, http(open_http) as probe:
        done = threading.Thread(target=lambda: api.post("/v1/chat/completions", json=body))
        done.start()
        assert entered.wait(30)
        try:
            assert probe.get("/healthz", timeout=5).status_code == 200
        finally:
            release.set()
            done.join(60)


# ---- the gRPC door: idle streams cannot take the server's threads ---------------------------------


class Held:
    """An Ingest stream whose client sends ``first`` messages, then nothing until ``release`` (or the server)."""

    def __init__(self, channel, key: str, first=()):
        self.release = threading.Event()
        self.error: grpc.RpcError | None = None
        self.ended = threading.Event()

        def requests():
            yield from first
            self.release.wait(60)

        def run():
            try:
                for _ in Client(channel, key).stub.Ingest(
                    requests(), timeout=60, metadata=[("authorization", f"Bearer {key}")]
                ):
                    pass
            except grpc.RpcError as e:
                self.error = e
            self.ended.set()

        threading.Thread(target=run, daemon=True).start()


@pytest.fixture(scope="module")
def keyed_grpc(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hardening-grpc")
    keys = write_keys(folder, {"alice": KEY_A, "bob": KEY_B})
    with grpc_running(
        tiny_model_dir,
        folder / "data",
        api_keys_file=keys,
        grpc_threads=4,
        max_streams=3,
        max_streams_per_user=2,
        ingest_start_seconds=2.0,
        ingest_idle_seconds=2.0,
    ) as (server, channel):
        yield server, channel


def test_idle_streams_cannot_stall_other_users(keyed_grpc):
    _server, channel = keyed_grpc
    alice, bob = Client(channel, KEY_A), Client(channel, KEY_B)
    held = [Held(channel, KEY_A), Held(channel, KEY_A)]  # alice's two streams never send their start
    time.sleep(0.5)
    refused = Held(channel, KEY_A)  # a third is over her limit at once, before any message
    assert refused.ended.wait(10) and refused.error.code() == Code.RESOURCE_EXHAUSTED
    held.append(Held(channel, KEY_B))  # three open streams: the server's total
    time.sleep(0.5)
    bob.list()  # unary calls still find a thread
    alice.create("still-served")
    for h in held:  # the server cancels streams that never started
        assert h.ended.wait(10) and h.error.code() == Code.CANCELLED
    assert alice.list() == ["still-served"]


def test_a_stream_silent_mid_document_is_cancelled_and_keeps_what_came(keyed_grpc, tokenizer):
    _, channel = keyed_grpc
    alice = Client(channel, KEY_A)
    text = "In the beginning God created the heaven and the earth."
    held = Held(channel, KEY_A, [grpc_start("silent"), pb.IngestRequest(text=text)])
    assert held.ended.wait(15) and held.error.code() == Code.CANCELLED
    info = alice.get("silent")
    assert info.document_bytes == len(text.encode()) and info.pending_tokens > 0  # kept, not ended or dropped
    # the document was not ended: a resumed stream goes on from here
    more = " And the earth was without form."
    alice.ingest(grpc_start("silent", create=False), [more])  # and ends it
    assert alice.get("silent").tokens_ingested == len(tokenizer(text + more, add_special_tokens=False).input_ids)


def test_a_client_gone_while_its_chunk_waits_frees_its_stream_slot_and_loses_nothing(keyed_grpc):
    """A client whose deadline passes while its chunk waits for a busy device: the stream's handler stops waiting
    (the chunk, not started, is taken off the queue and its tokens stay pending) and gives back the user's stream
    slot then, not when the device comes to the chunk. A resumed stream trains what was left."""
    server, channel = keyed_grpc
    alice = Client(channel, KEY_A)
    alice.create("gave-up")
    ids = list(range(100, 100 + 2 * CHUNK))
    busy, release = threading.Event(), threading.Event()

    def requests():
        yield grpc_start("gave-up", create=False, end=False)
        yield pb.IngestRequest(tokens=pb.TokenIds(ids=ids[:CHUNK]))  # a chunk: trains at once
        busy.wait(30)
        yield pb.IngestRequest(tokens=pb.TokenIds(ids=ids[CHUNK:]))  # a chunk: waits behind the busy device
        release.wait(30)

    blocker = None
    try:
        with pytest.raises(grpc.RpcError) as info:
            for response in alice.stub.Ingest(requests(), timeout=5.0, metadata=alice.metadata):
                if response.WhichOneof("message") == "chunk" and blocker is None:
                    blocker = server.state.scheduler.submit(("bob", "busy"), release.wait, 60)
                    busy.set()
        assert info.value.code() == Code.DEADLINE_EXCEEDED and blocker is not None  # the first chunk came back
        deadline = time.monotonic() + 30
        while server.state.streams.open("alice") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.state.streams.open("alice") == 0 and not blocker.done()  # freed with the device still busy
    finally:
        release.set()
    blocker.result(30)
    info = alice.get("gave-up")
    assert (info.tokens_ingested, info.pending_tokens) == (CHUNK, CHUNK)  # the second chunk was never trained
    alice.ingest(grpc_start("gave-up", create=False), [])
    assert alice.get("gave-up").tokens_ingested == 2 * CHUNK


# ---- session settings priced before anything is allocated -----------------------------------------

HUGE = {
    "fast": {
        "rank": 1024,
        "layers": "all",
        "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    }
}


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"memory": "off"},
        {"fast": {"kind": "mlp"}},
        HUGE,
        {"ingest": {"context_tokens": 64, "sink_tokens": 8}, "recall": {"exact_tokens": 96}},
    ],
)
def test_the_price_bounds_what_a_session_holds(tiny_model_dir, settings):
    engine = ttt.load_engine(tiny_model_dir, "cpu")
    config = SessionConfig.from_dict({"ingest": {"chunk_tokens": 32, "context_tokens": 32}} | settings)
    session = engine.create_session(config)
    session.append_text(book(0, 3000))
    session.end_document()
    while session.train_next_chunk() is not None:
        pass
    session.generate(QUESTION, max_tokens=2)
    held, price = session.resident_bytes(), priced_bytes(config, engine.base.model)
    assert held <= price <= 2 * held + 4096, (held, price)


def test_settings_over_the_price_limits_are_refused_before_allocation(tiny_model_dir, tmp_path, monkeypatch):
    engine = ttt.load_engine(tiny_model_dir, "cpu")
    one = priced_bytes(SessionConfig.from_dict(TINY), engine.base.model)
    with running(
        tiny_model_dir, tmp_path / "data", max_session_bytes=4 * one, max_memory_bytes_per_user=int(2.5 * one)
    ) as server:
        registry = server.state.registry
        real_create = registry.engine.create_session
        monkeypatch.setattr(registry.engine, "create_session", lambda *a, **k: pytest.fail("allocated"))
        with http(server) as api:
            check_error(api.post("/v1/sessions", json={"id": "huge", "settings": HUGE}), 429, match="memory")
            channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
            settings = pb.SessionSettings(fast=pb.FastWeightSettings(rank=1024, layers="all"))
            Client(channel).fails(Code.RESOURCE_EXHAUSTED, Client(channel).create, "huge", settings, match="memory")
            channel.close()
            monkeypatch.setattr(registry.engine, "create_session", real_create)
            for sid in ("one", "two"):
                assert api.post("/v1/sessions", json={"id": sid}).status_code == 201
            check_error(api.post("/v1/sessions", json={"id": "three"}), 429, match="user")  # 3 x one > 2.5 x one
            assert sorted(s["id"] for s in api.get("/v1/sessions").json()["data"]) == ["one", "two"]


# ---- TLS on both doors -----------------------------------------------------------------------------


def self_signed(folder) -> tuple:
    """A certificate for 127.0.0.1 and localhost, made here (no files from elsewhere): (cert.pem, key.pem)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ttt test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem, key_pem = folder / "cert.pem", folder / "key.pem"
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_pem, key_pem


def test_tls_on_both_doors(tiny_model_dir, tmp_path):
    cert, key = self_signed(tmp_path)
    keys = write_keys(tmp_path, {"alice": KEY_A})
    with running(tiny_model_dir, tmp_path / "data", api_keys_file=keys, tls_cert=cert, tls_key=key) as server:
        grpc_address, https = f"127.0.0.1:{server.grpc_port}", f"https://127.0.0.1:{server.http_port}"
        with TTTClient(grpc_address, KEY_A, tls_ca=cert, timeout=60) as client:
            client.create_session("secret")
            events = list(client.ingest("secret", ["In the beginning God created the heaven and the earth."]))
            assert events[-1]["tokens_ingested"] > 0
        with TTTClient(grpc_address, KEY_A, timeout=10) as plain:  # no TLS: no answer, and no key sent in clear
            with pytest.raises(TTTError) as info:
                plain.list_sessions()
            assert info.value.code == Code.UNAVAILABLE
        with ChatClient(https, KEY_A, tls_ca=cert) as chat:
            assert chat.base_model() and "".join(chat.stream("secret", QUESTION, max_tokens=2))
        with pytest.raises(httpx.ConnectError):  # a certificate nobody vouched for
            httpx.get(f"{https}/healthz")
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{server.http_port}/healthz")
        cli = [
            sys.executable,
            "-m",
            "clients.cli",
            "sessions",
            "list",
            "--server",
            grpc_address,
            "--api-key",
            KEY_A,
            "--tls-ca",
            str(cert),
        ]
        done = subprocess.run(cli, capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert done.returncode == 0 and "secret" in done.stdout, done.stderr


def test_inconsistent_server_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="both"):
        Settings(tls_cert=tmp_path / "cert.pem")
    with pytest.raises(ValueError, match="grpc_threads"):
        Settings(max_streams=32, grpc_threads=32)


# ---- checkpoints after a crash ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_engine(tiny_model_dir):
    return ttt.load_engine(tiny_model_dir, "cpu")


def _trained(engine, text: str):
    session = engine.create_session(SessionConfig.from_dict(TINY), "crashy")
    session.append_text(text)
    while session.train_next_chunk() is not None:
        pass
    return session


def test_a_crashed_saves_leftovers_are_not_counted_and_go_at_the_next_save(tiny_engine, tmp_path):
    session = _trained(tiny_engine, book(0, 400))
    session.save(tmp_path)
    before = disk_bytes(tmp_path)
    stale = tmp_path / ".tmp-ckpt-crashed"
    stale.mkdir()
    (stale / "fast_weights.safetensors").write_bytes(b"\0" * 100_000)
    assert disk_bytes(tmp_path) == before  # not held against the user's quota
    session.save(tmp_path)
    assert not stale.exists()


def test_after_a_fallback_the_next_save_keeps_the_good_checkpoint(tiny_engine, tmp_path):
    session = _trained(tiny_engine, book(0, 400))
    session.save(tmp_path)  # ckpt-000001: good
    session.append_text(book(400, 800))
    while session.train_next_chunk() is not None:
        pass
    session.save(tmp_path)  # ckpt-000002: damaged below
    (tmp_path / "ckpt-000002" / "fast_weights.safetensors").write_bytes(b"garbage")
    loaded = load_session(tiny_engine, tmp_path)
    assert loaded.restored_from == "ckpt-000001"
    loaded.save(tmp_path)  # ckpt-000003
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-000001", "ckpt-000003"]
    loaded.save(tmp_path)  # ckpt-000004: a later save prunes as usual, it takes no good checkpoint for damaged
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-000003", "ckpt-000004"]
    (tmp_path / "ckpt-000004" / "fast_weights.safetensors").write_bytes(b"garbage")
    assert load_session(tiny_engine, tmp_path).restored_from == "ckpt-000003"  # the good one is still there
