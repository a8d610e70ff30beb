"""The Python client (clients/client.py) and the `ttt` CLI (clients/cli.py, clients/chat.py) against a real server.

One open (loopback, no keys) server on a tiny random Llama serves the module; the API-key test starts a
second one whose keys file is written by `ttt keys new`. The tiny model's answers are gibberish, but
greedy (temperature 0) answers are deterministic, so `ttt chat` output is compared with the HTTP API's.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import stat
import sys

import grpc
import httpx
import pytest

from clients import chat as chat_mod
from clients import cli
from clients.client import TTTClient, TTTError
from server.auth import hash_key
from server.main import Server
from server.settings import Settings

pytestmark = pytest.mark.usefixtures("one_thread")

DEFAULTS = {"ingest": {"chunk_tokens": 32, "context_tokens": 32}}

# Non-ASCII on purpose: 2-, 3- and 4-byte UTF-8 characters, so odd-sized byte pieces end inside characters.
TEXT = (
    "Über den Fjord fuhr die Fähre; naïve Gäste aßen crème brûlée im Café. "
    "東京から大阪まで新幹線で行きました。 Ελληνικά γράμματα: αβγδ. "
    "Emoji 🚀🌍 and maths ∑∫√ ≠ ≈, «guillemets» — and a plain ASCII tail for good measure.\n"
) * 3


def make_server(model_dir, data_dir, **extra) -> Server:
    settings = Settings(
        model=str(model_dir),
        device="cpu",
        grpc_port=0,
        http_port=0,
        data_dir=data_dir,
        session_defaults=DEFAULTS,
        **extra,
    )
    server = Server(settings)
    server.start()
    return server


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    srv = make_server(tiny_model_dir, tmp_path_factory.mktemp("cli-data"))
    yield srv
    srv.stop(grace=2)


@pytest.fixture(scope="module")
def address(server) -> str:
    return f"127.0.0.1:{server.grpc_port}"


@pytest.fixture(scope="module")
def http_url(server) -> str:
    return f"http://127.0.0.1:{server.http_port}"


@pytest.fixture
def client(address):
    with TTTClient(address) as c:
        yield c


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def odd_pieces(data: bytes, sizes=(1, 2, 3, 5, 7, 11, 13)) -> list[bytes]:
    pieces, i, k = [], 0, 0
    while i < len(data):
        pieces.append(data[i : i + sizes[k % len(sizes)]])
        i += len(pieces[-1])
        k += 1
    return pieces


def splits_inside_characters(pieces: list[bytes]) -> int:
    n = 0
    for p in pieces:
        try:
            p.decode("utf-8")
        except UnicodeDecodeError:
            n += 1
    return n


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse errors
        rc = e.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err


# ---- Python client --------------------------------------------------------------------------------


def test_client_round_trip(client, tokenizer):
    expected = n_tokens(tokenizer, TEXT)
    created = client.create_session("round-trip", {"fast": {"rank": 4}, "ingest": {"lr": 1e-3}})
    assert created["session_id"] == "round-trip" and created["tokens_ingested"] == 0 and created["chunks"] == 0

    pieces = odd_pieces(TEXT.encode())
    assert splits_inside_characters(pieces) > 10
    events = list(client.ingest("round-trip", pieces))
    chunks, summary = events[:-1], events[-1]
    assert all(e["type"] == "chunk" for e in chunks) and summary["type"] == "summary"
    assert summary["session_id"] == "round-trip"
    assert summary["tokens_received"] == summary["tokens_ingested"] == expected
    assert summary["chunks_trained"] == len(chunks) == -(-expected // 32)
    assert summary["pending_tokens"] == 0
    assert [e["index"] for e in chunks] == list(range(len(chunks)))
    assert sum(e["tokens"] for e in chunks) == expected
    assert chunks[-1]["tokens_ingested"] == expected
    assert all(e["loss_before"] > 0 and not e["rolled_back"] and not e["error"] for e in chunks)

    info = client.get_session("round-trip")
    assert info["tokens_ingested"] == expected and info["pending_tokens"] == 0 and info["chunks"] == len(chunks)
    assert info["last_loss_before"] == pytest.approx(chunks[-1]["loss_before"])
    assert info["bytes"] > 0 and info["created_at"] <= info["updated_at"]

    assert "round-trip" in [s["session_id"] for s in client.list_sessions()]
    saved = client.save_session("round-trip")
    assert saved["tokens_ingested"] == expected

    reset = client.reset_session("round-trip")
    assert reset["tokens_ingested"] == 0 and reset["chunks"] == 0 and reset["pending_tokens"] == 0

    # A server-chosen id; str pieces work too.
    other = client.create_session()
    assert other["session_id"]
    summary = list(client.ingest(other["session_id"], ["Hello, ", "wörld!"]))[-1]
    assert summary["tokens_ingested"] == n_tokens(tokenizer, "Hello, wörld!")

    for sid in ("round-trip", other["session_id"]):
        client.delete_session(sid)
        with pytest.raises(TTTError) as e:
            client.get_session(sid)
        assert e.value.code == grpc.StatusCode.NOT_FOUND
    assert "round-trip" not in [s["session_id"] for s in client.list_sessions()]


def test_client_ingest_continues_pending_across_streams(client, tokenizer):
    data = TEXT.encode()
    cut = next(i for i in range(len(data) // 2, len(data)) if data[i] & 0xC0 == 0x80)  # inside a character
    first = list(
        client.ingest(
            "two-streams", odd_pieces(data[:cut]), end_of_document=False, settings={"ingest": {"chunk_tokens": 16}}
        )
    )[-1]
    assert first["pending_tokens"] > 0  # the partial chunk (and the half character) wait for the rest
    second = list(client.ingest("two-streams", odd_pieces(data[cut:]), create_if_missing=False))[-1]
    assert second["tokens_ingested"] == n_tokens(tokenizer, TEXT) and second["pending_tokens"] == 0
    assert client.get_session("two-streams")["chunks"] == -(-n_tokens(tokenizer, TEXT) // 16)
    client.delete_session("two-streams")


def test_client_stopping_early_cancels_the_stream(client, tokenizer):
    # ASCII: a stream cut mid-character would leave half a character that only its own continuation fits.
    data = ("The quick brown fox jumps over the lazy dog. " * 80).encode()
    events = client.ingest("cancelled", odd_pieces(data, (64,)))
    first = next(events)
    assert first["type"] == "chunk"
    events.close()  # cancels the call: what was trained stays, the rest of the document was never read
    info = client.get_session("cancelled")
    assert 1 <= info["chunks"] < n_tokens(tokenizer, data.decode()) // 32 // 2
    summary = list(client.ingest("cancelled", ["and the end."]))[-1]  # the session takes a new stream
    assert summary["tokens_ingested"] > info["tokens_ingested"] and summary["pending_tokens"] == 0
    client.delete_session("cancelled")


def test_client_errors(client):
    def code_of(call, *args, **kwargs) -> TTTError:
        with pytest.raises(TTTError) as e:
            result = call(*args, **kwargs)
            if hasattr(result, "__next__"):  # ingest: errors arrive while iterating
                list(result)
        return e.value

    err = code_of(client.get_session, "no-such-session")
    assert err.code == grpc.StatusCode.NOT_FOUND and err.code_name == "NOT_FOUND"
    assert str(err).startswith("NOT_FOUND: ") and "no-such-session" in str(err)
    assert isinstance(err, grpc.RpcError)

    for bad in ("../etc", "a/b", "", "-dash-first"):
        assert code_of(client.get_session, bad).code == grpc.StatusCode.INVALID_ARGUMENT, bad
    assert code_of(client.create_session, "../up").code == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(client.delete_session, "gone").code == grpc.StatusCode.NOT_FOUND
    assert code_of(client.save_session, "gone").code == grpc.StatusCode.NOT_FOUND
    assert code_of(client.reset_session, "gone").code == grpc.StatusCode.NOT_FOUND

    client.create_session("dup")
    assert code_of(client.create_session, "dup").code == grpc.StatusCode.ALREADY_EXISTS
    bad_settings = code_of(client.create_session, "bad-settings", {"ingest": {"chunk_tokens": 1}})
    assert bad_settings.code == grpc.StatusCode.INVALID_ARGUMENT
    client.delete_session("dup")

    # Streams: a missing session without create_if_missing, a bad id, bytes that are not UTF-8.
    assert code_of(client.ingest, "missing", [b"abc"], create_if_missing=False).code == grpc.StatusCode.NOT_FOUND
    assert code_of(client.ingest, "../x", [b"abc"]).code == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(client.ingest, "latin1", [b"caf\xe9 ", b"au lait"]).code == grpc.StatusCode.INVALID_ARGUMENT
    client.delete_session("latin1")

    # Client-side mistakes are plain Python errors, before anything is sent.
    with pytest.raises(ValueError, match="invalid session settings"):
        client.create_session("x", {"ingest": {"no_such_field": 1}})
    with pytest.raises(TypeError):
        list(client.ingest("x", [3.5]))

    # An exception raised by the caller's piece iterator comes back as itself.
    def pieces():
        yield "some text "
        raise OSError("disk on fire")

    client.create_session("iter-error")  # the stream may be cancelled before the server gets to create it
    with pytest.raises(OSError, match="disk on fire"):
        list(client.ingest("iter-error", pieces()))
    client.delete_session("iter-error")


# ---- CLI -----------------------------------------------------------------------------------------


def test_cli_ingest_and_sessions(capsys, tmp_path, address, tokenizer, monkeypatch):
    doc = tmp_path / "doc.txt"
    doc.write_text(TEXT, encoding="utf-8")
    expected = n_tokens(tokenizer, TEXT)

    rc, out, err = run_cli(capsys, "ingest", doc, "--session", "cli-doc", "--server", address, "--piece-bytes", 7)
    assert rc == 0, err
    assert re.search(rf"doc\.txt: {expected} tokens, {-(-expected // 32)} chunks, mean loss [0-9.]+", out), out
    assert f"session cli-doc: {expected} tokens ingested, 0 pending" in out
    assert "tok" in err  # the progress bar

    monkeypatch.setenv("TTT_SERVER", address)  # the default --server from here on
    rc, out, err = run_cli(capsys, "sessions", "list")
    assert rc == 0, err
    header, *rows = out.splitlines()
    assert header.split()[:3] == ["ID", "TOKENS", "CHUNKS"] and "RESIDENCY" in header
    row = next(r.split() for r in rows if r.split()[0] == "cli-doc")
    assert row[1] == str(expected) and row[2] == str(-(-expected // 32)) and row[-1] == "device"

    rc, out, err = run_cli(capsys, "sessions", "show", "cli-doc")
    assert rc == 0, err
    fields = dict(line.split(":", 1) for line in out.splitlines())
    assert fields["session_id"].strip() == "cli-doc" and fields["tokens_ingested"].strip() == str(expected)
    assert fields["pending_tokens"].strip() == "0" and fields["residency"].strip() == "device"

    # Two more files into the same session with --keep-pending: the tail stays pending.
    more = tmp_path / "more.txt"
    more.write_text("Noch ein Absatz über Käse. " * 5, encoding="utf-8")
    rc, out, err = run_cli(capsys, "ingest", more, more, "-s", "cli-doc", "--keep-pending", "--quiet")
    assert rc == 0 and err == "", err
    lines = out.splitlines()
    assert len(lines) == 2 and all(line.startswith("more.txt: ") for line in lines)
    info = TTTClient(address).get_session("cli-doc")
    assert info["tokens_ingested"] + info["pending_tokens"] > expected and info["pending_tokens"] > 0

    rc, out, _ = run_cli(capsys, "sessions", "save", "cli-doc")
    assert rc == 0 and out.startswith("saved cli-doc:")
    rc, out, _ = run_cli(capsys, "sessions", "reset", "cli-doc")
    assert rc == 0 and out.startswith("reset cli-doc: 0 tokens")
    rc, out, _ = run_cli(capsys, "sessions", "rm", "cli-doc")
    assert rc == 0 and out.strip() == "deleted cli-doc"
    rc, out, err = run_cli(capsys, "sessions", "show", "cli-doc")
    assert rc == 1 and out == "" and err.strip() == "error: NOT_FOUND: no session 'cli-doc'"


def test_cli_sessions_import(capsys, tmp_path, server, address):
    from ttt.store import export_peft

    trained = server.state.engine.create_session({"fast": {"rank": 4}, "ingest": {"chunk_tokens": 16}})
    trained.ingest(TEXT)
    folder = export_peft(trained, tmp_path / "adapter")
    rc, out, err = run_cli(capsys, "sessions", "import", folder, "--session", "cli-imported", "--server", address)
    assert rc == 0, err
    assert out.startswith(f"imported {folder} as session cli-imported")
    info = TTTClient(address).get_session("cli-imported")
    assert info["bytes"] == trained.fast.num_bytes() and info["disk_bytes"] > 0  # saved at once
    rc, _, err = run_cli(capsys, "sessions", "import", folder, "--session", "cli-imported", "--server", address)
    assert rc == 1 and err.strip() == "error: ALREADY_EXISTS: session 'cli-imported' already exists"
    rc, _, err = run_cli(capsys, "sessions", "import", tmp_path / "nothing", "--server", address)
    assert rc == 1 and "not a peft adapter folder" in err


def test_cli_chunk_tokens_and_stdin(capsys, tmp_path, address, tokenizer, monkeypatch):
    doc = tmp_path / "doc.txt"
    doc.write_text(TEXT, encoding="utf-8")
    expected = n_tokens(tokenizer, TEXT)
    rc, out, err = run_cli(
        capsys, "ingest", doc, "-s", "chunky", "--server", address, "--chunk-tokens", 16, "--memory", "fast", "-q"
    )
    assert rc == 0, err
    assert f"{expected} tokens, {-(-expected // 16)} chunks" in out
    rc, out, err = run_cli(capsys, "sessions", "show", "chunky", "--server", address)
    assert rc == 0 and "memory:" in out and "fast:" in out and "surprising spans kept" in out
    TTTClient(address).delete_session("chunky")
    rc, _, err = run_cli(capsys, "ingest", doc, "-s", "chunky", "--server", address, "--memory", "huge", "-q")
    assert rc == 1 and "unknown memory preset 'huge'" in err

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(TEXT.encode())))  # FILE '-'
    rc, out, err = run_cli(capsys, "ingest", "-", "-s", "stdin", "--server", address, "--piece-bytes", 5, "-q")
    assert rc == 0 and out.startswith(f"<stdin>: {expected} tokens, "), err
    TTTClient(address).delete_session("stdin")


def test_cli_errors(capsys, tmp_path, address):
    rc, _, err = run_cli(capsys, "sessions", "show", "../etc", "--server", address)
    assert rc == 1 and err.startswith("error: INVALID_ARGUMENT: session id must be")

    rc, _, err = run_cli(capsys, "ingest", tmp_path / "missing.txt", "-s", "nofile", "--server", address)
    assert rc == 1 and err.strip() == f"error: {tmp_path / 'missing.txt'}: No such file or directory"

    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"caf\xe9 au lait\n")
    rc, _, err = run_cli(capsys, "ingest", latin1, "-s", "latin1-cli", "--server", address, "-q")
    assert rc == 1 and err.startswith("error: INVALID_ARGUMENT: ")
    TTTClient(address).delete_session("latin1-cli")

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    rc, _, err = run_cli(capsys, "sessions", "list", "--server", f"127.0.0.1:{closed}")
    assert rc == 1 and err.startswith("error: UNAVAILABLE: ")

    rc, _, err = run_cli(capsys, "sessions", "show")  # argparse: missing ID
    assert rc == 2 and "ID" in err


def test_cli_keys_new(capsys, tmp_path, monkeypatch):
    keys = tmp_path / "keys.json"
    rc, out, err = run_cli(capsys, "keys", "new", "alice", "--file", keys)
    assert rc == 0, err
    key = out.strip()
    assert key.startswith("ttt-") and len(out.splitlines()) == 1 and key not in err
    assert json.loads(keys.read_text()) == {"alice": [hash_key(key)]}
    assert stat.S_IMODE(os.stat(keys).st_mode) == 0o600

    monkeypatch.setenv("TTT_API_KEYS_FILE", str(keys))
    rc, out2, _ = run_cli(capsys, "keys", "new", "alice")
    rc, out3, _ = run_cli(capsys, "keys", "new", "bob")
    assert json.loads(keys.read_text()) == {
        "alice": [hash_key(key), hash_key(out2.strip())],
        "bob": [hash_key(out3.strip())],
    }
    assert len({key, out2.strip(), out3.strip()}) == 3

    rc, out, err = run_cli(capsys, "keys", "new", "../root", "--file", keys)
    assert rc == 1 and out == "" and err.startswith("error: user name must be")
    (tmp_path / "list.json").write_text("[]")
    rc, _, err = run_cli(capsys, "keys", "new", "carol", "--file", tmp_path / "list.json")
    assert rc == 1 and "expected a JSON object" in err


def test_cli_with_api_keys(capsys, tmp_path, tiny_model_dir, monkeypatch):
    keys = tmp_path / "keys.json"
    _, alice, _ = run_cli(capsys, "keys", "new", "alice", "--file", keys)
    _, bob, _ = run_cli(capsys, "keys", "new", "bob", "--file", keys)
    alice, bob = alice.strip(), bob.strip()
    srv = make_server(tiny_model_dir, tmp_path / "data", api_keys_file=keys)
    try:
        addr = ["--server", f"127.0.0.1:{srv.grpc_port}"]
        doc = tmp_path / "secret.txt"
        doc.write_text("Alice's diary: the café opens at nine. " * 4, encoding="utf-8")

        rc, out, err = run_cli(capsys, "ingest", doc, "-s", "diary", "-q", "--api-key", alice, *addr)
        assert rc == 0 and "session diary:" in out, err

        rc, out, err = run_cli(capsys, "sessions", "list", *addr)  # no key
        assert rc == 1 and out == "" and err.startswith("error: UNAUTHENTICATED: missing bearer key")
        rc, _, err = run_cli(capsys, "ingest", doc, "-s", "diary", "-q", *addr)
        assert rc == 1 and err.startswith("error: UNAUTHENTICATED: ")
        rc, _, err = run_cli(capsys, "sessions", "list", "--api-key", "ttt-not-a-key", *addr)
        assert rc == 1 and err.strip() == "error: UNAUTHENTICATED: unknown API key"

        monkeypatch.setenv("TTT_API_KEY", alice)  # the default --api-key
        rc, out, _ = run_cli(capsys, "sessions", "list", *addr)
        assert rc == 0 and [r.split()[0] for r in out.splitlines()[1:]] == ["diary"]

        rc, out, _ = run_cli(capsys, "sessions", "list", "--api-key", bob, *addr)
        assert rc == 0 and out.splitlines()[1:] == []
        for action in ("show", "rm", "save", "reset"):
            rc, out, err = run_cli(capsys, "sessions", action, "diary", "--api-key", bob, *addr)
            assert rc == 1 and err.strip() == "error: NOT_FOUND: no session 'diary'", action
        with TTTClient(addr[1], api_key=bob) as c:  # nor can bob write into it: his "diary" is his own
            list(c.ingest("diary", ["Bob was here."]))
            assert [s["session_id"] for s in c.list_sessions()] == ["diary"]
            bob_tokens = c.get_session("diary")["tokens_ingested"]

        # ttt chat over HTTP: the same keys (no key / an unknown key: 401; bob has no "diary" of alice's).
        http = ["--http", f"http://127.0.0.1:{srv.http_port}", "-m", "hi", *GREEDY]
        monkeypatch.delenv("TTT_API_KEY")
        rc, out, err = run_cli(capsys, "chat", "-s", "diary", *http)
        assert rc == 1 and out == "" and err.startswith("error: 401: missing bearer key")
        rc, _, err = run_cli(capsys, "chat", *http)  # the base model's lookup is behind the key too
        assert rc == 1 and err.startswith("error: 401: missing bearer key")
        rc, _, err = run_cli(capsys, "chat", "-s", "diary", "--api-key", "ttt-not-a-key", *http)
        assert rc == 1 and err.strip() == "error: 401: unknown API key"
        monkeypatch.setenv("TTT_API_KEY", alice)
        rc, out, err = run_cli(capsys, "chat", "-s", "diary", *http)
        assert (
            rc == 0 and out == api_answer(f"http://127.0.0.1:{srv.http_port}", "diary", [user("hi")], alice) + "\n"
        ), err

        rc, out, _ = run_cli(capsys, "sessions", "show", "diary", *addr)  # alice's is untouched
        fields = {k: v.strip() for k, v in (line.split(":", 1) for line in out.splitlines())}
        assert rc == 0 and int(fields["tokens_ingested"]) > bob_tokens
        rc, _, _ = run_cli(capsys, "sessions", "rm", "diary", *addr)
        assert rc == 0
    finally:
        srv.stop(grace=2)


# ---- ttt chat ------------------------------------------------------------------------------------

GREEDY = ("--max-tokens", 5, "--temperature", 0)


def api_answer(url: str, model: str, messages: list[dict], api_key: str | None = None) -> str:
    """The non-streaming API's greedy 5-token answer: what `ttt chat ... GREEDY` must print."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.post(
        f"{url}/v1/chat/completions",
        headers=headers,
        timeout=60,
        json={"model": model, "messages": messages, "max_tokens": 5, "temperature": 0, "stream": False},
    )
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


