"""The HTTP front door end to end: real servers on loopback, the official ``openai`` client for the
OpenAI-compatible endpoints and httpx for the rest.

The fast tests run the tiny random Llama (``tiny_model_dir``, with the real SmolLM2 tokenizer) on the CPU
with 32-token chunks and contexts. The ``slow`` ones, at the end, run the embedded default model
(SmolLM2-135M-Instruct) with 128-token chunks and contexts on a ~1500-token slice of the King James Bible.
What an upload should produce is computed independently: the tokenizer on the whole text for totals,
``IncrementalTokenizer`` fed the same bytes for what a document that is not finished holds.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import io
import json
import logging
import math
import re
import threading
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import torch
from conftest import started_server, write_keys
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load as load_safetensors
from texts import book
from texts import byte_pieces as _byte_pieces

import ttt.config
from server.http.models import FastSettings, IngestSettings, RecallSettings
from server.main import Server
from server.metrics import PREFIX_FOUND
from server.settings import Settings
from ttt.config import FastWeightConfig, IngestConfig, RecallConfig
from ttt.tokenize import IncrementalTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

CHUNK = 32
TINY = {"ingest": {"chunk_tokens": CHUNK, "context_tokens": CHUNK}}
TIMEOUT = 60.0
KEY_A, KEY_B = "ttt-alice-http-key-0123456789", "ttt-bob-http-key-9876543210"
QUESTION = [{"role": "user", "content": "Who made the heaven and the earth?"}]
MISSING = object()


# ---- servers and clients ---------------------------------------------------------------------------------------------


def running(model_dir: Path, data_dir: Path, *, defaults: dict = TINY, **settings):
    """A started Server (open mode unless api_keys_file is given); stopped on exit."""
    return started_server(model_dir, data_dir, defaults, **settings)


def http(server: Server, key: str | None = None) -> httpx.Client:
    headers = {"authorization": f"Bearer {key}"} if key is not None else {}
    return httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", headers=headers, timeout=TIMEOUT)


def oai(server: Server, key: str = "unused-in-open-mode") -> openai.OpenAI:
    # No retries: a 429 or 503 must reach the test, not be retried away.
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key=key, max_retries=0, timeout=TIMEOUT
    )


def base_name(client: openai.OpenAI) -> str:
    (base,) = [m.id for m in client.models.list().data if getattr(m, "parent", "absent") is None]
    return base


@pytest.fixture(scope="module")
def open_server(tiny_model_dir, tmp_path_factory):
    """The shared server of most tests: open mode (every caller is the user "local"), default limits."""
    with running(tiny_model_dir, tmp_path_factory.mktemp("http-open")) as server:
        yield server


@pytest.fixture
def api(open_server):
    with http(open_server) as client:
        yield client


@pytest.fixture(scope="module")
def keyed_server(tiny_model_dir, tmp_path_factory):
    """API keys for alice and bob."""
    folder = tmp_path_factory.mktemp("http-keyed")
    keys = write_keys(folder, {"alice": KEY_A, "bob": KEY_B})
    with running(tiny_model_dir, folder / "data", api_keys_file=keys) as server:
        yield server


# ---- helpers ---------------------------------------------------------------------------------------------------------


byte_pieces = functools.partial(_byte_pieces, sizes=(1, 7, 333, 101))  # small pieces: a chunked HTTP body


def upload(client: httpx.Client, sid: str, data: bytes | list[bytes], *, end: bool = True) -> httpx.Response:
    """POST a document; a list of pieces goes as a streamed (chunked) body, one piece at a time."""

    def body():
        yield from data

    return client.post(
        f"/v1/sessions/{sid}/documents",
        params=None if end else {"end_of_document": "false"},
        content=body() if isinstance(data, list) else data,
        headers={"content-type": "text/plain; charset=utf-8"},
    )


def token_count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def check_error(r: httpx.Response, status: int, match: str | None = None) -> dict:
    """``r`` is ``status`` with OpenAI's error shape, a real message and no traceback."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert {"message", "type", "param", "code"} <= set(err), err
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str) and err["type"]
    if status != 500:
        assert err["message"] != "internal error"
    assert "Traceback" not in r.text and 'File "' not in r.text
    if match is not None:
        assert re.search(match, err["message"]), err["message"]
    return err


OPENAI_ERRORS = {
    400: openai.BadRequestError,
    401: openai.AuthenticationError,
    404: openai.NotFoundError,
    409: openai.ConflictError,
    429: openai.RateLimitError,
    503: openai.InternalServerError,
}


@contextmanager
def api_error(status: int, match: str | None = None):
    """The openai call inside fails with ``status`` as the matching APIStatusError subclass, in the error shape."""
    with pytest.raises(openai.APIStatusError) as info:
        yield info
    e = info.value
    assert e.status_code == status and isinstance(e, OPENAI_ERRORS[status]), (type(e), e.status_code, e.body)
    assert isinstance(e.body, dict) and e.body["message"] and e.body["type"], e.body  # the client unwraps "error"
    assert e.body["message"] != "internal error"
    if match is not None:
        assert re.search(match, e.body["message"]), e.body["message"]


def chat(client: openai.OpenAI, model: str, **kwargs):
    kwargs = {"messages": QUESTION, "temperature": 0, "max_tokens": 6, **kwargs}
    return client.chat.completions.create(model=model, **kwargs)


def stream_chat(client: openai.OpenAI, model: str, **kwargs) -> list:
    return list(chat(client, model, stream=True, stream_options={"include_usage": True}, **kwargs))


def check_answer(answer, max_tokens: int) -> None:
    """usage and finish_reason present and consistent."""
    (choice,) = answer.choices
    assert answer.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    u = answer.usage
    assert u.prompt_tokens > 0 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    if choice.finish_reason == "length":
        assert u.completion_tokens == max_tokens
    else:
        assert u.completion_tokens <= max_tokens


def check_stream(chunks: list, answer) -> None:
    """A streamed answer equals the non-streamed ``answer``: text, finish_reason, usage (last chunk, no choices)."""
    *body, last = chunks
    assert all(c.object == "chat.completion.chunk" and c.usage is None for c in body)
    assert body[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in body) == answer.choices[0].message.content
    assert [c.choices[0].finish_reason for c in body if c.choices[0].finish_reason] == [answer.choices[0].finish_reason]
    assert last.choices == [] and last.usage is not None
    assert last.usage.model_dump() == answer.usage.model_dump()


