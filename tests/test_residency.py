"""Residency tiers of the session registry: least recently used sessions move device -> host -> disk.

Tiny sessions with budgets of a few sessions' bytes. On a CPU-only machine the device is host memory,
so a device -> host move is bookkeeping; what matters here is the accounting, the order, the pins and
that a session brought back is the very same session (weights, optimizer state, window, answers).
"""

from collections import Counter
from pathlib import Path

import pytest
import torch

import ttt
from server.errors import Conflict
from server.policy import Limits
from server.registry import SessionRegistry

pytestmark = pytest.mark.usefixtures("one_thread")
# No recall memory: every trained session then has about the same size (the budgets below count sessions).
SMALL = {"ingest": {"chunk_tokens": 16, "context_tokens": 16}, "memory": "off"}
KJV = (Path(__file__).parent / "data" / "kjv_genesis_exodus.txt").read_text(encoding="utf-8")
QUESTION = [{"role": "user", "content": "Who made the heaven and the earth?"}]


class Recorder:
    def __init__(self):
        self.moves: Counter[tuple[str, str]] = Counter()
        self.fallbacks = 0

    def move(self, source, target):
        self.moves[source, target] += 1

    def fallback(self):
        self.fallbacks += 1


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return ttt.load_engine(tiny_model_dir, device="cpu")


def snapshot(session) -> dict:
    state = session.optimizer.state_dict()["state"]
    opt = {(i, name): t.clone() for i, s in state.items() for name, t in s.items() if isinstance(t, torch.Tensor)}
    return {
        "fast": {k: v.clone() for k, v in session.fast.state_dict().items()},
        "opt": opt,
        "window": list(session.window),
        "pending": list(session.pending),
        "chunks": session.stats.chunks,
    }


def assert_same(a: dict, b: dict) -> None:
    assert a["window"] == b["window"] and a["pending"] == b["pending"] and a["chunks"] == b["chunks"]
    assert a["fast"].keys() == b["fast"].keys() and all(torch.equal(a["fast"][k], b["fast"][k]) for k in a["fast"])
    assert a["opt"].keys() == b["opt"].keys() and all(torch.equal(a["opt"][k], b["opt"][k]) for k in a["opt"])


def registry(engine, tmp_path, device_sessions: float, host_sessions: float, **kwargs) -> SessionRegistry:
    """A registry whose budgets hold about so many trained tiny sessions."""
    probe = engine.create_session(SMALL)
    probe.ingest(KJV[:400])
    size = probe.resident_bytes()
    limits = Limits(device_budget_bytes=int(device_sessions * size), host_budget_bytes=int(host_sessions * size))
    return SessionRegistry(engine, tmp_path, SMALL, limits, **kwargs)


def fill(reg, n: int) -> SessionRegistry:
    """``n`` trained sessions s0..s{n-1} (s0 least recently used)."""
    for i in range(n):
        reg.create("u", f"s{i}").ingest(KJV[400 * i : 400 * (i + 1)])
    return reg


def tiers(reg, n: int) -> list[str]:
    return [reg.info("u", f"s{i}")["residency"] for i in range(n)]


def test_least_recently_used_move_down_and_come_back_unchanged(engine, tmp_path):
    events = Recorder()
    reg = fill(registry(engine, tmp_path, 2.5, 2.5, events=events), 6)
    before = {f"s{i}": snapshot(reg.get("u", f"s{i}")) for i in range(6)}  # each get: most recent, in order
    answers = {sid: reg.get("u", sid).generate(QUESTION, max_tokens=8).text for sid in ("s0", "s5")}
    reg.get("u", "s5")  # s0 answered after s4: put s5 back on top
    reg.enforce_budgets()
    assert tiers(reg, 6) == ["device", "disk", "disk", "host", "host", "device"]
    assert events.moves[("host", "disk")] >= 2 and events.moves[("device", "host")] >= 4

    res = reg.residency()  # a session loaded from disk holds no cached keys/values yet: sizes differ a little
    assert res["device"][0] == res["host"][0] == 2
    assert 0 < res["device"][1] <= reg.limits.device_budget_bytes and 0 < res["host"][1] <= reg.limits.host_budget_bytes
    assert res["device"][1] == sum(reg.info("u", sid)["resident_bytes"] for sid in ("s0", "s5"))
    assert res["disk"][0] == 2 and res["disk"][1] > 0
    # Nothing lost: a session leaves memory only once saved.
    for sid in ("s1", "s2"):
        assert (tmp_path / "users" / "u" / sid / "LATEST").is_file()
        assert reg.info("u", sid)["resident_bytes"] == 0 and reg.info("u", sid)["disk_bytes"] > 0

    events.moves.clear()
    for sid in ("s0", "s1", "s3"):  # from device, from disk, from host: all the same as before
        session = reg.get("u", sid)
        assert reg.info("u", sid)["residency"] == "device"
        assert_same(snapshot(session), before[sid])
    assert reg.get("u", "s0").generate(QUESTION, max_tokens=8).text == answers["s0"]
    assert events.moves[("disk", "device")] >= 1 and events.moves[("host", "device")] >= 1
    # Bringing sessions back pushed others down: still within budget.
    assert reg.residency()["device"][0] == 2 and reg.residency()["host"][0] <= 2


def test_fed_and_busy_sessions_stay(engine, tmp_path):
    reg = registry(engine, tmp_path, 1.5, 0.5, busy=lambda key: key == ("u", "s1"))
    with reg.feeding("u", "s0"):
        fill(reg, 5)
        assert tiers(reg, 5) == ["device", "device", "disk", "disk", "device"]
        with pytest.raises(Conflict, match="one stream at a time"), reg.feeding("u", "s0"):
            pass  # a second stream would interleave its pieces with the first's
        with reg.feeding("u", "s2"):  # another session: its own stream
            pass
    reg.get("u", "s4")  # its stream closed: s0 goes, s1 stays while its work is queued
    assert tiers(reg, 5) == ["disk", "device", "disk", "disk", "device"]


def test_a_session_that_cannot_be_saved_stays_in_memory(engine, tmp_path, monkeypatch):
    reg = fill(registry(engine, tmp_path, 0.5, 0.5), 3)
    assert tiers(reg, 3) == ["disk", "disk", "device"]
    monkeypatch.setattr(reg.limits, "max_bytes_per_user", 1)  # every save is now over the disk quota
    changed = reg.get("u", "s0")
    changed.ingest(KJV[5000:5100])
    reg.get("u", "s1")
    assert reg.info("u", "s0")["residency"] == "host" and ("u", "s0") in reg.dirty()
