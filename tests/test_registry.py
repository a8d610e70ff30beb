"""Session registry and key ring, without a server."""

import json

import pytest

import ttt
from server.auth import KeyRing, hash_key
from server.registry import AlreadyExists, NotFound, SessionRegistry

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = {"ingest": {"chunk_tokens": 16, "context_tokens": 16}}


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return ttt.load_engine(tiny_model_dir, device="cpu")


def test_every_change_makes_a_session_dirty_until_saved(engine, tmp_path):
    reg = SessionRegistry(engine, tmp_path, SMALL)
    s = reg.create("alice", "notes")
    assert reg.dirty() == [("alice", "notes")]  # nothing of it is on disk yet
    reg.save("alice", "notes")
    assert reg.dirty() == []
    s.append_text("In the beginn")  # held back by the tokenizer: still a change to save
    assert reg.dirty() == [("alice", "notes")]
    s.ingest("ing God created the heaven and the earth. " * 4)
    reg.save("alice", "notes")
    trained = s.stats.chunks
    assert trained > 0 and reg.dirty() == []

    # A reset followed by as many chunks as before is still a change (chunk counts alone would miss it).
    reg.reset("alice", "notes")
    s.append_tokens(list(range(100, 100 + 16 * trained)))
    s.end_document()
    while s.train_next_chunk():
        pass
    assert s.stats.chunks == trained and reg.dirty() == [("alice", "notes")]
    reg.save("alice", "notes")
    window = list(s.window)

    fresh = SessionRegistry(engine, tmp_path, SMALL)  # a restarted server
    assert fresh.info("alice", "notes")["residency"] == "disk"
    assert fresh.get("alice", "notes").window == window
    assert fresh.dirty() == []


def test_users_are_separate_and_ids_unique(engine, tmp_path):
    reg = SessionRegistry(engine, tmp_path, SMALL)
    reg.create("alice", "s1")
    reg.create("bob", "s1")  # the same id for another user is another session
    with pytest.raises(AlreadyExists):
        reg.create("alice", "s1")
    reg.delete("alice", "s1")
    with pytest.raises(NotFound):
        reg.get("alice", "s1")
    assert reg.ids("bob") == ["s1"] and reg.ids("alice") == []


def test_key_ring(tmp_path):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"alice": [hash_key("ka")], "bob": "sha256:" + hash_key("kb")}))
    ring = KeyRing(keys)
    assert ring.user_for("Bearer ka") == "alice" and ring.user_for("bearer kb") == "bob"
    keys.write_text(json.dumps({"alice@example.com": [hash_key("k")]}))
    with pytest.raises(ValueError):  # user names become folder names: refused at start, not per call
        KeyRing(keys)
