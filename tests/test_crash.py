"""Crash safety with real kills: ``ttt serve`` runs as a subprocess and is SIGKILLed mid-ingest and mid-save.

After each kill a new server starts on the same data folder; the session must load (no corruption,
stray ``.tmp-ckpt-*`` folders are harmless) and hold exactly the stats of a complete checkpoint
(the one ``LATEST`` names). A stream cut by the kill resumes from ``document_bytes`` and ends with
every token of the document trained. The tiny random Llama runs on the CPU with 32-token chunks.

Also a short run of ``bench/load.py`` against an in-process server (0 errors, every token accounted).
"""

from __future__ import annotations

import json
import random
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from bench.server_process import ServerProcess
from clients.client import TTTClient, TTTError
from server.metrics import PREFIX_FOUND

ROOT = Path(__file__).resolve().parent.parent
BOOK = Path(__file__).parent / "data" / "kjv_genesis_exodus.txt"  # plain ASCII
CHUNK = 32
AUTOSAVE = 4
USER = "local"  # server.auth.OPEN_USER
READY_TIMEOUT = 60.0
CALL_TIMEOUT = 60.0


def server_process(model_dir: Path, data_dir: Path) -> ServerProcess:
    """``ttt serve`` on the tiny model with small chunks and frequent autosaves."""
    env = {
        "TTT_SESSION_DEFAULTS": json.dumps({"ingest": {"chunk_tokens": CHUNK, "context_tokens": CHUNK}}),
        "TTT_AUTOSAVE_EVERY_CHUNKS": str(AUTOSAVE),
        "OMP_NUM_THREADS": "1",
    }
    return ServerProcess(
        ["--model", str(model_dir), "--device", "cpu", "--data-dir", str(data_dir)],
        env,
        data_dir.parent / f"server-{time.monotonic_ns()}.log",
    )


@contextmanager
def serving(model_dir: Path, data_dir: Path):
    server = server_process(model_dir, data_dir)
    try:
        server.wait_ready(READY_TIMEOUT)
        with TTTClient(server.grpc, timeout=CALL_TIMEOUT) as client:
            yield server, client
    finally:
        server.kill()


def latest_manifest(folder: Path) -> dict:
    """The manifest ``LATEST`` names (checked against its sha256 by ``read_manifest``)."""
    from ttt.store import LATEST, Pointer, read_manifest

    pointer = Pointer.parse((folder / LATEST).read_bytes())
    return read_manifest(folder / pointer.checkpoint, pointer.manifest_sha256)


def load_in_server(server: ServerProcess, sid: str) -> None:
    """Make the server load the session from disk (a one-token chat answer needs its weights)."""
    r = httpx.post(
        f"{server.http}/v1/chat/completions",
        timeout=CALL_TIMEOUT,
        json={
            "model": sid,
            "messages": [{"role": "user", "content": "In the beginning"}],
            "max_tokens": 1,
            "temperature": 0,
        },
    )
    assert r.status_code == 200, r.text


def assert_matches_checkpoint(info: dict, manifest: dict) -> None:
    stats = manifest["stats"]
    for name in ("tokens_ingested", "chunks", "rolled_back_chunks", "created_at", "updated_at"):
        assert info[name] == stats[name], (name, info[name], stats[name])
    assert info["document_bytes"] == manifest["tokenizer_state"]["bytes_received"]


