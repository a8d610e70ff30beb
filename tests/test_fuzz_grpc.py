"""Fuzzing the gRPC door with hypothesis: random settings, ids, piece orders and sizes, invalid UTF-8,
out-of-range token ids and cancels at random points. Whatever comes in: a clear status (never INTERNAL or
UNKNOWN), the server healthy after every call, and another user's session untouched.

Derandomized (the same cases every run): a fuzz test must not be flaky. The tiny random Llama, 32-token chunks.
"""

from __future__ import annotations

import threading

import grpc
import pytest
from conftest import write_keys
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_grpc_server import Client, Code, running

from server.proto.ttt.v1 import ttt_pb2 as pb

pytestmark = pytest.mark.usefixtures("one_thread")

KEY_FUZZ, KEY_OTHER = "ttt-fuzzer-key-0123456789abcdef", "ttt-bystander-key-0123456789abcdef"
EXAMPLES = 100  # per test (figures in README.md, "Reliability")
CLEAR = {Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.ALREADY_EXISTS, Code.RESOURCE_EXHAUSTED, Code.FAILED_PRECONDITION}
FUZZ = settings(
    max_examples=EXAMPLES, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck)
)


def mostly(common: st.SearchStrategy, rare: st.SearchStrategy, one_in: int = 4) -> st.SearchStrategy:
    """``common``, and ``rare`` one time in ``one_in`` (hypothesis leans to small integers: 0 picks ``common``)."""
    return st.integers(0, one_in - 1).flatmap(lambda i: rare if i == one_in - 1 else common)


ids = mostly(st.sampled_from(["s1", "s2", "s3"]), st.text(max_size=12))  # mostly ids that pass, to get further
numbers = {
    FieldDescriptor.TYPE_INT64: st.one_of(st.integers(-3, 70), st.integers(-(2**63), 2**63 - 1)),
    FieldDescriptor.TYPE_INT32: st.integers(-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_DOUBLE: st.one_of(st.floats(1e-5, 1e-1), st.floats(allow_nan=True, allow_infinity=True)),
    FieldDescriptor.TYPE_FLOAT: st.floats(allow_nan=True, allow_infinity=True, width=32),
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_STRING: st.one_of(
        st.sampled_from(["all", "last:1", "lora", "mlp", "adamw", "off", "deep", "gate_proj", "recompute", "0,2"]),
        st.text(max_size=12),
    ),
}


def _fields(message_type) -> st.SearchStrategy[dict]:
    """Some fields of a settings section, each with a value of its type (valid or not)."""
    options = {}
    for f in message_type.fields:
        value = numbers[f.type]
        options[f.name] = st.lists(value, max_size=4) if f.is_repeated else value
    return st.fixed_dictionaries({}, optional=options)


@st.composite
def random_settings(draw) -> pb.SessionSettings:
    msg = pb.SessionSettings()
    if draw(st.booleans()):
        msg.memory = draw(numbers[FieldDescriptor.TYPE_STRING])
    for section in ("fast", "ingest", "recall"):
        sub = getattr(msg, section)
        for name, value in draw(_fields(sub.DESCRIPTOR)).items():
            if isinstance(value, list):
                getattr(sub, name).extend(value)
            else:
                setattr(sub, name, value)
    return msg


# half of the cases with no settings (the server's defaults), so that streams get as far as training
session_settings = lambda: mostly(st.just(pb.SessionSettings()), random_settings(), 2)
TEXT = st.text(max_size=200).map(lambda t: pb.IngestRequest(text=t))
pieces = st.one_of(
    TEXT,
    TEXT,
    st.binary(max_size=200).map(lambda b: pb.IngestRequest(utf8=b)),  # invalid UTF-8 included
    st.lists(st.integers(-(2**31), 2**31 - 1) | st.integers(0, 49151), max_size=80).map(  # int32 in the proto
        lambda ids: pb.IngestRequest(tokens=pb.TokenIds(ids=ids))
    ),
)


@st.composite
def streams(draw) -> tuple[list[pb.IngestRequest], int | None]:
    """An Ingest stream (usually starting with `start`, sometimes not) and where the client cancels it (or None)."""
    messages = draw(st.lists(pieces, max_size=6))
    if draw(st.integers(0, 9)) < 9:  # mostly a proper start
        start = pb.IngestStart(
            session_id=draw(ids),
            create_if_missing=draw(st.integers(0, 3)) < 3,
            end_of_document=draw(st.booleans()),
            settings=draw(session_settings()),
        )
        where = draw(st.integers(0, min(1, len(messages)))) if draw(st.integers(0, 4)) == 4 else 0
        messages.insert(where, pb.IngestRequest(start=start))
    cancel_at = draw(mostly(st.none(), st.integers(0, len(messages))))
    return messages, cancel_at


@pytest.fixture(scope="module")
def fuzzed(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("grpc-fuzz")
    keys = write_keys(folder, {"fuzzer": KEY_FUZZ, "bystander": KEY_OTHER})
    with running(
        tiny_model_dir, folder / "data", api_keys_file=keys, max_session_bytes=64 << 20, max_document_tokens=2000
    ) as (_server, channel):
        bystander = Client(channel, KEY_OTHER)
        bystander.create("kept")
        bystander.ingest(
            pb.IngestRequest(start=pb.IngestStart(session_id="kept", end_of_document=True)),
            ["In the beginning God created the heaven and the earth."],
        )
        before = bystander.get("kept")
        yield Client(channel, KEY_FUZZ), bystander
        after = bystander.get("kept")
        assert (after.tokens_ingested, after.chunks, after.updated_at) == (
            before.tokens_ingested,
            before.chunks,
            before.updated_at,
        )


def _clear(call, also: frozenset = frozenset()) -> None:
    """Run ``call``; any failure must be one of the clear statuses (or ``also``)."""
    try:
        call()
    except grpc.RpcError as e:
        assert e.code() in CLEAR | also, f"{e.code()}: {e.details()}"
        assert e.code() in also or (e.details() and e.details() != "internal error")


@FUZZ
@given(
    method=st.sampled_from(["CreateSession", "GetSession", "DeleteSession", "SaveSession", "ResetSession"]),
    session_id=ids,
    settings=session_settings(),
)
def test_fuzz_unary_calls(fuzzed, method, session_id, settings):
    fuzzer, _bystander = fuzzed
    if method == "CreateSession":
        request = pb.CreateSessionRequest(session_id=session_id, settings=settings)
    else:
        request = pb.SessionRef(session_id=session_id)
    _clear(lambda: fuzzer.call(method, request))
    fuzzer.assert_healthy()


@FUZZ
@given(stream=streams())
def test_fuzz_ingest_streams(fuzzed, stream):
    fuzzer, _bystander = fuzzed
    messages, cancel_at = stream
    started = threading.Event()
    holder: dict = {}

    def requests():
        for i, message in enumerate(messages):
            if i == cancel_at:
                started.wait(30)
                holder["call"].cancel()  # the client gives up here
                return
            yield message

    def ingest():
        holder["call"] = call = fuzzer.stub.Ingest(requests(), timeout=120, metadata=fuzzer.metadata)
        started.set()
        for _ in call:
            pass

    _clear(ingest, also=frozenset({Code.CANCELLED}) if cancel_at is not None else frozenset())
    fuzzer.assert_healthy()
