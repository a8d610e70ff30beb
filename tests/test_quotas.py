"""Per-user quotas and limits, residency and checkpoint fallbacks, as both front doors report them.

One keyed server (alice, bob) on the tiny model with small limits: a disk quota of one session,
40 tokens per document, 3 pieces per stream, one open stream per user. Over a limit is gRPC
RESOURCE_EXHAUSTED / HTTP 429, and changes nothing. (A tiny session's checkpoint is about 140 KB,
and a session counts for two: the previous checkpoint stays as a fallback.)
"""

from __future__ import annotations

import base64
import json
import threading

import grpc
import httpx
import pytest
from conftest import started_server
from prometheus_client.parser import text_string_to_metric_families

from clients.client import TTTClient, TTTError
from server.auth import hash_key
from ttt.peft import peft_files

pytestmark = pytest.mark.usefixtures("one_thread")
# the 2048-token span pool of before: a tiny session's checkpoint is then estimated at about 140 KB (16384 tokens
# of pool would add about 230 KB of token ids and span fields to the estimate, more than these quotas assume)
DEFAULTS = {"ingest": {"chunk_tokens": 32, "context_tokens": 32}, "recall": {"pool_tokens": 2048}}
KEYS = {"alice": "key-a", "bob": "key-b"}
WORDS = "In the beginning God created the heaven and the earth. And the earth was without form, and void."


def running(model_dir, data_dir, **settings):
    keys = data_dir / "keys.json"
    keys.write_text(json.dumps({user: [hash_key(k)] for user, k in KEYS.items()}))
    return started_server(model_dir, data_dir, DEFAULTS, stop_grace=2, api_keys_file=keys, **settings)


def clients(server, user):
    rpc = TTTClient(f"127.0.0.1:{server.grpc_port}", KEYS[user], timeout=60)
    web = httpx.Client(
        base_url=f"http://127.0.0.1:{server.http_port}", timeout=60, headers={"authorization": f"Bearer {KEYS[user]}"}
    )
    return rpc, web


def exhausted(fn, *args, match: str) -> str:
    with pytest.raises(TTTError) as info:
        list(fn(*args)) if fn.__name__ == "ingest" else fn(*args)
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and match in info.value.message, info.value
    return info.value.message


def too_many(response: httpx.Response, match: str) -> None:
    assert response.status_code == 429, response.text
    assert match in response.json()["error"]["message"]


@pytest.fixture(scope="module")
def limited(tiny_model_dir, tmp_path_factory):
    with running(
        tiny_model_dir,
        tmp_path_factory.mktemp("quota-data"),
        max_bytes_per_user=400_000,
        max_document_tokens=40,
        max_pieces_per_stream=3,
        max_streams_per_user=1,
    ) as server:
        yield server


def test_disk_quota_refuses_a_create_and_leaves_nothing(limited):
    rpc, web = clients(limited, "alice")
    rpc.create_session("first")
    rpc.save_session("first")
    exhausted(rpc.create_session, "second", match="disk quota")
    too_many(web.post("/v1/sessions", json={"id": "third"}), "disk quota")
    users = limited.settings.data_dir / "users"
    assert sorted(p.name for p in (users / "alice").iterdir()) == ["first"]
    assert [s["session_id"] for s in rpc.list_sessions()] == ["first"]
    clients(limited, "bob")[0].create_session("second")  # a quota per user: bob has room


# The tests below use the sessions the first one made: alice's "first", bob's "second".


def test_document_and_piece_limits_keep_what_came_before(limited):
    rpc, web = clients(limited, "bob")

    def held() -> int:
        info = rpc.get_session("second")
        return info["tokens_ingested"] + info["pending_tokens"]

    exhausted(rpc.ingest, "second", ["In the beginning", " God created", " the heaven", " and"], match="3 pieces")
    after_pieces = held()
    assert after_pieces > 0  # the first three pieces stay
    exhausted(rpc.ingest, "second", [WORDS * 3], match="limit of 40 tokens")
    too_many(web.post("/v1/sessions/second/documents", content=(WORDS * 3).encode()), "limit of 40 tokens")
    # as events, the limit is found after the 200 (the body is read as it trains): said in the stream
    r = web.post("/v1/sessions/second/documents", content=(WORDS * 3).encode(), headers={"accept": "text/event-stream"})
    assert r.status_code == 200
    *_, last = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert last["error"]["code"] == 429 and "limit of 40 tokens" in last["error"]["message"]
    assert held() == after_pieces  # the refused pieces changed nothing