def pieces(data: bytes, size: int):
    for i in range(0, len(data), size):
        yield data[i : i + size]


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.mark.slow  # server starts in a subprocess: ~25 s
def test_kill_during_ingest_then_resume(tiny_model_dir, tokenizer, tmp_path):
    data_dir = tmp_path / "data"
    sid = "book"
    folder = data_dir / "users" / USER / sid
    text = BOOK.read_text()[:6_000]  # ~1.4k tokens: ~45 chunks, far more than trained before the kill
    data = text.encode()
    kill_after = 10  # chunk messages: past the autosaves after chunks 4 and 8

    with serving(tiny_model_dir, data_dir) as (server, client):
        events = client.ingest(sid, pieces(data, 512), create_if_missing=True, end_of_document=True)
        for seen, event in enumerate(events, 1):
            assert event["type"] == "chunk"
            if seen == kill_after:
                server.kill()
                break
        with pytest.raises(TTTError):  # the stream dies with the server
            for _ in events:
                pass

    manifest = latest_manifest(folder)
    stats = manifest["stats"]
    # Autosave runs right after every 4th chunk (before the next one: units of a session run in order).
    assert stats["chunks"] in (4, 8, 12), stats
    assert stats["tokens_ingested"] == stats["chunks"] * CHUNK

    with serving(tiny_model_dir, data_dir) as (server, client):
        info = client.get_session(sid)  # from disk: the checkpoint's stats, not loaded yet
        assert info["residency"] == "disk"
        assert_matches_checkpoint(info, manifest)
        load_in_server(server, sid)
        info = client.get_session(sid)
        assert info["residency"] == "device"
        assert_matches_checkpoint(info, manifest)
        offset = info["document_bytes"]
        assert 0 < offset < len(data)
        held = info["tokens_ingested"] + info["pending_tokens"]

        summary = None
        for event in client.ingest(sid, pieces(data[offset:], 4096), create_if_missing=False, end_of_document=True):
            if event["type"] == "summary":
                summary = event
        total = n_tokens(tokenizer, text)
        assert summary is not None
        assert summary["tokens_ingested"] == total and summary["pending_tokens"] == 0
        assert summary["tokens_received"] == total - held
        assert client.get_session(sid)["tokens_ingested"] == total
        assert client.get_session(sid)["document_bytes"] == 0  # the document ended


@pytest.mark.slow  # three server starts: ~35 s
def test_kill_during_saves(tiny_model_dir, tmp_path):
    data_dir = tmp_path / "data"
    sid = "saves"
    folder = data_dir / "users" / USER / sid
    rng = random.Random(1234)
    book = BOOK.read_bytes()
    offset = 0
    checkpoints: list[dict] = []  # stats of every manifest seen on disk (any complete checkpoint)

    for round_ in range(3):
        with serving(tiny_model_dir, data_dir) as (server, client):
            if round_ > 0:
                # The previous round's kill left a complete checkpoint: LATEST's, loaded without fallback.
                manifest = latest_manifest(folder)
                info = client.get_session(sid)
                assert_matches_checkpoint(info, manifest)
                load_in_server(server, sid)
                assert_matches_checkpoint(client.get_session(sid), manifest)
                assert "loaded ckpt-" not in server.output()  # no fallback to an older checkpoint
            else:
                client.create_session(sid)

            # Change the session between saves (a cut document: pending tokens and text tail saved too),
            # while another thread saves as fast as it can; kill at a seeded moment.
            stop = threading.Event()
            saves, chunks = [0], [0]

            def save_loop():
                with TTTClient(server.grpc, timeout=CALL_TIMEOUT) as c:
                    while not stop.is_set():
                        try:
                            c.save_session(sid)
                            saves[0] += 1
                        except TTTError:
                            return  # the server is gone

            def ingest_loop(start: int):
                with TTTClient(server.grpc) as c:
                    try:
                        for event in c.ingest(sid, pieces(book[start : start + 20_000], 300), end_of_document=False):
                            chunks[0] += event["type"] == "chunk"
                            if stop.is_set():
                                return
                    except TTTError:
                        return

            threads = [threading.Thread(target=save_loop), threading.Thread(target=ingest_loop, args=(offset,))]
            offset += 20_000
            for t in threads:
                t.start()
            deadline = time.monotonic() + 30
            while (saves[0] < 3 or chunks[0] < 2) and time.monotonic() < deadline:  # a few saves and chunks first
                time.sleep(0.01)
            assert saves[0] >= 3, server.output()
            time.sleep(rng.uniform(0.0, 0.3))
            server.kill()
            stop.set()
            for t in threads:
                t.join(30)

        # Whatever the kill interrupted, LATEST names a complete checkpoint whose files check out.
        manifest = latest_manifest(folder)
        checkpoints.append(manifest["stats"])
        assert manifest["stats"]["chunks"] > 0

    # The last kill, checked in-process (a fourth server start would only repeat the restarts above):
    # LATEST's checkpoint loads with no fallback and holds its manifest's stats.
    import ttt
    from ttt.store import load_session

    manifest = latest_manifest(folder)
    engine = ttt.load_engine(str(tiny_model_dir), "cpu")
    session = load_session(engine, folder, fallback=False)
    assert vars(session.stats) == manifest["stats"]
    assert session.text_stream.bytes_received == manifest["tokenizer_state"]["bytes_received"]
    # Later saves still work next to whatever temp folders the kills left behind.
    session.save(folder)
    assert latest_manifest(folder)["stats"] == manifest["stats"]
    # Progress across rounds: each round's checkpoint has at least the previous round's chunks.
    assert [s["chunks"] for s in checkpoints] == sorted(s["chunks"] for s in checkpoints)


