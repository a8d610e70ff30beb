"""``ttt serve --ray`` on a local Ray cluster (loopback, 2 CPU replicas of the tiny model) over one S3-compatible
session store (moto on loopback): sessions spread over replicas and stay put, one session through both doors,
and a replica killed in the middle of an ingest, resumed on another from the last checkpoint."""

from __future__ import annotations

import threading
import time
import uuid

import grpc
import httpx
import pytest
from conftest import free_port
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytestmark = pytest.mark.ray
ray = pytest.importorskip("ray", reason="the [ray] extra is not installed")
from ray import serve  # noqa: E402

from clients.client import TTTClient, TTTError  # noqa: E402
from server.ray_app import APP, deploy, start_grpc_front  # noqa: E402
from server.settings import Settings  # noqa: E402
from ttt.lease import read_lease  # noqa: E402
from ttt.storage import as_folder  # noqa: E402

DEFAULTS = {"ingest": {"chunk_tokens": 32, "context_tokens": 32}}
LEASE_SECONDS = 3.0


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, s3_endpoint, tmp_path_factory):
    import boto3

    bucket = f"ttt-ray-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    settings = Settings(
        model=str(tiny_model_dir),
        device="cpu",
        host="127.0.0.1",
        http_port=free_port(),
        grpc_port=free_port(),
        data_dir=tmp_path_factory.mktemp("ray-data"),
        store=f"s3://{bucket}/sessions",
        session_defaults=DEFAULTS,
        lease_seconds=LEASE_SECONDS,
        autosave_every_chunks=2,
        max_request_bytes=1 << 20,
    )
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        handle = deploy(settings, replicas=2, cpus_per_replica=1.0)
        _, port, stop = start_grpc_front(settings, handle)
        try:
            yield settings, f"http://127.0.0.1:{settings.http_port}", f"127.0.0.1:{port}"
        finally:
            stop()
    finally:
        serve.shutdown()
        ray.shutdown()


def owner(settings: Settings, session_id: str) -> tuple[str, int]:
    lease = read_lease(as_folder(settings.store).child("local").child(session_id))[0]
    return lease.owner, lease.fence


def test_sessions_spread_over_replicas_and_stay_put(cluster):
    settings, http, _ = cluster
    ids = [f"spread-{n}" for n in range(4)]
    for sid in ids:
        r = httpx.post(f"{http}/v1/sessions", json={"id": sid}, timeout=60)
        assert r.status_code == 201, r.text
        r = httpx.post(f"{http}/v1/sessions/{sid}/documents", content=b"In the beginning. " * 20, timeout=120)
        assert r.status_code == 200, r.text
    placed = {sid: owner(settings, sid) for sid in ids}
    assert len({o for o, _ in placed.values()}) == 2  # both replicas hold sessions
    for _ in range(3):
        for sid in ids:
            chat = {"model": sid, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
            r = httpx.post(f"{http}/v1/chat/completions", json=chat, timeout=60)
            assert r.status_code == 200, r.text
    assert {sid: owner(settings, sid) for sid in ids} == placed  # no session moved (same owner, same fence)
    listed = httpx.get(f"{http}/v1/sessions", timeout=60).json()["data"]
    assert set(ids) <= {s["id"] for s in listed}
    # A body without a length that the front reads to find its session: read no further than the limit.
    pad = b"x" * (64 << 10)
    chunked = (b'{"model": "spread-0", "pad": "' + pad if n == 0 else pad for n in range(20))  # 1.25 MiB
    r = httpx.post(f"{http}/v1/chat/completions", content=chunked, timeout=60)
    assert r.status_code == 413 and "request body over" in r.json()["error"]["message"]
    # The replica judges the client's Host, not the front's: an open server refuses a foreign name (DNS rebinding).
    r = httpx.get(f"{http}/v1/sessions/{ids[0]}", headers={"host": "evil.example"}, timeout=60)
    assert r.status_code == 403 and "not this machine" in r.json()["error"]["message"]


def test_one_session_through_both_doors(cluster, tokenizer):
    _, http, grpc_address = cluster
    text = "And God said, Let there be light: and there was light. " * 12
    with TTTClient(grpc_address, timeout=60) as client:
        created = client.create_session(None)  # the front names it, so that it is born where it is routed
        sid = created["session_id"]
        summary = list(client.ingest(sid, [text[:200], text[200:]]))[-1]
        assert summary["type"] == "summary" and summary["tokens_received"] == len(tokenizer(text).input_ids)
        info = client.get_session(sid)
    over_http = httpx.get(f"{http}/v1/sessions/{sid}", timeout=60).json()
    assert over_http["tokens_ingested"] == info["tokens_ingested"] == summary["tokens_ingested"]
    chat = {"model": sid, "messages": [{"role": "user", "content": "What was there?"}], "max_tokens": 4}
    r = httpx.post(f"{http}/v1/chat/completions", json=chat, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    base = httpx.get(f"{http}/v1/models", timeout=60).json()["data"][0]["id"]
    r = httpx.post(f"{http}/v1/chat/completions", json={**chat, "model": base}, timeout=60)
    assert r.status_code == 200  # the base model, from any replica
    with grpc.insecure_channel(grpc_address) as channel:  # the probes of `ttt serve` work on the front too
        probe = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="ttt.v1.Sessions"))
        assert probe.status == health_pb2.HealthCheckResponse.SERVING
    with TTTClient(grpc_address) as client:  # no deadline: the front sets none on its call either
        assert client.get_session(sid)["tokens_ingested"] == info["tokens_ingested"]
        with pytest.raises(TTTError, match="NOT_FOUND"):
            client.get_session("no-such-session")