class FakeTTY(io.StringIO):
    """Standard input that says it is a terminal: `ttt chat` runs its REPL (input() reads it line by line)."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def sent(monkeypatch) -> list[list[dict]]:
    """The messages of every chat request `ttt chat` sends, in order."""
    requests: list[list[dict]] = []
    stream = chat_mod.ChatClient.stream

    def spy(self, model, messages, **params):
        requests.append([dict(m) for m in messages])
        return stream(self, model, messages, **params)

    monkeypatch.setattr(chat_mod.ChatClient, "stream", spy)
    return requests


@pytest.fixture(scope="module")
def chat_session(address) -> str:
    with TTTClient(address) as c:
        list(c.ingest("chatty", [TEXT]))  # a session that has read something
    yield "chatty"
    with TTTClient(address) as c:
        c.delete_session("chatty")


def test_cli_chat_message(capsys, http_url, chat_session, monkeypatch):
    expected = api_answer(http_url, chat_session, [user("hi")])
    assert expected
    rc, out, err = run_cli(capsys, "chat", "--session", chat_session, "--message", "hi", *GREEDY, "--http", http_url)
    assert rc == 0, err
    assert out == expected + "\n"

    # --system comes first; $TTT_HTTP is the default --http (a bare host:port is fine).
    monkeypatch.setenv("TTT_HTTP", http_url.removeprefix("http://"))
    system = {"role": "system", "content": "Answer in French."}
    expected = api_answer(http_url, chat_session, [system, user("hi")])
    rc, out, err = run_cli(capsys, "chat", "-s", chat_session, "-m", "hi", "--system", system["content"], *GREEDY)
    assert rc == 0 and out == expected + "\n", err

    # Without --session: the base model, found in GET /v1/models as the entry without a parent.
    base = next(m["id"] for m in httpx.get(f"{http_url}/v1/models").json()["data"] if m["parent"] is None)
    expected = api_answer(http_url, base, [user("hi")])
    rc, out, err = run_cli(capsys, "chat", "-m", "hi", *GREEDY)
    assert rc == 0 and out == expected + "\n", err


def test_cli_chat_piped_lines_carry_the_history(capsys, http_url, chat_session, monkeypatch, sent):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n\nand then?\n/reset\nand then?\n"))  # not a TTY
    rc, out, err = run_cli(capsys, "chat", "-s", chat_session, *GREEDY, "--http", http_url)
    assert rc == 0 and err == "", err

    first = api_answer(http_url, chat_session, [user("hi")])
    second = api_answer(http_url, chat_session, [user("hi"), assistant(first), user("and then?")])
    third = api_answer(http_url, chat_session, [user("and then?")])  # after /reset
    assert sent == [
        [user("hi")],
        [user("hi"), assistant(first), user("and then?")],
        [user("and then?")],
    ]
    assert out == f"{first}\n{second}\n{third}\n"


def test_cli_chat_repl(capsys, http_url, chat_session, monkeypatch, sent):
    # Ctrl-C during the first answer, right after its first piece of text: the answer stops, the
    # stream is closed, and the REPL carries on (keeping the part it printed in the history).
    real_events = chat_mod.iter_sse_data
    calls = [0]

    def interrupt_first_answer(response):
        calls[0] += 1
        for data in real_events(response):
            yield data
            if calls[0] == 1 and '"content": ""' not in data:  # the role-only first event has empty content
                raise KeyboardInterrupt

    monkeypatch.setattr(chat_mod, "iter_sse_data", interrupt_first_answer)
    monkeypatch.setattr(sys, "stdin", FakeTTY("/help\nhi\nmore\n/bogus\n/reset\nhi\n/exit\nnever sent\n"))
    rc, out, err = run_cli(capsys, "chat", "-s", chat_session, *GREEDY, "--http", http_url)
    assert rc == 0, err

    full = api_answer(http_url, chat_session, [user("hi")])
    assert len(sent) == 3
    partial = sent[1][1]["content"]
    assert sent[1] == [user("hi"), assistant(partial), user("more")] and partial and full.startswith(partial)
    assert sent[2] == [user("hi")]  # after /reset
    assert out.startswith("> ") and out.count("> ") >= 7  # a prompt per line read
    assert out.endswith(f"> {full}\n> ")
    assert "/reset" in err and "(stopped)" in err and "error: unknown command /bogus" in err
    assert "chatting with session chatty" in err and "(conversation cleared)" in err

    # End of input (Ctrl-D) quits too.
    monkeypatch.setattr(sys, "stdin", FakeTTY("hi\n"))
    rc, out, err = run_cli(capsys, "chat", "-s", chat_session, *GREEDY, "--http", http_url)
    assert rc == 0 and out == f"> {full}\n> \n", err


def test_cli_chat_errors(capsys, http_url, monkeypatch):
    rc, out, err = run_cli(capsys, "chat", "-s", "nope", "-m", "hi", "--http", http_url)
    assert rc == 1 and out == "" and err.strip() == "error: 404: no session 'nope'"
    rc, _, err = run_cli(capsys, "chat", "-s", "../etc", "-m", "hi", "--http", http_url)
    assert rc == 1 and err.startswith("error: 400: session id must be")
    rc, _, err = run_cli(capsys, "chat", "-m", "hi", "--temperature", 7, "--http", http_url)
    assert rc == 1 and err.startswith("error: 400: temperature")

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    rc, _, err = run_cli(capsys, "chat", "-s", "x", "-m", "hi", "--http", f"http://127.0.0.1:{closed}")
    assert rc == 1 and err.startswith(f"error: connection: http://127.0.0.1:{closed}: ")
    rc, _, err = run_cli(capsys, "chat", "-m", "hi", "--http", f"http://127.0.0.1:{closed}")  # the model lookup
    assert rc == 1 and err.startswith("error: connection: ")

    # The REPL reports each failure and goes on; piped input exits non-zero when a message failed.
    monkeypatch.setattr(sys, "stdin", FakeTTY("hi\nhi again\n"))
    rc, _, err = run_cli(capsys, "chat", "-s", "nope", "--http", http_url)
    assert rc == 0 and err.count("error: 404: no session 'nope'") == 2
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    rc, _, err = run_cli(capsys, "chat", "-s", "nope", "--http", http_url)
    assert rc == 1 and err.strip() == "error: 404: no session 'nope'"

    rc, _, err = run_cli(capsys, "chat", "-m", "hi", "--max-tokens", 0)  # argparse
    assert rc == 2 and "positive" in err