def test_load_bench_short(tiny_model_dir, tmp_path, one_thread):
    """bench/load.py for a few seconds against an in-process tiny-model server: 0 errors, tokens accounted."""
    from bench.load import main as load_main
    from server.main import Server
    from server.settings import Settings

    server = Server(
        Settings(
            model=str(tiny_model_dir),
            device="cpu",
            grpc_port=0,
            http_port=0,
            data_dir=tmp_path / "data",
            session_defaults={"ingest": {"chunk_tokens": CHUNK, "context_tokens": CHUNK}},
        )
    )
    server.start()
    doors = ["--server-grpc", f"127.0.0.1:{server.grpc_port}", "--server-http", f"http://127.0.0.1:{server.http_port}"]
    loaded = [*doors, "--ingest-streams", "2", "--chat-clients", "3", "--max-tokens", "4"]
    try:
        result = load_main([*loaded, "--seconds", "4", "--idle-chats", "2"])
        open_loop = load_main([*loaded, "--chat-rate", "3", "--seconds", "3", "--idle-chats", "1"])
        chats_only = load_main([*loaded, "--no-ingest", "--seconds", "2", "--idle-chats", "1"])
        together = load_main([*doors, "--answers", "3", "--max-tokens", "6"])
    finally:
        server.stop()
    assert result["errors"] == 0 and result["chat_timeouts"] == 0, result
    assert result["tokens_received"] == result["tokens_held"] > 0
    assert result["chat_count"] > 0 and result["ttft_p50_ms"] > 0 and result["idle_ttft_p50_ms"] > 0
    assert result["ttft_p50_vs_idle"] > 0
    assert result["later_ttft_p50_ms"] > 0 and result["later_ttft_p50_vs_idle"] > 0  # each client's after its first
    # the server's part of each chat's wait (queued to first token) lies within what its client waited
    assert 0 < result["server_ttft_mean_ms"] <= result["ttft_mean_ms"], result
    assert 0 <= result["server_queue_mean_ms"] <= result["server_ttft_mean_ms"], result  # of which to joining the batch
    # each answer found its window's keys/values one way, or read its notes alone (the sessions read before the
    # run: none is empty)
    assert sum(result[f"answer_prefixes_{f}"] for f in PREFIX_FOUND) == result["chat_count"], result
    assert open_loop["errors"] == 0 and open_loop["tokens_received"] == open_loop["tokens_held"], open_loop
    assert open_loop["chat_rate"] == 3 and open_loop["chat_count"] > 0 and open_loop["ttft_p50_ms"] > 0
    # without ingest: the sessions hold what they read before the run, and the chats alone run
    assert chats_only["errors"] == 0 and chats_only["tokens_accounted"], chats_only
    assert chats_only["ingest_streams"] == chats_only["ingest_requests"] == chats_only["tokens_received"] == 0
    assert chats_only["tokens_held"] == 0 and chats_only["chat_count"] > 0, chats_only
    assert together["answers"] == 3 and together["together_tokens"] > 0 and together["together_vs_alone"] > 0


def test_open_loop_arrivals_are_seeded_poisson_and_stop_at_the_deadline():
    from bench.load import Arrivals, parse_args

    def due_times(seed):
        arrivals = Arrivals(rate=4.0, start=100.0, deadline=600.0, seed=seed)
        return list(iter(arrivals.take, None))

    times = due_times(1)
    assert times == due_times(1) and times != due_times(2)
    assert times == sorted(times) and times[0] > 100 and times[-1] < 600
    assert abs(len(times) - 4 * 500) < 4 * 4 * 500**0.5  # Poisson: count 2000 +- 4 standard deviations
    for bad in ("0", "-1", "nan", "inf"):
        with pytest.raises(SystemExit):
            parse_args(["--chat-rate", bad])