def test_replica_killed_mid_ingest_resumes_on_another(cluster, tokenizer):
    settings, http, grpc_address = cluster
    sid = "killed"
    text = ("In the beginning God created the heaven and the earth. " * 120).encode()
    folder = as_folder(settings.store).child("local").child(sid)
    checkpointed, killed = threading.Event(), threading.Event()
    half = len(text) // 240 * 120

    def slowly():
        for start in range(0, len(text), 120):
            if start == half:  # the rest waits for a checkpoint, then for the kill: the replica dies mid-stream
                deadline = time.monotonic() + 120
                while not folder.exists("LATEST") and time.monotonic() < deadline:
                    time.sleep(0.05)
                if folder.exists("LATEST"):
                    checkpointed.set()
                killed.wait(120)
            yield text[start : start + 120]
            time.sleep(0.05)

    errors: list[TTTError] = []

    def stream():
        with TTTClient(grpc_address) as client:
            try:
                list(client.ingest(sid, slowly()))
            except TTTError as e:
                errors.append(e)

    reader = threading.Thread(target=stream)
    reader.start()
    assert checkpointed.wait(120), "no autosave came"
    holder, fence = owner(settings, sid)
    ray.kill(ray.get_actor(_replica_actor(holder), namespace="serve"), no_restart=False)
    killed.set()
    reader.join(120)
    assert errors and errors[0].code.name in ("UNAVAILABLE", "CANCELLED", "INTERNAL", "UNKNOWN"), errors

    with TTTClient(grpc_address, timeout=120) as client:
        info = client.get_session(sid)  # waits for the dead replica's lease to expire, then loads it elsewhere
        resumed = list(client.ingest(sid, [text[info["document_bytes"] :]]))[-1]
    new_holder, new_fence = owner(settings, sid)
    assert new_holder != holder and new_fence > fence
    expected = len(tokenizer(text.decode()).input_ids)
    # Nothing lost, nothing twice: the checkpoint's tokens plus the rest, as if read once.
    assert resumed["tokens_ingested"] + resumed["pending_tokens"] == expected
    assert httpx.get(f"{http}/v1/sessions/{sid}", timeout=60).json()["tokens_ingested"] == resumed["tokens_ingested"]


def _replica_actor(replica_id: str) -> str:
    return next(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == "serve" and a["name"].endswith(f"#Replica#{replica_id}") and APP in a["name"]
    )
