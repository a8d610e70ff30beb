"""The session store servers share: checkpoints on a local folder and on an S3-compatible store (moto on loopback),
one writer per session through leases with fencing numbers, two registries (two servers) over one store, and a
store that stops answering for a while."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from pathlib import Path

import fsspec
import pytest
from conftest import free_port

import ttt
from server.registry import SessionRegistry
from ttt import store
from ttt.lease import LeaseHeld, LeaseLost, read_lease, release, renew, take_lease
from ttt.storage import StoreUnavailable, as_folder

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = {"ingest": {"chunk_tokens": 16, "context_tokens": 16}}
KJV = (Path(__file__).parent / "data" / "kjv_genesis_exodus.txt").read_text(encoding="utf-8")
PROBE = KJV[5000:5200]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return ttt.load_engine(tiny_model_dir, device="cpu")


@pytest.fixture(params=["local", "s3"])
def store_url(request, tmp_path) -> str:
    return str(tmp_path / "store") if request.param == "local" else request.getfixturevalue("s3_store")


def trained(engine, text: str = KJV[:300]) -> ttt.Session:
    session = engine.create_session(ttt.SessionConfig.from_dict(SMALL))
    session.ingest(text)
    return session


def pointer(url: str) -> store.Pointer:
    return store.Pointer.parse(as_folder(url).read(store.LATEST))


def test_checkpoints_round_trip_prune_and_fall_back(engine, store_url):
    url = f"{store_url}/alice/s1"
    session = trained(engine)
    for n in range(3):
        session.ingest(KJV[300 + 100 * n : 400 + 100 * n])
        ckpt = store.save_session(session, url)
    names = store.checkpoints(url)
    assert len(names) == 2 and pointer(url).checkpoint == names[0] == str(ckpt).rsplit("/", 1)[-1]
    loaded = engine.load_session(url)
    assert loaded.score(PROBE) == session.score(PROBE)  # exact: the same tensors
    assert dataclasses.asdict(loaded.stats) == dataclasses.asdict(session.stats)

    fs, path = fsspec.core.url_to_fs(f"{url}/{names[0]}/optimizer.safetensors")
    fs.pipe_file(path, b"damaged")
    fallback = engine.load_session(url)
    assert fallback.restored_from == names[1] and fallback.warnings[0].startswith(f"{names[0]}/optimizer")
    assert url not in fallback.warnings[0]  # relative to the session's folder
    store.save_session(fallback, url)  # the damaged one goes, the good fallback stays
    assert store.checkpoints(url)[1:] == [names[1]]


def test_only_the_lease_holder_writes(engine, store_url):
    url = f"{store_url}/alice/s1"
    folder = as_folder(url)
    session = trained(engine)
    first = take_lease(folder, "replica-a", seconds=2)
    with pytest.raises(LeaseHeld, match="replica-a"):
        take_lease(folder, "replica-b", seconds=30)
    store.save_session(session, url, fence=first.fence)

    time.sleep(max(0.0, first.expires - time.time()) + 0.1)  # paused past its lease: replica-b takes over
    second = take_lease(folder, "replica-b", seconds=30)
    assert second.fence == first.fence + 1 and pointer(url).fence == second.fence
    before, stats = pointer(url), dataclasses.asdict(session.stats)

    session.ingest(KJV[300:500])  # replica-a wakes up and saves what it learnt since
    with pytest.raises(LeaseLost):
        store.save_session(session, url, fence=first.fence)
    assert pointer(url) == before and len(store.checkpoints(url)) == 1  # nothing of its save is left
    with pytest.raises(LeaseLost):
        renew(folder, first, 30)

    moved = engine.load_session(url)
    assert dataclasses.asdict(moved.stats) == stats
    moved.ingest(KJV[500:600])
    store.save_session(moved, url, fence=second.fence)
    assert pointer(url).fence == second.fence and engine.load_session(url).score(PROBE) == moved.score(PROBE)

    release(folder, second)  # given up: replica-a may come back at once, under a newer fence still
    assert take_lease(folder, "replica-a", seconds=30).fence == second.fence + 1


def test_one_compare_and_swap_of_many_wins(store_url):
    folder = as_folder(f"{store_url}/race")
    assert folder.swap("LEASE", b"0", None)
    _, version = folder.read_versioned("LEASE")
    results: list[bool] = []
    start = threading.Barrier(6)

    def racer(n: int) -> None:
        start.wait()
        results.append(folder.swap("LEASE", str(n + 1).encode(), version))

    threads = [threading.Thread(target=racer, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 5 + [True]
    assert folder.read("LEASE") in {str(n + 1).encode() for n in range(6)}


def test_two_registries_share_one_store(engine, s3_store):
    a = SessionRegistry(engine, Path("unused"), SMALL, store=s3_store, owner="replica-a", lease_seconds=30)
    b = SessionRegistry(engine, Path("unused"), SMALL, store=s3_store, owner="replica-b", lease_seconds=2)
    session = a.create("alice", "notes")
    session.ingest(KJV[:400])
    a.save("alice", "notes")
    assert b.ids("alice") == ["notes"] and b.info("alice", "notes")["tokens_ingested"] == session.stats.tokens_ingested
    with pytest.raises(LeaseHeld):
        b.get("alice", "notes")  # open on replica-a

    a.release_all()  # replica-a hands it over (saved already, then released): the move is exact
    moved = b.get("alice", "notes")
    with pytest.raises(LeaseHeld):
        a.get("alice", "notes")
    assert moved.score(PROBE) == session.score(PROBE)

    moved.ingest(KJV[400:500])  # replica-b stops renewing (killed): after its lease, replica-a takes over
    lease = read_lease(b.folder("alice", "notes"))[0]
    time.sleep(max(0.0, lease.expires - time.time()) + 0.1)
    taken = a.get("alice", "notes")
    assert read_lease(a.folder("alice", "notes"))[0].owner == "replica-a"
    with pytest.raises(LeaseLost):
        b.save("alice", "notes")  # fenced off: the checkpoint replica-a loaded stays the newest
    assert b.info("alice", "notes")["residency"] == "disk"  # replica-b dropped it
    assert dataclasses.asdict(engine.load_session(a.folder("alice", "notes")).stats) == dataclasses.asdict(taken.stats)


class Cable:
    """A TCP relay to ``target`` that can be cut (every connection closed, new ones refused) and mended."""

    def __init__(self, target: tuple[str, int]):
        self.target, self.port = target, free_port()
        self.conns: list[socket.socket] = []
        self.cut_off = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self.listener.accept()
            if self.cut_off.is_set():
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            self.conns += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                s.close()

    def cut(self) -> None:
        self.cut_off.set()
        for s in self.conns:
            s.close()

    def mend(self) -> None:
        self.cut_off.clear()


def test_store_unreachable_for_a_while(engine, s3_endpoint, s3_store, tmp_path):
    host, port = s3_endpoint.removeprefix("http://").split(":")
    cable = Cable((host, int(port)))
    options = {
        "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{cable.port}"},
        "config_kwargs": {"retries": {"max_attempts": 2}},  # the client library's own retries, kept short here
    }
    reg = SessionRegistry(engine, tmp_path, SMALL, store=as_folder(s3_store, **options), owner="replica-a")
    session = reg.create("alice", "notes")
    session.ingest(KJV[:300])
    reg.save("alice", "notes")
    saved = pointer(f"{s3_store}/alice/notes")

    session.ingest(KJV[300:400])
    cable.cut()
    with pytest.raises(StoreUnavailable, match="unreachable"):
        reg.save("alice", "notes")
    assert reg.dirty() == [("alice", "notes")]  # kept in memory, still to save
    assert pointer(f"{s3_store}/alice/notes") == saved  # the store is untouched

    cable.mend()
    reg.save("alice", "notes")
    assert reg.dirty() == [] and pointer(f"{s3_store}/alice/notes") != saved
    reg.release_all()
    assert engine.load_session(f"{s3_store}/alice/notes").score(PROBE) == session.score(PROBE)


def test_a_save_killed_midway_leaves_the_previous_checkpoint(engine, store_url, monkeypatch):
    url = f"{store_url}/alice/s1"
    session = trained(engine)
    store.save_session(session, url)
    before, stats = pointer(url), dataclasses.asdict(session.stats)
    session.ingest(KJV[300:500])
    real_files = store._checkpoint_files

    def dies_after_two_files(*args):
        files = real_files(*args)
        yield next(files)
        yield next(files)
        raise KeyboardInterrupt  # the process dies here: the rest of the checkpoint never reaches the store

    monkeypatch.setattr(store, "_checkpoint_files", dies_after_two_files)
    with pytest.raises(KeyboardInterrupt):
        store.save_session(session, url)
    monkeypatch.undo()
    assert pointer(url) == before  # LATEST still names the complete checkpoint
    assert dataclasses.asdict(engine.load_session(url).stats) == stats
    store.save_session(session, url)  # the next save prunes what the killed one left (objects: no manifest)
    assert store.checkpoints(url) == [pointer(url).checkpoint, before.checkpoint]


def test_delete_keeps_fences_growing(engine, store_url):
    a = SessionRegistry(engine, Path("unused"), SMALL, store=store_url, owner="replica-a")
    stale = a.create("alice", "notes")
    stale.ingest(KJV[:300])
    a.save("alice", "notes")
    old = read_lease(a.folder("alice", "notes"))[0]
    a.delete("alice", "notes")
    assert a.ids("alice") == [] and not store.has_checkpoint(a.folder("alice", "notes"))

    b = SessionRegistry(engine, Path("unused"), SMALL, store=store_url, owner="replica-b")
    b.create("alice", "notes")  # made again under the same id: a newer fence than any before the delete
    assert read_lease(b.folder("alice", "notes"))[0].fence > old.fence
    with pytest.raises(LeaseLost):  # a writer still holding the deleted session's lease cannot write over it
        store.save_session(stale, a.folder("alice", "notes"), fence=old.fence)
    assert not store.has_checkpoint(b.folder("alice", "notes"))
    b.save("alice", "notes")
    assert engine.load_session(b.folder("alice", "notes")).stats.tokens_ingested == 0


def test_a_session_taken_over_stops_its_stream_and_moves(engine, s3_store):
    a = SessionRegistry(engine, Path("unused"), SMALL, store=s3_store, owner="replica-a", lease_seconds=2)
    b = SessionRegistry(engine, Path("unused"), SMALL, store=s3_store, owner="replica-b")
    session = a.create("alice", "notes")
    session.ingest(KJV[:300])
    a.save("alice", "notes")
    a.check_held("alice", "notes", session)  # a stream feeding it goes on
    time.sleep(max(0.0, read_lease(a.folder("alice", "notes"))[0].expires - time.time()) + 0.1)  # a stops renewing
    b.get("alice", "notes")
    with pytest.raises(LeaseLost, match="document_bytes"):  # the stream on a stops before its next chunk
        a.check_held("alice", "notes", session)
    assert a.info("alice", "notes")["residency"] == "disk"  # dropped from a's memory, unsaved
    with pytest.raises(LeaseHeld):
        a.get("alice", "notes")  # b has it now


def test_a_retried_pointer_swap_keeps_the_fallback(engine, store_url, monkeypatch):
    url = f"{store_url}/alice/s1"
    session = trained(engine)
    store.save_session(session, url)
    session.ingest(KJV[300:400])
    store.save_session(session, url)
    fallback = pointer(url).checkpoint
    kind = type(as_folder(url))
    real_swap, lost = kind.swap, []

    def answer_lost_once(folder, name, data, version):
        landed = real_swap(folder, name, data, version)
        if name == store.LATEST and not lost:
            lost.append(name)
            return False  # it landed, but the client library retried it and saw its own write refused
        return landed

    monkeypatch.setattr(kind, "swap", answer_lost_once)
    session.ingest(KJV[400:500])
    store.save_session(session, url)
    assert lost and store.checkpoints(url) == [pointer(url).checkpoint, fallback]