def test_one_open_stream_per_user(limited):
    rpc, web = clients(limited, "alice")
    bob = clients(limited, "bob")[0]
    release, started = threading.Event(), threading.Event()

    def slow_pieces():
        yield "In the beginning"
        started.set()
        release.wait(30)

    stream = threading.Thread(target=lambda: list(rpc.ingest("first", slow_pieces())))
    stream.start()
    try:
        assert started.wait(30)
        exhausted(rpc.ingest, "first", ["more"], match="streams open at once")
        too_many(web.post("/v1/sessions/first/documents", content=b"more"), "streams open at once")
        assert [e["type"] for e in bob.ingest("second", ["Hello"])][-1] == "summary"  # bob is not limited by alice
    finally:
        release.set()
        stream.join(30)
    assert [e["type"] for e in rpc.ingest("first", ["again"])][-1] == "summary"  # the slot is free again


def metric(server, name: str, **labels) -> float:
    text = httpx.get(f"http://127.0.0.1:{server.http_port}/metrics").text
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_import_residency_and_fallback_on_both_doors(tiny_model_dir, tmp_path):
    with running(tiny_model_dir, tmp_path, device_budget_bytes=1, host_budget_bytes=1) as server:
        rpc, web = clients(server, "alice")
        trained = server.state.engine.create_session({"fast": {"rank": 4}, "ingest": {"chunk_tokens": 16}})
        trained.ingest(WORDS)
        files = peft_files(trained)
        folder = tmp_path / "adapter"
        folder.mkdir()
        for name, data in files.items():
            (folder / name).write_bytes(data)
        by_rpc = rpc.import_adapter(folder, "from-rpc")
        adapter = {
            "adapter_config": json.loads(files["adapter_config.json"]),
            "adapter_model": base64.b64encode(files["adapter_model.safetensors"]).decode(),
        }
        body = {"id": "from-http", "adapter": adapter}
        r = web.post("/v1/sessions", json=body)
        assert r.status_code == 201, r.text
        assert by_rpc["bytes"] == r.json()["fast_weight_bytes"] == trained.fast.num_bytes()
        bad = {**body, "id": "bad", "adapter": {**body["adapter"], "adapter_config": {"peft_type": "IA3"}}}
        assert web.post("/v1/sessions", json=bad).status_code == 400

        # Budgets of one byte: every session not in use is on disk (saved first), and comes back on use.
        assert rpc.get_session("from-rpc")["residency"] == "disk" and rpc.get_session("from-rpc")["resident_bytes"] == 0
        question = {"model": "from-rpc", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
        r = web.post("/v1/chat/completions", json=question)
        assert r.status_code == 200, r.text
        assert metric(server, "ttt_session_moves_total", source="disk", target="device") >= 1
        assert metric(server, "ttt_sessions", tier="disk") == 1  # the other one: just used, on the device
        assert metric(server, "ttt_sessions", tier="device") == 1
        for info in (rpc.get_session("from-http"), web.get("/v1/sessions/from-http").json()):
            assert info["residency"] == "disk" and info["disk_bytes"] > 0

    # A damaged newest checkpoint: the previous one loads, and both doors say so (without server paths).
    folder = tmp_path / "users" / "alice" / "from-http"
    with running(tiny_model_dir, tmp_path) as server:
        rpc, web = clients(server, "alice")
        list(rpc.ingest("from-http", [WORDS]))
        rpc.save_session("from-http")
    newest = sorted(folder.glob("ckpt-*"))[-1]
    (newest / "fast_weights.safetensors").write_bytes(b"damaged")
    with running(tiny_model_dir, tmp_path) as server:
        rpc, web = clients(server, "alice")
        rpc.reset_session("from-http")  # any use loads it
        for info in (rpc.get_session("from-http"), web.get("/v1/sessions/from-http").json()):
            assert info["restored_from"] == "ckpt-000001" and len(info["warnings"]) == 1
            assert "fast_weights.safetensors" in info["warnings"][0] and str(tmp_path) not in info["warnings"][0]
        assert metric(server, "ttt_checkpoint_fallbacks_total") == 1
        # Every checkpoint damaged: the error names the file in the session's folder, never the data directory.
        for ckpt in (folder.parent / "from-rpc").glob("ckpt-*"):
            (ckpt / "manifest.json").write_bytes(b"{")
        for call in (rpc.get_session, rpc.reset_session):  # info reads the manifest; reset loads the session
            with pytest.raises(TTTError) as info:
                call("from-rpc")
            assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION, info.value
            assert "manifest.json" in info.value.message and str(tmp_path) not in info.value.message
        r = web.post("/v1/sessions/from-rpc/reset")
        assert r.status_code == 409 and str(tmp_path) not in r.text