def metric_samples(client: httpx.Client) -> dict[tuple[str, tuple], float]:
    """/metrics parsed: {(sample name, sorted labels): value}."""
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def metric(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@contextmanager
def log_records(name: str, level: int = logging.ERROR):
    """Records of ``level`` and up that reach logger ``name`` (uvicorn's loggers do not propagate to root)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level)
    handler.emit = records.append
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


# ---- discovery, models and the sessions REST API ---------------------------------------------------------------------


def test_openapi_served(api):
    r = api.get("/openapi.json")
    assert r.status_code == 200
    paths = r.json()["paths"]
    assert {
        "/v1/chat/completions",
        "/v1/models",
        "/v1/sessions",
        "/v1/sessions/{session_id}",
        "/v1/sessions/{session_id}/documents",
        "/healthz",
        "/readyz",
        "/metrics",
    } <= set(paths)
    assert api.get("/healthz").json() == {"status": "ok"}
    assert api.get("/readyz").json()["status"] == "ready"


def test_models_list_the_base_model_and_only_the_callers_sessions(keyed_server):
    with http(keyed_server, KEY_A) as alice, http(keyed_server, KEY_B) as bob:
        for sid in ("m-a1", "m-a2"):
            assert alice.post("/v1/sessions", json={"id": sid}).status_code == 201
        assert bob.post("/v1/sessions", json={"id": "m-b1"}).status_code == 201

    for key, own, other in ((KEY_A, {"m-a1", "m-a2"}, {"m-b1"}), (KEY_B, {"m-b1"}, {"m-a1", "m-a2"})):
        models = oai(keyed_server, key).models.list().data
        base = base_name(oai(keyed_server, key))
        assert base == keyed_server.state.engine.base.name
        assert models[0].id == base and models[0].owned_by == "ttt"
        sessions = {m.id: m for m in models[1:]}
        assert own <= set(sessions) and not other & set(sessions)
        assert all(m.parent == base and m.object == "model" and m.created > 0 for m in sessions.values())


def test_sessions_rest_lifecycle(api, tokenizer):
    r = api.post("/v1/sessions", json={"id": "life"})
    assert r.status_code == 201
    info = r.json()
    assert info["id"] == "life" and info["tokens_ingested"] == info["chunks"] == 0 and info["residency"] == "device"
    assert info["last_loss_before"] is None

    check_error(api.post("/v1/sessions", json={"id": "life"}), 409, match="already exists")

    picked = api.post("/v1/sessions", json={})
    assert picked.status_code == 201 and re.fullmatch(r"[0-9a-f]{32}", picked.json()["id"])
    picked = picked.json()["id"]

    text = book(0, 1500)
    assert upload(api, "life", text.encode()).status_code == 200
    got = api.get("/v1/sessions/life").json()
    assert got["tokens_ingested"] == token_count(tokenizer, text) and got["chunks"] > 0
    listed = api.get("/v1/sessions").json()
    assert listed["object"] == "list" and {"life", picked} <= {s["id"] for s in listed["data"]}

    saved = api.post("/v1/sessions/life/save")
    assert saved.status_code == 200 and saved.json()["tokens_ingested"] == got["tokens_ingested"]

    reset = api.post("/v1/sessions/life/reset")
    assert reset.status_code == 200
    assert reset.json()["tokens_ingested"] == reset.json()["chunks"] == reset.json()["pending_tokens"] == 0

    for sid in ("life", picked):
        r = api.delete(f"/v1/sessions/{sid}")
        assert r.status_code == 200 and r.json() == {"id": sid, "deleted": True}
        check_error(api.get(f"/v1/sessions/{sid}"), 404, match="no session")
        check_error(api.delete(f"/v1/sessions/{sid}"), 404)
    assert not {"life", picked} & {s["id"] for s in api.get("/v1/sessions").json()["data"]}


def test_session_settings(api, open_server):
    # The typed request body is derived from the engine's settings (ttt.config.SCHEMA): the same names and caps.
    assert set(FastSettings.model_fields) == {f.name for f in dataclasses.fields(FastWeightConfig)}
    assert set(IngestSettings.model_fields) == {f.name for f in dataclasses.fields(IngestConfig)}
    assert set(RecallSettings.model_fields) == {f.name for f in dataclasses.fields(RecallConfig)}
    schema = api.get("/openapi.json").json()["components"]["schemas"]
    exact = schema["RecallSettings"]["properties"]["exact_tokens"]
    assert exact["maximum"] == 1 << 16 and "verbatim" in exact["description"]

    settings = {
        "memory": "deep",
        "fast": {"kind": "mlp", "mlp_hidden": 16, "layers": "last:2"},
        "ingest": {"lr": 0.001, "betas": [0.8, 0.9], "steps_per_chunk": 2},
        "recall": {"exact_tokens": 64},
    }
    assert api.post("/v1/sessions", json={"id": "tuned", "settings": settings}).status_code == 201
    config = open_server.state.registry.get("local", "tuned").config
    assert (config.fast.kind, config.fast.mlp_hidden, config.fast.layers) == ("mlp", 16, "last:2")
    assert (config.ingest.lr, config.ingest.betas, config.ingest.steps_per_chunk) == (0.001, (0.8, 0.9), 2)
    assert config.ingest.chunk_tokens == CHUNK  # the server's defaults fill in the rest
    deep = ttt.config.PRESETS["deep"]["recall"]
    assert (config.memory, config.recall.exact_tokens, config.recall.replay_steps) == ("deep", 64, deep["replay_steps"])
    assert api.get("/v1/sessions/tuned").json()["memory"] == "deep"

    bad = [
        {"id": 5},
        {"id": ".hidden"},
        {"unknown": 1},
        {"settings": {"ingest": 5}},
        {"settings": {"ingest": None}},
        {"settings": {"bogus": {}}},
        {"settings": {"fast": {"rank": 0}}},
        {"settings": {"fast": {"rank": "x"}}},
        {"settings": {"fast": {"rank": 10**9}}},
        {"settings": {"fast": {"layers": 7}}},
        {"settings": {"fast": {"layers": "last_fraction:inf"}}},
        {"settings": {"fast": {"layers": "99"}}},
        {"settings": {"fast": {"kind": "nope"}}},
        {"settings": {"fast": {"targets": ["nope"]}}},
        {"settings": {"fast": {"seed": 2**64}}},
        {"settings": {"ingest": {"lr": -1}}},
        {"settings": {"ingest": {"chunk_tokens": 1}}},
        {"settings": {"ingest": {"betas": [0.9]}}},
        {"settings": {"ingest": {"optimizer": "lion"}}},
        {"settings": {"memory": "huge"}},
        {"settings": {"recall": {"exact_tokens": 1 << 20}}},
        {"settings": {"recall": {"nope": 1}}},
        {"settings": {"recall": {"replay_lr": -1}}},
        {"settings": {"recall": {"exact_select": "all"}}},
        {"settings": {"recall": {"dense_spans_per_chunk": -1}}},
    ]
    before = {s["id"] for s in api.get("/v1/sessions").json()["data"]}
    for body in bad:
        check_error(api.post("/v1/sessions", json=body), 400)
    # JSON's non-standard NaN is refused for every number
    check_error(
        api.post(
            "/v1/sessions",
            content=b'{"settings": {"ingest": {"lr": NaN}}}',
            headers={"content-type": "application/json"},
        ),
        400,
    )
    assert {s["id"] for s in api.get("/v1/sessions").json()["data"]} == before
    api.delete("/v1/sessions/tuned")


# ---- documents -------------------------------------------------------------------------------------------------------


def test_document_upload_in_odd_byte_pieces(api, tokenizer):
    text = book(5000, 7000)
    text = text[:440] + "é日本🙂" + text[440:1500] + " Café, naïve; 日本語 🙂🙂!\n" + text[1500:]
    pieces = byte_pieces(text.encode())
    assert sum(1 for p in pieces if p[0] & 0xC0 == 0x80) >= 2  # pieces that start inside a character
    expected = token_count(tokenizer, text)
    api.post("/v1/sessions", json={"id": "doc"})

    r = upload(api, "doc", pieces)

    assert r.status_code == 200, r.text
    s = r.json()
    chunks = s["chunks"]
    assert sum(c["tokens"] for c in chunks) == s["tokens_received"] == s["tokens_ingested"] == expected
    assert s["session_id"] == "doc" and s["pending_tokens"] == 0
    assert len(chunks) == s["chunks_trained"] == math.ceil(expected / CHUNK)
    assert [c["index"] for c in chunks] == list(range(len(chunks)))
    assert all(c["tokens"] == CHUNK for c in chunks[:-1]) and 0 < chunks[-1]["tokens"] <= CHUNK
    for c in chunks:
        assert c["loss_before"] > 0 and c["loss_after"] > 0 and c["seconds"] > 0
        assert not c["rolled_back"] and c["error"] in (None, "")
    assert s["mean_loss_before"] == pytest.approx(sum(c["loss_before"] for c in chunks) / len(chunks))
    info = api.get("/v1/sessions/doc").json()
    assert info["tokens_ingested"] == expected and info["chunks"] == len(chunks) and info["pending_tokens"] == 0
    assert info["last_loss_before"] == pytest.approx(chunks[-1]["loss_before"])


def test_document_not_ended_keeps_its_tail_pending(api, tokenizer):
    text = book(9000, 11000) + " Ende: 日本 🙂\n"
    data = text.encode()
    # A cut inside a character whose held tokens are not a whole number of chunks: a tail stays pending.
    held = {cut: len(IncrementalTokenizer(tokenizer).feed(data[:cut])) for cut in range(1200, 1260)}
    cut = next(c for c, n in held.items() if n % CHUNK)
    api.post("/v1/sessions", json={"id": "tail"})

    first = upload(api, "tail", byte_pieces(data[:cut]), end=False)

    assert first.status_code == 200, first.text
    s = first.json()
    assert s["tokens_received"] == held[cut] and s["tokens_ingested"] == held[cut] // CHUNK * CHUNK
    assert s["pending_tokens"] == held[cut] % CHUNK > 0
    assert len(s["chunks"]) == s["chunks_trained"] == held[cut] // CHUNK
    info = api.get("/v1/sessions/tail").json()
    assert (info["tokens_ingested"], info["pending_tokens"]) == (s["tokens_ingested"], s["pending_tokens"])
    assert info["document_bytes"] == cut  # a client resuming the document sends data[cut:]

    rest = upload(api, "tail", byte_pieces(data[cut:]))

    assert rest.status_code == 200, rest.text
    r = rest.json()
    total = token_count(tokenizer, text)
    assert r["tokens_ingested"] == total and r["pending_tokens"] == 0
    assert r["tokens_received"] == total - held[cut]
    assert (
        r["chunks"][0]["index"] == s["chunks_trained"]
        and len(r["chunks"]) == math.ceil(total / CHUNK) - s["chunks_trained"]
    )

    # Too short to complete a chunk: nothing trained, no mean loss (null, not NaN: JSON has no NaN).
    api.post("/v1/sessions", json={"id": "short"})
    short = upload(api, "short", b"In the beginning", end=False)
    assert short.status_code == 200, short.text
    assert short.json()["chunks_trained"] == 0 and short.json()["mean_loss_before"] is None
    empty = upload(api, "short", b"")  # an empty body just ends the document
    assert empty.status_code == 200 and empty.json()["tokens_ingested"] == token_count(tokenizer, "In the beginning")


def events_of(response: httpx.Response) -> list[dict | str]:
    """The JSON payloads of a server-sent events response, and "[DONE]"."""
    data = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    return [d if d == "[DONE]" else json.loads(d) for d in data]


def test_document_progress_as_server_sent_events(api, tokenizer):
    """With ``Accept: text/event-stream`` an upload answers one event per chunk as it trains, as gRPC's Ingest."""
    from server.proto.ttt.v1 import ttt_pb2 as pb

    text = book(3000, 4500)
    data = text.encode()
    expected = token_count(tokenizer, text)
    api.post("/v1/sessions", json={"id": "live"})
    headers = {"accept": "text/event-stream", "content-type": "text/plain"}

    with api.stream("POST", "/v1/sessions/live/documents", content=iter(byte_pieces(data)), headers=headers) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = events_of(r)

    started, *chunks, summary, done = events
    assert done == "[DONE]"
    assert started == {
        "object": "document.started",
        "session_id": "live",
        "tokens_ingested": 0,
        "pending_tokens": 0,
        "document_bytes": 0,
    }
    assert {c["object"] for c in chunks} == {"document.chunk"} and summary["object"] == "document.summary"
    assert [c["index"] for c in chunks] == list(range(math.ceil(expected / CHUNK)))
    assert set(pb.ChunkProgress.DESCRIPTOR.fields_by_name) < set(chunks[0])  # gRPC's ChunkProgress and more
    assert [c["tokens_ingested"] for c in chunks] == [min(expected, CHUNK * (i + 1)) for i in range(len(chunks))]
    assert all(0 < c["bytes_read"] <= len(data) and c["tokens_received"] <= expected for c in chunks)
    assert all(c["loss_before"] > 0 and c["loss_after"] > 0 and c["tokens_per_second"] > 0 for c in chunks)
    assert summary["tokens_received"] == summary["tokens_ingested"] == expected
    assert summary["chunks_trained"] == len(chunks) and summary["bytes_read"] == len(data)
    info = api.get("/v1/sessions/live").json()
    assert (info["tokens_ingested"], info["chunks"], info["pending_tokens"]) == (expected, len(chunks), 0)

    # Refusals come before the 200, in the error shape: an unknown session, a bad flag.
    check_error(api.post("/v1/sessions/nobody/documents", content=b"text", headers=headers), 404)
    check_error(
        api.post("/v1/sessions/live/documents", params={"end_of_document": "x"}, content=b"t", headers=headers), 400
    )


def test_a_client_that_leaves_the_event_stream_stops_its_chunks_and_frees_the_session(api, tokenizer):
    """Closing the event stream part way: training stops at the next chunk, the document is not ended (what was
    received waits, pending), and the session takes the next stream at once: a resume from ``document_bytes``
    ends with every token of the text, once."""
    text = book(30_000, 42_000)  # ~3000 tokens: ~90 chunks, far more than trained before the client leaves
    data = text.encode()
    api.post("/v1/sessions", json={"id": "left"})
    headers = {"accept": "text/event-stream", "content-type": "text/plain"}
    with api.stream("POST", "/v1/sessions/left/documents", content=data, headers=headers) as r:
        lines = r.iter_lines()
        chunks = 0
        while chunks < 2:
            chunks += '"document.chunk"' in next(lines)
    for _ in range(600):  # until the stream is released: a second one is no longer a 409
        resumed = api.post(
            "/v1/sessions/left/documents",
            params={"document_offset": len(data) + 1, "end_of_document": "false"},
            content=b"",
        )
        if resumed.status_code != 409 or "one stream at a time" not in resumed.text:
            break
        time.sleep(0.05)
    # a wrong offset: refused, nothing read; the code says which conflict (a client retries after a resync)
    assert check_error(resumed, 409, "is not where session 'left'")["code"] == "document_offset"
    info = api.get("/v1/sessions/left").json()
    assert info["document_bytes"] == len(data)  # received in full, not ended
    expected = token_count(tokenizer, text)
    assert 2 <= info["chunks"] < math.ceil(expected / CHUNK) and info["pending_tokens"] > 0

    rest = api.post("/v1/sessions/left/documents", params={"document_offset": len(data)}, content=b"")
    assert rest.status_code == 200, rest.text
    info = api.get("/v1/sessions/left").json()
    assert (info["tokens_ingested"], info["pending_tokens"], info["document_bytes"]) == (expected, 0, 0)


def test_one_document_stream_per_session(api, open_server):
    api.post("/v1/sessions", json={"id": "shared"})
    api.post("/v1/sessions", json={"id": "other"})
    with open_server.state.registry.feeding("local", "shared"):  # a stream is feeding it (as a gRPC Ingest would)
        busy = check_error(upload(api, "shared", b"In the beginning"), 409, "one stream at a time")
        assert busy["code"] == "session_busy"
        assert upload(api, "other", b"In the beginning God created").status_code == 200  # other sessions: free
    assert upload(api, "shared", b"In the beginning God created").status_code == 200


def test_adapter_download_is_a_peft_folder_that_imports_back(api):
    api.post("/v1/sessions", json={"id": "exported", "settings": {"fast": {"rank": 4}}})
    assert upload(api, "exported", book(0, 600).encode()).status_code == 200

    r = api.get("/v1/sessions/exported/adapter")

    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    assert 'filename="exported-adapter.zip"' in r.headers["content-disposition"]
    files = {
        name: zipfile.ZipFile(io.BytesIO(r.content)).read(name)
        for name in zipfile.ZipFile(io.BytesIO(r.content)).namelist()
    }
    assert sorted(files) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads(files["adapter_config.json"])["r"] == 4
    imported = api.post(
        "/v1/sessions",
        json={
            "id": "reimported",
            "adapter": {
                "adapter_config": json.loads(files["adapter_config.json"]),
                "adapter_model": base64.b64encode(files["adapter_model.safetensors"]).decode(),
            },
        },
    )
    assert imported.status_code == 201, imported.text
    again = api.get("/v1/sessions/reimported/adapter")
    again_weights = zipfile.ZipFile(io.BytesIO(again.content)).read("adapter_model.safetensors")
    assert load_safetensors(again_weights).keys() == load_safetensors(files["adapter_model.safetensors"]).keys()
    for name, tensor in load_safetensors(files["adapter_model.safetensors"]).items():
        assert torch.equal(load_safetensors(again_weights)[name], tensor), name

    api.post("/v1/sessions", json={"id": "extra-mlp", "settings": {"fast": {"kind": "mlp"}}})
    check_error(api.get("/v1/sessions/extra-mlp/adapter"), 400, "only LoRA sessions")
    check_error(api.get("/v1/sessions/nobody/adapter"), 404)


def test_settings_schema_is_the_config_schema_under_the_server_defaults(api):
    from ttt.config import DEFAULT_MEMORY, PRESETS, SCHEMA, SessionConfig

    r = api.get("/v1/settings")

    assert r.status_code == 200
    doc = r.json()
    assert doc["memory"] == DEFAULT_MEMORY and doc["presets"] == json.loads(json.dumps(PRESETS))
    assert [(f["section"], f["name"]) for f in doc["fields"]] == [(s.section, s.name) for s in SCHEMA]
    fields = {(f["section"], f["name"]): f for f in doc["fields"]}
    assert fields["fast", "rank"] | {"doc": None} == {
        "section": "fast",
        "name": "rank",
        "type": "integer",
        "default": 16,
        "doc": None,
        "minimum": 1,
        "maximum": 1024,
        "max_length": None,
        "per_chunk": False,
    }
    assert fields["recall", "replay_lr"]["type"] == "number|null" and fields["fast", "targets"]["type"] == "array"
    assert fields["ingest", "chunk_tokens"]["default"] == CHUNK  # the server's session defaults apply
    for preset in PRESETS:
        config = SessionConfig.from_dict({**TINY, "memory": preset}).to_dict()
        assert doc["defaults"][preset] == json.loads(json.dumps(config)), preset


def test_console_page_needs_no_key_and_readyz_says_whether_the_api_does(api, keyed_server):
    assert api.get("/readyz").json()["api_keys"] is False
    with http(keyed_server) as anonymous:
        assert anonymous.get("/readyz").json()["api_keys"] is True
        page = anonymous.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert '<script type="module" src="/console/console.js">' in page.text
        for name, kind in [
            ("console.js", "javascript"),
            ("api.js", "javascript"),
            ("curve.js", "javascript"),
            ("console.css", "text/css"),
        ]:
            r = anonymous.get(f"/console/{name}")
            assert r.status_code == 200 and kind in r.headers["content-type"], name
        check_error(anonymous.get("/console/missing.js"), 404)
        for path in ("/", "/console/console.js"):  # no other site may frame the page or feed it scripts
            headers = anonymous.get(path).headers
            assert headers["x-frame-options"] == "DENY", path
            assert "frame-ancestors 'none'" in headers["content-security-policy"], path
            assert "default-src 'self'" in headers["content-security-policy"], path
        check_error(anonymous.get("/v1/settings"), 401)
    # open mode: the page, like the API, answers this machine's names only
    check_error(api.get("/", headers={"host": "example.com"}), 403)


def test_upload_cut_off_by_the_client_keeps_completed_chunks(api, open_server):
    data = book(20000, 24000).encode()
    api.post("/v1/sessions", json={"id": "cut"})

    def body():
        yield from byte_pieces(data[:1000])
        for _ in range(600):  # give up only once the server has taken some of it (else there is nothing to keep)
            if api.get("/v1/sessions/cut").json()["document_bytes"]:
                break
            time.sleep(0.05)
        yield from byte_pieces(data[1000:2000])
        raise RuntimeError("the client gives up mid-upload")

    def gone_requests():  # uploads that ended because the client went away (499)
        return metric(
            metric_samples(api),
            "ttt_requests_total",
            api="http",
            method="POST /v1/sessions/{session_id}/documents",
            status="499",
        )

    before = gone_requests()
    with log_records("ttt") as errors, log_records("uvicorn.error") as uvicorn_errors:
        with pytest.raises(RuntimeError):
            api.post("/v1/sessions/cut/documents", content=body(), headers={"content-type": "text/plain"})
        for _ in range(600):  # until the server has noticed and finished the request (30 s)
            if gone_requests() > before:
                break
            time.sleep(0.05)
    assert gone_requests() == before + 1
    info = api.get("/v1/sessions/cut").json()  # completed chunks are kept, the rest waits for the next upload
    assert 0 < info["document_bytes"] <= 2000 and info["tokens_ingested"] % CHUNK == 0
    assert api.get("/healthz").status_code == 200
    assert not errors and not uvicorn_errors  # a client going away is not a server error


# ---- chat on the tiny model ------------------------------------------------------------------------------------------


def test_chat_on_a_session_never_changes_it(api, open_server, tokenizer):
    api.post("/v1/sessions", json={"id": "chatty"})
    assert upload(api, "chatty", book(40000, 41000).encode()).status_code == 200
    registry, scheduler = open_server.state.registry, open_server.state.scheduler
    session = registry.get("local", "chatty")
    probe = book(41000, 41300)
    before = (
        api.get("/v1/sessions/chatty").json(),
        session.version,
        scheduler.run(("local", "chatty"), session.score, probe),
    )
    client = oai(open_server)

    answer = chat(client, "chatty", max_tokens=8)
    check_answer(answer, 8)
    assert answer.model == "chatty" and answer.id.startswith("chatcmpl-")
    check_stream(stream_chat(client, "chatty", max_tokens=8), answer)
    assert chat(client, "chatty", max_tokens=8).choices[0].message.content == answer.choices[0].message.content
    sampled = chat(client, "chatty", temperature=0.9, top_p=0.9, seed=7, max_tokens=8, stop=["\n"])
    check_answer(sampled, 8)

    after = (
        api.get("/v1/sessions/chatty").json(),
        session.version,
        scheduler.run(("local", "chatty"), session.score, probe),
    )
    # Only the memory held may grow: answers that read the window keep its keys/values for the next answer (one
    # that reads its question's notes alone keeps none).
    assert after[0].pop("resident_bytes") >= before[0].pop("resident_bytes")
    assert after == before


# ---- errors ----------------------------------------------------------------------------------------------------------

BAD_CHATS = [
    ("missing messages", {"messages": MISSING}, "messages"),
    ("empty messages", {"messages": []}, "messages"),
    ("bad role", {"messages": [{"role": "robot", "content": "hi"}]}, "role"),
    (
        "non-text content",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "content",
    ),
    ("missing model", {"model": MISSING}, "model"),
    ("n=2", {"n": 2}, "^n:"),
    ("temperature 3", {"temperature": 3}, "temperature"),
    ("top_p 0", {"top_p": 0}, "top_p"),
    ("max_tokens 0", {"max_tokens": 0}, "max_tokens"),
    ("max_tokens beyond the context", {"max_tokens": 100_000}, "context"),
    ("prompt too long for the context", {"messages": [{"role": "user", "content": "Amen. " * 600}]}, "context"),
    ("five stops", {"stop": list("abcde")}, "stop"),
    ("seed beyond 64 bits", {"seed": 2**64}, "seed"),
    ("bad session id as model", {"model": "../etc"}, "session id must be"),
]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_bad_chat_requests_are_400(api, stream):
    api.post("/v1/sessions", json={"id": "s400"})
    for _name, change, match in BAD_CHATS:
        body = {"model": "s400", "messages": QUESTION, "max_tokens": 4, "stream": stream, **change}
        body = {k: v for k, v in body.items() if v is not MISSING}
        check_error(api.post("/v1/chat/completions", json=body), 400, match=match)
    for raw in (b'{"model": "s400", "messages": [', b"[1, 2]", b"\xff\xfe", b'"text"', b""):
        check_error(api.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"}), 400)
    nan = b'{"model": "s400", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'
    check_error(
        api.post("/v1/chat/completions", content=nan, headers={"content-type": "application/json"}), 400, "temperature"
    )
    assert api.get("/healthz").status_code == 200


def test_bad_requests_through_the_openai_client(open_server):
    client = oai(open_server)
    base = base_name(client)
    with api_error(400, "temperature"):
        chat(client, base, temperature=3)
    with api_error(400, "^n:"):
        chat(client, base, n=2)
    with api_error(400, "context"):
        chat(client, base, messages=[{"role": "user", "content": "Amen. " * 600}])
    with api_error(400, "context"):
        chat(client, base, max_tokens=100_000, stream=True)
    with api_error(404, "no session"):
        chat(client, "no-such-session")
    with api_error(404):
        chat(client, "no-such-session", stream=True)


def test_bad_session_ids_in_paths_are_400(api):
    routes = [
        ("GET", "/v1/sessions/{}"),
        ("DELETE", "/v1/sessions/{}"),
        ("POST", "/v1/sessions/{}/save"),
        ("POST", "/v1/sessions/{}/reset"),
        ("POST", "/v1/sessions/{}/documents"),
    ]
    for bad in (".hidden", "-x", "a..b", "x" * 129, "é", "a b"):
        for method, route in routes:
            check_error(api.request(method, route.format(bad), content=b"text"), 400, match="session id must be")
    api.post("/v1/sessions", json={"id": "flag"})
    check_error(api.post("/v1/sessions/flag/documents", params={"end_of_document": "maybe"}, content=b"x"), 400)


def test_unknown_session_and_route_are_404(api):
    for method, path in [
        ("GET", "/v1/sessions/ghost"),
        ("DELETE", "/v1/sessions/ghost"),
        ("POST", "/v1/sessions/ghost/save"),
        ("POST", "/v1/sessions/ghost/reset"),
        ("POST", "/v1/sessions/ghost/documents"),
    ]:
        check_error(api.request(method, path, content=b"text"), 404, match="no session 'ghost'")
    check_error(api.get("/v1/nothing-here"), 404)
    check_error(api.put("/v1/models"), 405)


def test_missing_or_wrong_key_is_401(keyed_server):
    with http(keyed_server) as anonymous:
        for method, path in [
            ("GET", "/v1/models"),
            ("GET", "/v1/sessions"),
            ("POST", "/v1/sessions"),
            ("GET", "/v1/sessions/x"),
            ("POST", "/v1/sessions/x/documents"),
        ]:
            kwargs = {"json": {}} if path == "/v1/sessions" and method == "POST" else {}
            check_error(anonymous.request(method, path, **kwargs), 401, match="missing bearer key")
        check_error(anonymous.post("/v1/chat/completions", json={"model": "x", "messages": QUESTION}), 401)
        check_error(anonymous.get("/v1/models", headers={"authorization": f"Basic {KEY_A}"}), 401)
        assert anonymous.get("/healthz").status_code == 200 and anonymous.get("/readyz").status_code == 200
    with http(keyed_server, "ttt-not-a-key") as stranger:
        check_error(stranger.get("/v1/sessions"), 401, match="unknown API key")
    with api_error(401, "unknown API key"):
        oai(keyed_server, "ttt-not-a-key").models.list()
    with api_error(401):
        chat(oai(keyed_server, "ttt-not-a-key"), "x")


def test_other_users_sessions_are_invisible(keyed_server):
    secret = "Alice's private diary: the treasure is under the old oak by the river."
    alice_api, bob_api = http(keyed_server, KEY_A), http(keyed_server, KEY_B)
    with alice_api, bob_api:
        assert alice_api.post("/v1/sessions", json={"id": "diary"}).status_code == 201
        assert upload(alice_api, "diary", secret.encode()).status_code == 200
        info = alice_api.get("/v1/sessions/diary").json()

        messages = [
            check_error(bob_api.get("/v1/sessions/diary"), 404),
            check_error(bob_api.post("/v1/sessions/diary/save"), 404),
            check_error(bob_api.post("/v1/sessions/diary/reset"), 404),
            check_error(bob_api.post("/v1/sessions/diary/documents", content=b"overwrite"), 404),
            check_error(bob_api.delete("/v1/sessions/diary"), 404),
        ]
        with api_error(404) as e:
            chat(oai(keyed_server, KEY_B), "diary")
        messages.append(e.value.body)
        for m in messages:
            assert "alice" not in json.dumps(m).lower() and "treasure" not in json.dumps(m)
        assert "diary" not in {s["id"] for s in bob_api.get("/v1/sessions").json()["data"]}

        # ids are per user: bob may have his own "diary"
        assert bob_api.post("/v1/sessions", json={"id": "diary"}).status_code == 201
        assert bob_api.delete("/v1/sessions/diary").status_code == 200
        assert alice_api.get("/v1/sessions/diary").json() == info  # untouched


def test_document_over_the_limit_is_429(tiny_model_dir, tmp_path, tokenizer):
    with running(tiny_model_dir, tmp_path, max_document_tokens=40) as server, http(server) as api:
        api.post("/v1/sessions", json={"id": "big"})
        check_error(upload(api, "big", book(0, 3000).encode()), 429, match="over the limit of 40 tokens")
        assert api.get("/v1/sessions/big").json()["tokens_ingested"] == 0
        small = "In the beginning God created the heaven and the earth."
        r = upload(api, "big", small.encode())
        assert r.status_code == 200 and r.json()["tokens_ingested"] == token_count(tokenizer, small)


def test_queue_full_is_429(tiny_model_dir, tmp_path):
    with running(tiny_model_dir, tmp_path, max_queue=1) as server, http(server) as api:
        client = oai(server)
        base = base_name(client)
        scheduler = server.state.scheduler
        started, release = threading.Event(), threading.Event()

        def block():
            started.set()
            release.wait(TIMEOUT)

        busy = scheduler.submit("test-blocker", block)
        try:
            assert started.wait(TIMEOUT)
            waiting = scheduler.submit("test-filler", lambda: None)  # the one place in the queue
            with api_error(429, "waiting"):
                chat(client, base)
            with api_error(429):
                chat(client, base, stream=True)
            check_error(api.post("/v1/sessions", json={"id": "q"}), 429)
            assert metric(metric_samples(api), "ttt_queue_depth") == 1
            assert api.get("/healthz").status_code == 200
        finally:
            release.set()
        busy.result(TIMEOUT), waiting.result(TIMEOUT)
        check_answer(chat(client, base), 6)  # and the server works again


def test_concurrent_chats_of_different_sessions_decode_together_as_they_would_alone(open_server, api, monkeypatch):
    """Three sessions (different ranks and kinds) and the base model asked at once: their rows share every decode
    step, each answer is the one it gets alone (greedy), and /metrics shows the batch and its pool."""
    client = oai(open_server)
    base = base_name(client)
    for sid, fast in (
        ("rows-a", {"rank": 2}),
        ("rows-b", {"rank": 8, "targets": ["gate_proj", "down_proj"]}),
        ("rows-c", {"kind": "mlp", "mlp_hidden": 16}),
    ):
        assert api.post("/v1/sessions", json={"id": sid, "settings": {**TINY, "fast": fast}}).status_code == 201
        upload(api, sid, book(1000 * len(sid), 1000 * len(sid) + 900).encode())
    models = ["rows-a", "rows-b", "rows-c", base]
    alone = [chat(client, m, max_tokens=12).choices[0].message.content for m in models]

    batch, sizes = open_server.state.scheduler.answers, []
    real_decode = batch.decode
    monkeypatch.setattr(batch, "decode", lambda: (sizes.append(len(batch)), real_decode())[1])
    scheduler, started, release = open_server.state.scheduler, threading.Event(), threading.Event()
    gate = scheduler.submit("test-gate", lambda: (started.set(), release.wait(TIMEOUT)))  # hold the device
    assert started.wait(TIMEOUT)
    together: dict[str, str] = {}
    threads = [
        threading.Thread(
            target=lambda m=m: together.__setitem__(
                m, chat(oai(open_server), m, max_tokens=12).choices[0].message.content
            )
        )
        for m in models
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + TIMEOUT
    while scheduler.answers_waiting < len(models) and time.monotonic() < deadline:  # every request queued
        time.sleep(0.01)
    release.set()
    gate.result(TIMEOUT)
    for t in threads:
        t.join(TIMEOUT)
    assert [together[m] for m in models] == alone
    assert max(sizes) == len(models)  # one forward per token for all four, not one answer after another
    samples = metric_samples(api)
    assert metric(samples, "ttt_answer_step_rows_count") > 0 and metric(samples, "ttt_answer_rows") == 0
    assert metric(samples, "ttt_answer_pool_bytes") == 0  # freed once the last row left
    assert metric(samples, "ttt_answer_pool_budget_bytes") == open_server.state.settings.answer_kv_bytes


def test_an_answer_the_pool_can_never_hold_is_400(open_server, api, monkeypatch):
    monkeypatch.setattr(open_server.state.scheduler.answers.pool, "budget", 1000)  # bytes: not one token
    with api_error(400, "TTT_ANSWER_KV_BYTES"):
        chat(oai(open_server), base_name(oai(open_server)))
    monkeypatch.undo()
    check_answer(chat(oai(open_server), base_name(oai(open_server))), 6)


def test_unavailable_is_503(open_server, api):
    client = oai(open_server)
    base = base_name(client)
    state = open_server.state
    state.phase = "closing"
    try:
        check_error(api.get("/readyz"), 503, match="shutting down")
        with api_error(503, "shutting down"):
            chat(client, base)
        check_error(api.post("/v1/sessions", json={}), 503)
        assert api.get("/healthz").status_code == 200
    finally:
        state.phase = "serving"
    state.phase = "loading"  # as until both doors accept connections
    try:
        check_error(api.get("/readyz"), 503, match="starting")
        check_error(api.get("/v1/models"), 503)
        with api_error(503, "starting"):
            chat(client, base, stream=True)
        assert api.get("/healthz").status_code == 200
    finally:
        state.phase = "serving"
    assert api.get("/readyz").status_code == 200


def test_a_bug_is_a_clean_500(open_server, api, monkeypatch):
    def broken(user):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(open_server.state.registry, "ids", broken)
    with log_records("ttt.server.http") as logged, log_records("uvicorn.error") as uvicorn_errors:
        err = check_error(api.get("/v1/sessions"), 500)
        assert err == {"message": "internal error", "type": "server_error", "param": None, "code": None}
        assert api.get("/healthz").status_code == 200  # the same connection still works
    assert len(logged) == 1 and "secret internal detail" in str(logged[0].exc_info[1])  # logged once, by us
    assert not uvicorn_errors


# ---- a client that goes away mid-answer ------------------------------------------------------------------------------


def test_stream_disconnect_stops_the_decode(open_server, api, monkeypatch):
    """The client reads the first event and hangs up; its row leaves the batch at the next step, the server stays
    healthy."""
    engine, batch = open_server.state.engine, open_server.state.scheduler.answers
    real_decode, rows = batch.decode, []

    def paced_decode():  # a token every 20 ms, so that the whole answer would take seconds
        time.sleep(0.02)
        rows.extend(r for r in batch.rows if r not in rows)
        return real_decode()

    monkeypatch.setattr(batch, "decode", paced_decode)
    max_tokens = 300
    body = {"model": engine.base.name, "messages": QUESTION, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    with log_records("ttt") as errors, log_records("uvicorn.error") as uvicorn_errors:
        with api.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            lines = (json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: "))
            assert next(lines)["choices"][0]["delta"]["role"] == "assistant"
            next(e for e in lines if e["choices"][0]["delta"].get("content"))  # the decode has started
        # leaving the block closed the connection mid-answer: the row is dropped, nothing left running
        deadline = time.monotonic() + TIMEOUT
        while len(batch) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(batch) == 0 and batch.pool.num_bytes() == 0
        assert api.get("/healthz").status_code == 200
        monkeypatch.setattr(batch, "decode", real_decode)
        check_answer(chat(oai(open_server), engine.base.name), 6)
    (row,) = rows
    assert row.finish_reason is None and row.completion_tokens < max_tokens / 2  # stopped early, not at max_tokens
    assert not errors and not uvicorn_errors


# ---- metrics ---------------------------------------------------------------------------------------------------------


def test_metrics(api, open_server, tokenizer):
    before = metric_samples(api)
    api.post("/v1/sessions", json={"id": "metered"})
    text = book(60000, 61500)
    summary = upload(api, "metered", text.encode()).json()
    chat(oai(open_server), "metered", max_tokens=5)
    check_error(api.get("/v1/sessions/ghost"), 404)
    check_error(api.post("/v1/chat/completions", json={}), 400)
    after = metric_samples(api)

    names = {name for name, _ in after}
    assert {
        "ttt_requests_total",
        "ttt_errors_total",
        "ttt_tokens_ingested_total",
        "ttt_chunks_total",
        "ttt_queue_depth",
        "ttt_sessions",
        "ttt_session_bytes",
        "ttt_tokens_generated_total",
        "ttt_decode_tokens_per_second_bucket",
        "ttt_decode_tokens_per_second_count",
        "ttt_time_to_first_token_seconds_bucket",
        "ttt_answer_queue_seconds_bucket",
        "ttt_ingest_tokens_per_second_bucket",
        "ttt_ingest_tokens_per_second_count",
    } <= names

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("ttt_tokens_ingested_total") == token_count(tokenizer, text) == summary["tokens_ingested"]
    assert delta("ttt_chunks_total", outcome="applied") == summary["chunks_trained"]
    assert delta("ttt_ingest_tokens_per_second_count") == summary["chunks_trained"]
    assert delta("ttt_decode_tokens_per_second_count") == 1 and delta("ttt_tokens_generated_total") > 0
    assert delta("ttt_time_to_first_token_seconds_count") == 1 and delta("ttt_time_to_first_token_seconds_sum") > 0
    # queued to joining the batch: part of the time to first token
    assert delta("ttt_answer_queue_seconds_count") == 1
    assert 0 <= delta("ttt_answer_queue_seconds_sum") <= delta("ttt_time_to_first_token_seconds_sum")
    # the session was never asked before: its window's keys/values were built for the question, unless the
    # question found notes, read alone
    state = open_server.state
    session = state.registry.get("local", "metered")
    alone = state.scheduler.run(("local", "metered"), lambda: session.reading(QUESTION[-1]["content"])[1] is None)
    found = [delta("ttt_answer_prefixes_total", found=f) for f in PREFIX_FOUND]
    assert found == ([0, 0, 0, 1] if alone else [0, 0, 1, 0])
    assert delta("ttt_errors_total", api="http", status="404") == 1
    assert delta("ttt_errors_total", api="http", status="400") == 1
    assert delta("ttt_requests_total", api="http", method="GET /v1/sessions/{session_id}", status="404") == 1
    assert delta("ttt_requests_total", api="http", method="POST /v1/chat/completions", status="200") == 1
    assert delta("ttt_requests_total", api="http", method="POST /v1/sessions", status="201") == 1
    assert metric(after, "ttt_queue_depth") == 0
    residency = open_server.state.registry.residency()
    assert metric(after, "ttt_sessions", tier="device") == residency["device"][0] > 0
    assert metric(after, "ttt_session_bytes", tier="device") == residency["device"][1] > 0


# ---- fuzzing from the OpenAPI document (schemathesis) ----------------------------------------------------------------

OPERATIONS = [
    ("GET", "/v1/models"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("GET", "/v1/sessions"),
    ("POST", "/v1/sessions"),
    ("GET", "/v1/sessions/{session_id}"),
    ("DELETE", "/v1/sessions/{session_id}"),
    ("POST", "/v1/sessions/{session_id}/save"),
    ("POST", "/v1/sessions/{session_id}/reset"),
    ("POST", "/v1/sessions/{session_id}/documents"),
    ("GET", "/v1/sessions/{session_id}/adapter"),
    ("GET", "/v1/settings"),
]
FUZZ_EXAMPLES = 30


@pytest.fixture(scope="module")
def fuzz_target(tiny_model_dir, tmp_path_factory):
    """A server of its own (fuzzing creates and deletes sessions) and its schema as schemathesis loads it."""
    schemathesis = pytest.importorskip("schemathesis")
    with running(tiny_model_dir, tmp_path_factory.mktemp("http-fuzz")) as server:
        base_url = f"http://127.0.0.1:{server.http_port}"
        with http(server) as api:  # a session the fuzzer may find (ids it generates are mostly random)
            api.post("/v1/sessions", json={"id": "a"})
        yield schemathesis.openapi.from_url(f"{base_url}/openapi.json"), base_url


def test_fuzzed_operations_are_the_whole_v1_api(fuzz_target):
    schema, _ = fuzz_target
    found = {(op.ok().method.upper(), op.ok().path) for op in schema.get_all_operations()}
    assert {op for op in found if op[1].startswith("/v1/")} == set(OPERATIONS)


@pytest.mark.parametrize("mode", ["positive", "negative"])
@pytest.mark.parametrize("method,path", OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_fuzz_no_server_errors(fuzz_target, method, path, mode):
    """Generated requests (valid and invalid for the schema): never a 5xx; every 4xx in OpenAI's error shape."""
    import requests
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error

    schema, base_url = fuzz_target
    operation = schema[path][method]
    if mode == "negative" and not (len(operation.body) or len(operation.query)):
        pytest.skip("nothing to make invalid: no body or query (a path parameter is any string)")
    session = requests.Session()

    @settings(
        max_examples=FUZZ_EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=GenerationMode(mode)))
    def one(case):
        response = case.call(base_url=base_url, session=session, timeout=TIMEOUT)
        case.validate_response(response, checks=[not_a_server_error])
        if response.status_code >= 400:
            err = response.json()["error"]
            assert err["message"] and err["type"] and "Traceback" not in response.text, response.text

    one()


# ---- the default model (slow) ----------------------------------------------------------------------------------------

DEFAULT = {"ingest": {"chunk_tokens": 128, "context_tokens": 128}}
KJV = (150000, 156000)  # ~1500 tokens of Genesis (Joseph in Potiphar's house)
ASK = [{"role": "user", "content": "Who was Joseph's master in Egypt? Answer in one sentence."}]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def kjv(default_model_dir, tmp_path_factory):
    """A default-model server with the session "kjv" that read the KJV slice; {"server": ..., "dir": ...}.

    A test may replace the server (restart on the same data dir); the one current at the end is stopped.
    """
    data_dir = tmp_path_factory.mktemp("http-default")
    state = {"dir": data_dir}
    with running(default_model_dir, data_dir, defaults=DEFAULT) as server:
        state["server"] = server
        with http(server) as api:
            assert api.post("/v1/sessions", json={"id": "kjv"}).status_code == 201
            r = upload(api, "kjv", byte_pieces(book(*KJV).encode(), sizes=(4096, 1000)))
            assert r.status_code == 200, r.text
            state["summary"] = r.json()
        try:
            yield state
        finally:
            if state["server"] is not server:
                state["server"].stop()


@pytest.mark.slow
def test_default_model_chat(kjv):
    assert kjv["summary"]["tokens_ingested"] > 1400 and kjv["summary"]["chunks_trained"] >= 11
    client = oai(kjv["server"])

    answer = chat(client, "kjv", messages=ASK, max_tokens=MAX_TOKENS)

    check_answer(answer, MAX_TOKENS)
    assert answer.choices[0].message.content.strip()
    again = chat(client, "kjv", messages=ASK, max_tokens=MAX_TOKENS)
    assert again.choices[0].message.content == answer.choices[0].message.content  # greedy is deterministic
    check_stream(stream_chat(client, "kjv", messages=ASK, max_tokens=MAX_TOKENS), answer)


@pytest.mark.slow
def test_default_base_model_answers_without_a_session(kjv):
    client = oai(kjv["server"])
    models = client.models.list().data
    base = base_name(client)
    assert {m.id: m.parent for m in models}["kjv"] == base

    plain = chat(client, base, messages=ASK, max_tokens=MAX_TOKENS)
    check_answer(plain, MAX_TOKENS)
    session = chat(client, "kjv", messages=ASK, max_tokens=MAX_TOKENS)
    assert plain.choices[0].message.content != session.choices[0].message.content
    # the session's prompt starts with the kept spans the question names (Joseph, Egypt, master), read alone by
    # the base model (notes_alone: no window)
    with http(kjv["server"]) as api:
        assert api.get("/v1/sessions/kjv").json()["exact_tokens_read"] > 0
    state = kjv["server"].state
    notes = state.scheduler.run(("local", "kjv"), lambda: state.registry.get("local", "kjv").notes(ASK[0]["content"]))
    assert 0 < len(notes) <= 512
    assert session.usage.prompt_tokens - plain.usage.prompt_tokens == len(notes)


@pytest.mark.slow
def test_default_session_saved_and_reloaded_after_restart(kjv, default_model_dir):
    with http(kjv["server"]) as api:
        before = chat(oai(kjv["server"]), "kjv", messages=ASK, max_tokens=MAX_TOKENS).choices[0].message.content
        saved = api.post("/v1/sessions/kjv/save")
        assert saved.status_code == 200
        saved = saved.json()
    kjv["server"].stop()

    server = Server(
        Settings(
            model=str(default_model_dir),
            device="cpu",
            grpc_port=0,
            http_port=0,
            data_dir=kjv["dir"],
            session_defaults=DEFAULT,
        )
    )
    server.start()
    kjv["server"] = server
    with http(server) as api:
        on_disk = api.get("/v1/sessions/kjv").json()
        assert on_disk["residency"] == "disk"
        for field in ("tokens_ingested", "chunks", "pending_tokens", "last_loss_before"):
            assert on_disk[field] == saved[field], field
        after = chat(oai(server), "kjv", messages=ASK, max_tokens=MAX_TOKENS).choices[0].message.content
        assert after == before
        assert api.get("/v1/sessions/kjv").json()["residency"] == "device"


def test_session_info_has_the_same_fields_in_memory_and_on_disk(tiny_model_dir, tmp_path):
    """The typed SessionInfo of a loaded session and of one only on disk (read from its checkpoint) agree."""
    from server.http.models import SessionInfo

    with running(tiny_model_dir, tmp_path) as server, http(server) as api:
        api.post("/v1/sessions", json={"id": "kept"})
        assert upload(api, "kept", book(0, 400).encode()).status_code == 200
        loaded = api.post("/v1/sessions/kept/save").json()
    with running(tiny_model_dir, tmp_path) as server, http(server) as api:
        on_disk = api.get("/v1/sessions/kept").json()
        listed = api.get("/v1/sessions").json()["data"]
    assert set(loaded) == set(on_disk) == set(SessionInfo.model_fields)
    assert (loaded["residency"], on_disk["residency"]) == ("device", "disk") and listed == [on_disk]
    for name in ("tokens_ingested", "chunks", "document_bytes", "memory", "memory_spans", "exact_tokens_read"):
        assert loaded[name] == on_disk[name], name
