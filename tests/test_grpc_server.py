"""The gRPC server end to end: real servers on loopback, talked to with the raw generated stubs.

Every server runs the tiny random Llama (``tiny_model_dir``, with the real SmolLM2 tokenizer) on the
CPU, with 32-token chunks and contexts so that a few KB of text make many chunks. What a stream should
produce is computed independently: ``tokenizer(whole_text)`` for totals, and ``IncrementalTokenizer``
fed the same pieces for how many tokens the server holds after each piece (it tokenizes pieces so).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import re
import threading
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from conftest import started_server
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from texts import book, byte_pieces

from server.auth import hash_key
from server.documents import DocumentFeed
from server.proto.ttt.v1 import ttt_pb2 as pb
from server.proto.ttt.v1 import ttt_pb2_grpc as pb_grpc
from ttt.store import has_checkpoint
from ttt.tokenize import IncrementalTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

CHUNK = 32
DEFAULTS = {"ingest": {"chunk_tokens": CHUNK, "context_tokens": CHUNK}}
TIMEOUT = 60.0  # seconds per unary call
STREAM_TIMEOUT = 180.0  # per Ingest stream (the longest trains ~170 chunks)
Code = grpc.StatusCode
SERVING = health_pb2.HealthCheckResponse.SERVING
SERVICE = "ttt.v1.Sessions"


# ---- servers and clients ------------------------------------------------------------------------


@contextmanager
def running(model_dir: Path, data_dir: Path, **settings):
    """A started Server (open mode unless api_keys_file is given) and a channel to it; stopped on exit."""
    with started_server(model_dir, data_dir, DEFAULTS, **settings) as server:
        channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
        try:
            yield server, channel
        finally:
            channel.close()


class Client:
    """Raw stubs plus the bearer key (if any) on every call."""

    def __init__(self, channel: grpc.Channel, key: str | None = None, *, scheme: str = "Bearer"):
        self.stub = pb_grpc.SessionsStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)
        self.metadata = [("authorization", f"{scheme} {key}")] if key is not None else None

    def call(self, method: str, request):
        return getattr(self.stub, method)(request, timeout=TIMEOUT, metadata=self.metadata)

    def create(self, session_id: str = "", settings: pb.SessionSettings | None = None) -> pb.SessionInfo:
        request = pb.CreateSessionRequest(session_id=session_id)
        if settings is not None:
            request.settings.CopyFrom(settings)
        return self.call("CreateSession", request)

    def get(self, session_id: str) -> pb.SessionInfo:
        return self.call("GetSession", pb.SessionRef(session_id=session_id))

    def list(self) -> list[str]:
        return [s.session_id for s in self.call("ListSessions", pb.ListSessionsRequest()).sessions]

    def delete(self, session_id: str):
        return self.call("DeleteSession", pb.SessionRef(session_id=session_id))

    def save(self, session_id: str) -> pb.SessionInfo:
        return self.call("SaveSession", pb.SessionRef(session_id=session_id))

    def reset(self, session_id: str) -> pb.SessionInfo:
        return self.call("ResetSession", pb.SessionRef(session_id=session_id))

    def ingest(self, first: pb.IngestRequest, pieces=()) -> tuple[list[pb.ChunkProgress], pb.IngestSummary]:
        """One whole Ingest stream: ``first``, then ``pieces`` (see ``as_request``); its progress and summary."""
        requests = iter([first, *map(as_request, pieces)])
        responses = list(self.stub.Ingest(requests, timeout=STREAM_TIMEOUT, metadata=self.metadata))
        kinds = [r.WhichOneof("message") for r in responses]
        assert kinds == ["chunk"] * (len(kinds) - 1) + ["summary"], kinds
        return [r.chunk for r in responses[:-1]], responses[-1].summary

    def fails(self, code: grpc.StatusCode, fn, *args, match: str | None = None) -> str:
        """``fn(*args)`` fails with ``code`` and a message (matching ``match``); the server still answers after."""
        with pytest.raises(grpc.RpcError) as info:
            fn(*args)
        err = info.value
        assert err.code() == code, f"expected {code}, got {err.code()}: {err.details()}"
        details = err.details()
        assert details and details != "internal error"
        if match is not None:
            assert re.search(match, details), details
        self.assert_healthy()
        return details

    def assert_healthy(self):
        assert self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT).status == SERVING
        self.list()  # and a real call still works


def start(session_id: str, *, create: bool = True, end: bool = True, settings=None) -> pb.IngestRequest:
    msg = pb.IngestStart(session_id=session_id, create_if_missing=create, end_of_document=end)
    if settings is not None:
        msg.settings.CopyFrom(settings)
    return pb.IngestRequest(start=msg)


def as_request(piece) -> pb.IngestRequest:
    """bytes -> utf8, str -> text, a list of ints -> tokens; an IngestRequest as it is."""
    if isinstance(piece, pb.IngestRequest):
        return piece
    if isinstance(piece, bytes):
        return pb.IngestRequest(utf8=piece)
    if isinstance(piece, str):
        return pb.IngestRequest(text=piece)
    return pb.IngestRequest(tokens=pb.TokenIds(ids=list(piece)))


# ---- texts and expectations ----------------------------------------------------------------------


def token_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def held_after_each(tokenizer, pieces) -> list[int]:
    """Tokens a session holds (trained + pending) after each piece of a fresh document."""
    stream, total, out = IncrementalTokenizer(tokenizer), 0, []
    for piece in pieces:
        total += len(stream.feed(piece))
        out.append(total)
    return out


def check_progress(chunks: list[pb.ChunkProgress], first_index: int, tokens_before: int, tokens_after: int):
    """Consecutive chunks, full but the last, finite losses, a growing total that ends at ``tokens_after``."""
    assert [c.index for c in chunks] == list(range(first_index, first_index + len(chunks)))
    assert all(c.tokens == CHUNK for c in chunks[:-1]) and 0 < chunks[-1].tokens <= CHUNK
    assert [c.tokens_ingested for c in chunks] == list(
        itertools.accumulate((c.tokens for c in chunks), initial=tokens_before)
    )[1:]
    assert chunks[-1].tokens_ingested == tokens_after
    for c in chunks:
        assert math.isfinite(c.loss_before) and c.loss_before > 0, c
        assert math.isfinite(c.loss_after) and c.loss_after > 0, c
        assert c.pending_tokens >= 0 and not c.rolled_back and not c.error
        assert c.seconds > 0 and c.tokens_per_second > 0


# ---- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def open_server(tiny_model_dir, tmp_path_factory):
    """The shared server of most tests: open mode (every caller is the user "local"), default limits."""
    with running(tiny_model_dir, tmp_path_factory.mktemp("grpc-open")) as (server, channel):
        yield server, channel


@pytest.fixture
def client(open_server) -> Client:
    return Client(open_server[1])


@pytest.fixture(scope="module")
def limited(tiny_model_dir, tmp_path_factory):
    """A server with small limits: 100 tokens per stream, 64 KiB per message, 5 sessions per user."""
    with running(
        tiny_model_dir,
        tmp_path_factory.mktemp("grpc-limited"),
        max_document_tokens=100,
        max_message_bytes=64 * 1024,
        max_sessions_per_user=5,
    ) as (_, channel):
        yield Client(channel)


KEY_A, KEY_B = "ttt-alice-key-0123456789", "ttt-bob-key-9876543210"


@pytest.fixture(scope="module")
def keyed(tiny_model_dir, tmp_path_factory):
    """A server with API keys for alice and bob; yields its channel."""
    folder = tmp_path_factory.mktemp("grpc-keyed")
    keys = folder / "keys.json"
    keys.write_text(json.dumps({"alice": [hash_key(KEY_A)], "bob": [hash_key(KEY_B)]}))
    with running(tiny_model_dir, folder / "data", api_keys_file=keys) as (_, channel):
        yield channel


# ---- streaming ---------------------------------------------------------------------------------------


def test_long_text_in_odd_byte_pieces(client, tokenizer):
    text = book(0, 20_000)
    # Non-ASCII characters placed so that piece boundaries (byte 4438 and 4439 of the 1/7/333/4097 cycle)
    # fall inside them; pieces also cut words everywhere.
    text = text[:4437] + "é日本🙂" + text[4437:12_000] + " Café, naïve; 日本語 🙂🙂!\n" + text[12_000:]
    pieces = byte_pieces(text.encode())
    assert sum(1 for p in pieces if p[0] & 0xC0 == 0x80) >= 2  # pieces that start inside a character
    expected = len(token_ids(tokenizer, text))

    chunks, summary = client.ingest(start("long"), pieces)

    assert summary.tokens_ingested == summary.tokens_received == expected
    assert summary.pending_tokens == 0 and summary.session_id == "long"
    assert len(chunks) == summary.chunks_trained == math.ceil(expected / CHUNK)
    check_progress(chunks, 0, 0, expected)
    assert summary.mean_loss_before == pytest.approx(sum(c.loss_before for c in chunks) / len(chunks))
    info = client.get("long")
    assert info.tokens_ingested == expected and info.pending_tokens == 0
    assert info.chunks == len(chunks) and info.rolled_back_chunks == 0
    assert info.last_loss_before == pytest.approx(chunks[-1].loss_before)
    assert info.residency == "device" and info.bytes > 0 and info.updated_at >= info.created_at > 0


def test_a_streams_deadline_reaches_the_scheduler_with_each_chunk(client, open_server, monkeypatch):
    """Each chunk a stream completes is queued with the seconds its client has left (``Scheduler``: a chunk whose
    client has waited half of them goes next); a stream without a deadline is never in a hurry."""
    scheduler = open_server[0].state.scheduler
    seen = []

    def recording(key, batch, item, time_left=None):
        seen.append(time_left)
        return submit(key, batch, item, time_left)

    submit = scheduler.submit_batchable
    monkeypatch.setattr(scheduler, "submit_batchable", recording)
    pieces = [pb.IngestRequest(tokens=pb.TokenIds(ids=list(range(5, 5 + 2 * CHUNK))))]
    client.ingest(start("deadline"), pieces)
    assert len(seen) == 2 and all(0 < left <= STREAM_TIMEOUT + 5 for left in seen)  # as grpc counts it
    seen.clear()
    list(client.stub.Ingest(iter([start("no-deadline"), *pieces])))  # no timeout: no deadline
    assert len(seen) == 2 and all(left > 3e7 for left in seen)  # grpc's "no deadline": more than a year left


def test_mixed_text_utf8_and_token_messages(client, open_server, tokenizer):
    middle = token_ids(tokenizer, " and the earth")
    pieces = ["In the begin", b"ning God cr\xc3", b"\xa9", "ated the heaven", middle, b" Am", "en.\n"]
    # A token message ends the text before it: that text, the ids, then the text after, in order.
    expected = (
        token_ids(tokenizer, "In the beginning God créated the heaven") + middle + token_ids(tokenizer, " Amen.\n")
    )
    assert len(expected) < CHUNK  # so the session's window holds every token

    chunks, summary = client.ingest(start("mixed"), pieces)

    assert summary.tokens_ingested == summary.tokens_received == len(expected)
    assert len(chunks) == 1 and chunks[0].tokens == len(expected)
    session = open_server[0].state.registry.get("local", "mixed")
    assert session.window == expected  # the order of the tokens, not just their number


def test_token_messages_only(client):
    chunks, summary = client.ingest(start("ids"), [list(range(100, 140)), [7] * 30])
    assert summary.tokens_ingested == 70 and len(chunks) == 3
    check_progress(chunks, 0, 0, 70)


def test_cancel_mid_stream_then_resume(client, tokenizer, caplog):
    text = book(30_000, 33_000) + " Ende: 日本 🙂\n"
    pieces = byte_pieces(text.encode(), (1, 7, 33, 101))
    held = held_after_each(tokenizer, pieces)
    # The first stream sends pieces up to the one that completes the 3rd chunk, then holds still: that
    # chunk's progress message proves the server has read every piece sent, and there are no more.
    last = next(i for i, n in enumerate(held) if n >= 3 * CHUNK)
    first_part, rest = pieces[: last + 1], pieces[last + 1 :]
    trained = held[last] // CHUNK * CHUNK
    assert trained == 3 * CHUNK

    release = threading.Event()

    def requests():
        yield start("resume", end=False)
        yield from map(as_request, first_part)
        release.wait(STREAM_TIMEOUT)  # keep the stream open, sending nothing

    call = client.stub.Ingest(requests(), timeout=STREAM_TIMEOUT)
    progress = []
    try:
        for response in call:
            progress.append(response.chunk)
            if response.chunk.tokens_ingested == trained:
                call.cancel()
                break
    finally:
        release.set()
    assert call.code() == Code.CANCELLED
    assert [c.tokens_ingested for c in progress] == [CHUNK, 2 * CHUNK, 3 * CHUNK]

    info = client.get("resume")  # only the completed chunks were trained; the rest waits
    assert info.tokens_ingested == trained and info.tokens_ingested % CHUNK == 0
    assert info.pending_tokens == held[last] - trained >= 0
    assert info.chunks == 3
    # The session says how many bytes of the document it has: the rest starts there.
    assert info.document_bytes == sum(len(p) for p in first_part)
    assert b"".join(rest) == text.encode()[info.document_bytes :]

    total = len(token_ids(tokenizer, text))
    chunks, summary = client.ingest(start("resume", create=False, end=True), rest)
    assert summary.tokens_ingested == total and summary.pending_tokens == 0
    assert summary.tokens_received == total - held[last]
    check_progress(chunks, 3, trained, total)
    assert len(chunks) == math.ceil(total / CHUNK) - 3
    assert client.get("resume").tokens_ingested == total
    # A client going away is not a server error.
    assert not [r for r in caplog.records if r.name.startswith("server") and r.levelno >= logging.ERROR]


# ---- standard services ------------------------------------------------------------------------------


def test_health(open_server):
    health = health_pb2_grpc.HealthStub(open_server[1])
    for service in ("", SERVICE):
        assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT).status == SERVING
    with pytest.raises(grpc.RpcError) as info:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=TIMEOUT)
    assert info.value.code() == Code.NOT_FOUND


def test_reflection(open_server):
    channel = open_server[1]
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = list(
        stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=TIMEOUT)
    )
    names = {s.name for s in responses[0].list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health"} <= names

    db = ProtoReflectionDescriptorDatabase(channel)
    assert SERVICE in db.get_services()
    service = DescriptorPool(db).FindServiceByName(SERVICE)
    methods = {m.name: m for m in service.methods}
    assert {
        "CreateSession",
        "GetSession",
        "ListSessions",
        "DeleteSession",
        "SaveSession",
        "ResetSession",
        "Ingest",
    } <= set(methods)
    assert methods["Ingest"].client_streaming and methods["Ingest"].server_streaming


# ---- the session lifecycle ---------------------------------------------------------------------------


def test_create_get_list_reset_delete(client):
    picked = client.create()  # the server picks an id
    assert re.fullmatch(r"[0-9a-f]{32}", picked.session_id) and picked.tokens_ingested == 0
    info = client.create(
        "life", pb.SessionSettings(fast=pb.FastWeightSettings(kind="mlp"), ingest=pb.IngestSettings(lr=1e-3))
    )
    assert info.session_id == "life" and info.residency == "device" and info.bytes > 0
    assert {"life", picked.session_id} <= set(client.list())

    _, summary = client.ingest(start("life", create=False), [book(0, 400)])
    assert client.get("life").tokens_ingested == summary.tokens_ingested > 0
    saved = client.save("life")
    assert saved.tokens_ingested == summary.tokens_ingested
    reset = client.reset("life")
    assert reset.tokens_ingested == reset.pending_tokens == reset.chunks == 0

    client.delete("life")
    client.delete(picked.session_id)
    assert "life" not in client.list() and picked.session_id not in client.list()
    client.fails(Code.NOT_FOUND, client.get, "life")


# ---- errors -------------------------------------------------------------------------------------------


def test_invalid_session_ids(client):
    for bad in ("../etc", "a/b", ".hidden", "x" * 200, "é"):
        for fn in (client.get, client.delete, client.save, client.reset, client.create):
            client.fails(Code.INVALID_ARGUMENT, fn, bad, match="session id must be")
        client.fails(Code.INVALID_ARGUMENT, client.ingest, start(bad), ["text"], match="session id must be")
    client.fails(Code.INVALID_ARGUMENT, client.get, "", match="session id must be")
    assert not any(".." in s or "/" in s for s in client.list())


def test_invalid_streams(client):
    first_not_start = "the first message of an Ingest stream must be `start`"
    client.fails(Code.INVALID_ARGUMENT, client.ingest, as_request("hello"), [], match=re.escape(first_not_start))
    with pytest.raises(grpc.RpcError) as info:  # no message at all
        list(client.stub.Ingest(iter([]), timeout=TIMEOUT))
    assert info.value.code() == Code.INVALID_ARGUMENT and first_not_start in info.value.details()

    client.fails(
        Code.INVALID_ARGUMENT, client.ingest, start("twice"), ["Hi", start("twice")], match="only be the first"
    )
    client.fails(Code.INVALID_ARGUMENT, client.ingest, start("empty"), ["Hi", ""], match="empty message")
    client.fails(Code.INVALID_ARGUMENT, client.ingest, start("empty"), [b""], match="empty message")
    client.fails(Code.INVALID_ARGUMENT, client.ingest, start("empty"), [pb.IngestRequest()], match="empty message")
    client.fails(
        Code.INVALID_ARGUMENT, client.ingest, start("ids"), [[1, 2, 49152]], match=r"token ids must be in \[0, 49152\)"
    )
    client.fails(Code.INVALID_ARGUMENT, client.ingest, start("ids"), [[-1]], match="token ids must be in")
    # str while a UTF-8 character is incomplete, and token ids then too
    client.fails(Code.INVALID_ARGUMENT, client.ingest, start("split-1"), [b"caf\xc3", "e"], match="incomplete UTF-8")
    client.fails(
        Code.INVALID_ARGUMENT, client.ingest, start("split-2"), [b"caf\xc3", [5]], match="ends inside a UTF-8 sequence"
    )
    # a document that ends inside a character
    client.fails(
        Code.INVALID_ARGUMENT, client.ingest, start("split-3"), [b"caf\xc3"], match="ends inside a UTF-8 sequence"
    )
    # token ids refused after text: the text's held-back tail is still there, in order
    client.fails(
        Code.INVALID_ARGUMENT, client.ingest, start("split-4", end=False), ["Hello wor", [49152]], match="token ids"
    )
    _, summary = client.ingest(start("split-4", create=False), ["ld"])
    assert summary.tokens_ingested == 2  # "Hello", " world"


def test_invalid_settings(client):
    bad = {
        "chunk": (pb.SessionSettings(ingest=pb.IngestSettings(chunk_tokens=1)), "chunk_tokens must be between 2 and"),
        # the same caps as HTTP's (server.policy): no request may ask for an impossible allocation
        "rank": (pb.SessionSettings(fast=pb.FastWeightSettings(rank=1 << 20)), "fast.rank must be between 1 and 1024"),
        "steps": (
            pb.SessionSettings(ingest=pb.IngestSettings(steps_per_chunk=10_000)),
            "steps_per_chunk must be between",
        ),
        "kind": (pb.SessionSettings(fast=pb.FastWeightSettings(kind="nope")), "unknown fast-weight kind 'nope'"),
        "layers": (pb.SessionSettings(fast=pb.FastWeightSettings(layers="bogus")), "bad layers spec"),
        "target": (pb.SessionSettings(fast=pb.FastWeightSettings(targets=["lm_head"])), "unknown LoRA targets"),
        "opt": (pb.SessionSettings(ingest=pb.IngestSettings(optimizer="adam")), "choose 'adamw' or 'sgd'"),
        "lr": (pb.SessionSettings(ingest=pb.IngestSettings(lr=-1)), "lr and max_grad_norm must be positive"),
        "preset": (pb.SessionSettings(memory="huge"), "unknown memory preset 'huge'"),
        "exact": (pb.SessionSettings(recall=pb.RecallSettings(exact_tokens=1 << 20)), "recall.exact_tokens must be"),
        "replay_lr": (pb.SessionSettings(recall=pb.RecallSettings(replay_lr=float("nan"))), "replay_lr must be"),
        "select": (pb.SessionSettings(recall=pb.RecallSettings(exact_select="all")), "exact_select must be one of"),
        "dense": (
            pb.SessionSettings(recall=pb.RecallSettings(dense_spans_per_chunk=65)),
            "recall.dense_spans_per_chunk must be",
        ),
        "alpha": (pb.SessionSettings(fast=pb.FastWeightSettings(alpha=float("nan"))), "alpha must be a finite number"),
    }
    for name, (settings, message) in bad.items():
        client.fails(Code.INVALID_ARGUMENT, client.create, f"bad-{name}", settings, match=re.escape(message))
        client.fails(
            Code.INVALID_ARGUMENT,
            client.ingest,
            start(f"bad-{name}", settings=settings),
            ["Hi"],
            match=re.escape(message),
        )
        client.fails(Code.NOT_FOUND, client.get, f"bad-{name}")  # nothing was created


def test_memory_settings_on_create_and_fixed_afterwards(client):
    settings = pb.SessionSettings(memory="fast", recall=pb.RecallSettings(exact_tokens=64, exact_select="surprise"))
    client.fails(
        Code.INVALID_ARGUMENT,
        client.create,
        "studies",
        pb.SessionSettings(  # "fast" does not rehearse
            memory="fast", recall=pb.RecallSettings(study_spans=1)
        ),
        match="study_spans needs replay_steps",
    )
    info = client.create("recalls", settings)
    assert info.memory == "fast" and info.memory_spans == 0 and info.exact_tokens_read == 0
    _, summary = client.ingest(start("recalls", create=False), [book(20_000, 23_000)])
    info = client.get("recalls")
    assert summary.chunks_trained > 0 and info.memory_spans > 0 and 0 < info.exact_tokens_read <= 64
    # a stream may not change what shapes the session (only lr, steps_per_chunk and max_grad_norm)
    client.fails(
        Code.INVALID_ARGUMENT,
        client.ingest,
        start("recalls", create=False, settings=pb.SessionSettings(memory="deep")),
        ["Hi"],
        match="memory can only be set",
    )
    client.fails(
        Code.INVALID_ARGUMENT,
        client.ingest,
        start("recalls", create=False, settings=pb.SessionSettings(recall=pb.RecallSettings(exact_tokens=8))),
        ["Hi"],
        match="recall.exact_tokens can only be set",
    )


def test_invalid_utf8_keeps_what_came_before(client, tokenizer):
    text = book(60_000, 61_500) + " café"
    data = text.encode()
    cut = len(data) - 1  # inside the final "é" (2 bytes): its first byte is sent, then a bad continuation
    assert data[cut - 1 : cut + 1] == "é".encode()
    pieces = byte_pieces(data[:cut], (100,))
    held = held_after_each(tokenizer, pieces)[-1]
    assert held >= 2 * CHUNK

    client.fails(
        Code.INVALID_ARGUMENT,
        client.ingest,
        start("utf8", end=False),
        [*pieces, b"\x28"],
        match="invalid UTF-8 .* at byte",
    )
    info = client.get("utf8")  # the chunks completed before the bad piece stay trained
    assert info.tokens_ingested == held // CHUNK * CHUNK >= 2 * CHUNK
    assert info.pending_tokens == held % CHUNK
    # The refused piece changed nothing: the next stream continues with the rest of the character.
    _, summary = client.ingest(start("utf8", create=False), [data[cut:]])
    assert summary.tokens_ingested == len(token_ids(tokenizer, text))


def test_not_found(client):
    for fn in (client.get, client.delete, client.save, client.reset):
        assert "no session 'ghost'" in client.fails(Code.NOT_FOUND, fn, "ghost")
    client.fails(Code.NOT_FOUND, client.ingest, start("ghost", create=False), ["Hello"], match="no session 'ghost'")
    assert "ghost" not in client.list()


def test_already_exists(client):
    client.create("twin")
    client.fails(Code.ALREADY_EXISTS, client.create, "twin", match="session 'twin' already exists")
    client.save("twin")  # also when it is on disk and live
    client.fails(Code.ALREADY_EXISTS, client.create, "twin")
    assert client.list().count("twin") == 1


# ---- limits -------------------------------------------------------------------------------------------


def test_document_token_limit_with_token_messages(limited):
    ids = list(range(1000, 1060))
    limited.fails(
        Code.RESOURCE_EXHAUSTED,
        limited.ingest,
        start("cap-ids", end=False),
        [ids, ids],
        match="over the limit of 100 tokens",
    )
    info = limited.get("cap-ids")  # the first 60 tokens, not the violating 60
    assert info.tokens_ingested + info.pending_tokens == 60
    assert info.tokens_ingested == CHUNK
    # The limit is per stream: the next one may add more.
    _, summary = limited.ingest(start("cap-ids", create=False), [ids[:40]])
    assert summary.tokens_ingested == 100


def test_document_token_limit_with_text(limited, tokenizer):
    text = book(90_000, 90_700)
    pieces = byte_pieces(text.encode(), (50,))
    held = held_after_each(tokenizer, pieces)
    over = next(i for i, n in enumerate(held) if n > 100)  # the piece that crosses the limit
    total = len(token_ids(tokenizer, text))
    assert held[over - 1] >= 2 * CHUNK and total - held[over - 1] <= 100

    limited.fails(
        Code.RESOURCE_EXHAUSTED,
        limited.ingest,
        start("cap-text", end=False),
        pieces,
        match="over the limit of 100 tokens",
    )
    info = limited.get("cap-text")
    assert info.tokens_ingested + info.pending_tokens == held[over - 1]
    assert info.tokens_ingested == held[over - 1] // CHUNK * CHUNK
    # The violating piece left nothing behind, not even in the tokenizer: resend from it.
    _, summary = limited.ingest(start("cap-text", create=False), pieces[over:])
    assert summary.tokens_ingested == total


def test_message_size_limit(limited):
    huge = b"a " * (40 * 1024)  # 80 KiB > 64 KiB
    trained = threading.Event()

    def requests():  # the huge message goes only once the server has trained on the first one
        yield start("cap-msg", end=False)
        yield as_request(list(range(40)))
        trained.wait(TIMEOUT)
        yield as_request(huge)

    call = limited.stub.Ingest(requests(), timeout=TIMEOUT)

    def consume():
        for response in call:
            assert response.chunk.tokens_ingested == CHUNK
            trained.set()

    limited.fails(Code.RESOURCE_EXHAUSTED, consume, match="larger than max")
    info = limited.get("cap-msg")  # the first message counts, the huge one does not
    assert (info.tokens_ingested, info.pending_tokens) == (CHUNK, 40 - CHUNK)
    limited.fails(Code.RESOURCE_EXHAUSTED, limited.get, "x" * (70 * 1024), match="larger than max")
    _, summary = limited.ingest(start("cap-msg", create=False), [list(range(20))])
    assert summary.tokens_ingested == 60


def test_sessions_per_user_limit(limited):
    for i in range(5 - len(limited.list())):
        limited.create(f"quota-{i}")
    limited.fails(Code.RESOURCE_EXHAUSTED, limited.create, "one-too-many", match="at most 5 sessions per user")
    limited.fails(Code.RESOURCE_EXHAUSTED, limited.ingest, start("one-too-many"), ["Hi"], match="at most 5 sessions")
    assert len(limited.list()) == 5


# ---- users ------------------------------------------------------------------------------------------------


def test_unauthenticated(keyed):
    alice = Client(keyed, KEY_A)
    strangers = {
        "no key": Client(keyed),
        "wrong key": Client(keyed, "ttt-not-a-key"),
        "empty key": Client(keyed, ""),
        "basic scheme": Client(keyed, KEY_A, scheme="Basic"),
    }
    for name, stranger in strangers.items():
        message = alice.fails(Code.UNAUTHENTICATED, stranger.list)
        assert "missing bearer key" in message or "unknown API key" in message, (name, message)
        if name in ("no key", "basic scheme"):
            assert "authorization: Bearer <key>" in message
        for fn in (stranger.get, stranger.delete, stranger.save, stranger.reset, stranger.create):
            alice.fails(Code.UNAUTHENTICATED, fn, "anything")
        alice.fails(Code.UNAUTHENTICATED, stranger.ingest, start("anything"), ["Hello"])
    assert "anything" not in alice.list()
    # Health is open to all (load balancers have no key).
    assert (
        strangers["no key"].health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=TIMEOUT).status
        == SERVING
    )


def test_users_cannot_see_each_other(keyed):
    alice, bob = Client(keyed, KEY_A), Client(keyed, KEY_B)
    _, summary = alice.ingest(start("notes"), ["The secret password of alice is swordfish. " * 8])
    alice_tokens = summary.tokens_ingested
    alice.save("notes")

    assert "notes" in alice.list() and "notes" not in bob.list()
    for fn in (bob.get, bob.delete, bob.save, bob.reset):
        message = bob.fails(Code.NOT_FOUND, fn, "notes")
        assert "alice" not in message and "swordfish" not in message and str(alice_tokens) not in message
    message = bob.fails(Code.NOT_FOUND, bob.ingest, start("notes", create=False), ["mine now"])
    assert "alice" not in message
    assert alice.get("notes").tokens_ingested == alice_tokens  # untouched by all of that

    # The same id is a different session for bob.
    _, bobs = bob.ingest(start("notes"), ["Bob's notes."])
    assert bob.list() == ["notes"] and bob.get("notes").tokens_ingested == bobs.tokens_ingested != alice_tokens
    bob.delete("notes")
    assert bob.list() == [] and alice.get("notes").tokens_ingested == alice_tokens


# ---- persistence -------------------------------------------------------------------------------------------


def test_saved_session_survives_a_restart(tiny_model_dir, tmp_path, tokenizer):
    text = book(50_000, 53_000) + " fin 🙂"
    data = text.encode()
    split = 1999  # mid-word: the second server must continue the word (pending text survives too)
    with running(tiny_model_dir, tmp_path) as (_, channel):
        client = Client(channel)
        _, summary = client.ingest(start("kept", end=False), byte_pieces(data[:split], (500,)))
        saved = client.save("kept")
        assert (
            saved.tokens_ingested == summary.tokens_ingested > 0 and saved.pending_tokens == summary.pending_tokens > 0
        )
        assert (tmp_path / "users" / "local" / "kept" / "LATEST").is_file()

    with running(tiny_model_dir, tmp_path) as (_, channel):
        client = Client(channel)
        assert client.list() == ["kept"]
        info = client.get("kept")  # from the checkpoint's manifest, without loading the session
        assert info.residency == "disk"
        assert (info.tokens_ingested, info.pending_tokens, info.chunks) == (
            saved.tokens_ingested,
            saved.pending_tokens,
            saved.chunks,
        )
        assert info.last_loss_before == pytest.approx(saved.last_loss_before)
        assert info.created_at == pytest.approx(saved.created_at)

        chunks, summary = client.ingest(start("kept", create=False), [data[split:]])  # loads it
        total = len(token_ids(tokenizer, text))
        assert summary.tokens_ingested == total
        check_progress(chunks, saved.chunks, saved.tokens_ingested, total)
        info = client.get("kept")
        assert info.residency == "device" and info.tokens_ingested == total


def test_shutdown_saves_changed_sessions(tiny_model_dir, tmp_path, tokenizer):
    text = book(70_000, 72_000)
    with running(tiny_model_dir, tmp_path) as (_, channel):
        client = Client(channel)
        _, done = client.ingest(start("unsaved"), [text])
        _, part = client.ingest(start("half", end=False), [text[:777]])
        assert part.pending_tokens > 0
        assert not has_checkpoint(tmp_path / "users" / "local" / "unsaved")  # nothing saved yet
    # server.stop() ran: both are on disk now

    with running(tiny_model_dir, tmp_path) as (_, channel):
        client = Client(channel)
        assert client.list() == ["half", "unsaved"]
        info = client.get("unsaved")
        assert info.residency == "disk" and info.tokens_ingested == done.tokens_ingested == len(
            token_ids(tokenizer, text)
        )
        info = client.get("half")
        assert (info.tokens_ingested, info.pending_tokens) == (part.tokens_ingested, part.pending_tokens)
        _, summary = client.ingest(start("half", create=False), [text[777:]])
        assert summary.tokens_ingested == len(token_ids(tokenizer, text))


def test_per_stream_step_settings(client):
    """A stream may change lr / steps / clip for itself; settings that shape the session are fixed at creation."""
    text = book(5_000, 6_000)
    client.ingest(start("knobs"), [text])
    # An lr of 1e-30 leaves the weights as they are: the same chunk scores the same before and after.
    chunks, _ = client.ingest(
        start("knobs", settings=pb.SessionSettings(ingest=pb.IngestSettings(lr=1e-30, steps_per_chunk=2))), [text]
    )
    assert all(abs(c.loss_before - c.loss_after) < 1e-4 for c in chunks)
    # Without overrides the session's own lr applies again and the loss moves.
    chunks, _ = client.ingest(start("knobs"), [text])
    assert any(abs(c.loss_before - c.loss_after) > 1e-3 for c in chunks)
    fixed = pb.SessionSettings(ingest=pb.IngestSettings(chunk_tokens=CHUNK * 2))
    client.fails(
        Code.INVALID_ARGUMENT,
        client.ingest,
        start("knobs", settings=fixed),
        [text],
        match="only be set when the session is created",
    )
    bad = pb.SessionSettings(ingest=pb.IngestSettings(lr=-1.0))
    client.fails(Code.INVALID_ARGUMENT, client.ingest, start("knobs", settings=bad), [text], match="lr")


def test_documents_waiting_together_train_in_one_batch(open_server):
    """Chunks of several sessions queued at once train in one batched step, with the weights each would get alone.

    Three documents feed their sessions (the path both front doors share) while the device is held busy, so
    that their chunks are all waiting when it frees up.
    """
    server = open_server[0]
    state = server.state
    ids = {f"batch{i}": [100 + 7 * i + j for j in range(CHUNK)] for i in range(3)}  # one full chunk each
    sessions = {sid: state.scheduler.run(("local", sid), state.registry.create, "local", sid) for sid in ids}

    def batches() -> tuple[float, float]:
        return tuple(
            state.metrics.registry.get_sample_value(f"ttt_batch_sessions_{s}") or 0.0 for s in ("count", "sum")
        )

    before = batches()
    started, release = threading.Event(), threading.Event()
    gate = state.scheduler.submit(("test", "gate"), lambda: started.set() or release.wait(TIMEOUT))
    assert started.wait(TIMEOUT)
    reports = {}

    def feed(sid):
        document = DocumentFeed(
            sessions[sid],
            "local",
            state.scheduler,
            state.registry,
            max_tokens=10**6,
            max_pieces=10,
            autosave_every=10**6,
        )
        reports[sid] = list(document.add(ids[sid]))

    feeders = [threading.Thread(target=feed, args=(sid,)) for sid in ids]
    for t in feeders:
        t.start()
    for _ in range(int(TIMEOUT * 100)):
        if state.scheduler.depth == len(ids):
            break
        threading.Event().wait(0.01)
    release.set()
    gate.result(TIMEOUT)
    for t in feeders:
        t.join(STREAM_TIMEOUT)

    count, total = batches()
    assert (count - before[0], total - before[1]) == (1, len(ids))  # one step for the three sessions
    for sid, tokens in ids.items():
        [report] = reports[sid]
        alone = state.engine.create_session(sessions[sid].config)
        alone.append_tokens(tokens)
        expected = alone.train_next_chunk()
        assert report.loss_before == pytest.approx(expected.loss_before, rel=1e-5)
        assert report.loss_after == pytest.approx(expected.loss_after, rel=1e-5)
        for (name, p), q in zip(sessions[sid].fast.named_parameters(), alone.fast.parameters(), strict=True):
            assert (p - q).abs().max() < 1e-5, name


def test_a_document_feed_builds_the_next_prefix_for_a_session_asked_while_it_reads(open_server):
    """After each piece a session asked while it reads has its answers' prefix brought up to date (rebuilt under
    new weights, extended by what it read; a unit of its own, behind the chunk); one that is not asked before the
    weights change again stops being warmed."""
    state = open_server[0].state
    key = ("local", "warmed")
    session = state.scheduler.run(key, state.registry.create, *key)
    feed = DocumentFeed(
        session, "local", state.scheduler, state.registry, max_tokens=10**6, max_pieces=10, autosave_every=10**6
    )

    def read_chunk(first: int) -> None:
        [report] = feed.add([first + j for j in range(CHUNK)])
        assert report.rolled_back is False
        state.scheduler.run(key, lambda: None)  # a session's units run in order: any warming is done

    read_chunk(100)
    assert session._answer_prefix is None  # never asked: nothing built
    state.scheduler.run(key, lambda: session.generate([{"role": "user", "content": "hi"}], max_tokens=2))
    read_chunk(200)
    held = session._answer_prefix
    assert (held.weights_version, held.read) == (session.weights_version, False)  # built ahead, not read yet
    assert held.cache.tokens == session.answer_prefix()
    assert list(feed.add([7, 8, 9])) == []  # read, not trained: extended ahead as well
    state.scheduler.run(key, lambda: None)
    held = session._answer_prefix
    assert held.cache.tokens == session.answer_prefix() and held.cache.tokens[-3:] == [7, 8, 9]
    read_chunk(300)
    assert session._answer_prefix is held  # not read since: the warming stopped


def test_session_info_has_the_same_fields_on_both_doors():
    """One SessionInfo (ttt.session) behind the HTTP model and the proto message: a field added there and
    forgotten on a door fails here."""
    import dataclasses

    from server.grpc_service import PROTO_NAMES
    from server.http.models import SessionInfo as HttpSessionInfo
    from ttt.session import SessionInfo

    names = [f.name for f in dataclasses.fields(SessionInfo)] + ["residency", "disk_bytes"]
    assert list(HttpSessionInfo.model_fields) == names
    assert sorted(pb.SessionInfo.DESCRIPTOR.fields_by_name) == sorted(PROTO_NAMES.get(n, n) for n in names)
