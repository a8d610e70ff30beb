"""Sessions by user: on the device while in use, parked in host memory or on disk when idle.

Checkpoints live under ``<store>/<user>/<session>/`` (``<data_dir>/users`` or an fsspec URL, ``ttt.storage``);
folder names come only from validated ids (``ttt.engine.check_session_id``), never from raw request text. A session
in memory holds its lease (``ttt.lease``): servers sharing a store never write one session both; every save
carries the lease's fencing number, and a session whose lease was taken over is dropped unsaved. Residency tiers,
least recently used first out: "device" (ready to train and answer), "host" (tensors in host memory) and "disk"
(saved, then dropped from memory). A session comes back on its next use (``get``). Methods that touch a session's
tensors (``get``, ``create``, ``save``, ``enforce_budgets``, ...) are called on the scheduler's worker.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from server.errors import AlreadyExists, Conflict, NotFound, QuotaExceeded
from server.leases import Leasing
from server.policy import Limits, check_price
from ttt import Engine, Session, SessionConfig
from ttt.config import check_caps, merge
from ttt.engine import check_session_id
from ttt.lease import Lease, LeaseLost, release, renew
from ttt.model import BaseModelMismatch
from ttt.peft import import_peft
from ttt.storage import Folder, as_folder
from ttt.store import (
    KEEP_CHECKPOINTS,
    SessionFormatError,
    checkpoints,
    estimate_checkpoint_bytes,
    has_checkpoint,
    remove_checkpoints,
    saved_info,
    saved_sessions,
)

__all__ = ["AlreadyExists", "Limits", "NotFound", "QuotaExceeded", "SessionRegistry"]
Key = tuple[str, str]  # (user, session id)
TIERS = ("device", "host", "disk")
log = logging.getLogger(__name__)


class Events:
    """Where residency moves and checkpoint fallbacks are reported (``server.metrics.Metrics`` is one)."""

    def move(self, source: str, target: str) -> None: ...

    def fallback(self) -> None: ...


@dataclass
class Entry:
    session: Session
    lease: Lease  # held while the session is in memory
    saved_version: int  # session.version at the last checkpoint (or load)
    saved_chunks: int  # stats.chunks at the last checkpoint, for chunk-count autosave
    saved_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    tier: str = "device"
    bytes: int = 0  # resident bytes when last measured on the worker (read by metrics from other threads)

    @classmethod
    def saved(cls, session: Session, lease: Lease) -> Entry:
        return cls(session, lease, session.version, session.stats.chunks)

    @property
    def dirty(self) -> bool:
        return self.session.version != self.saved_version


def _private(e: Exception, folder: Folder) -> Exception:
    """The same error with the server's paths cut to the session's own folder (clients see its message)."""
    return type(e)(str(e).replace(f"{folder}/", "").replace(str(folder), "session"))


class SessionRegistry(Leasing):
    def __init__(
        self,
        engine: Engine,
        data_dir: Path,
        defaults: dict | None = None,
        limits: Limits | None = None,
        events: Events | None = None,
        busy: Callable[[Key], bool] = lambda key: False,
        *,
        store: str | os.PathLike | Folder | None = None,
        owner: str | None = None,
        lease_seconds: float = 30.0,
    ):
        """``store``: where sessions are kept (default ``<data_dir>/users``); ``owner``: this registry's name in the
        sessions' leases (default ``<host name>:<store>``: a restarted server takes its own sessions back at once)."""
        self.engine = engine
        self.root = as_folder(store if store is not None else Path(data_dir) / "users")
        self.owner = owner or f"{socket.gethostname()}:{self.root}"
        self.address = ""  # said in the leases taken from now on: where this server answers for its sessions
        self.lease_seconds = lease_seconds
        self.defaults = defaults or {}
        self.limits = limits or Limits()
        self.events = events or Events()
        self.busy = busy  # the scheduler has work queued for the session: keep it
        self.host = torch.device("cpu")  # on a CPU-only server this is the device: moves are bookkeeping
        self._live: OrderedDict[Key, Entry] = OrderedDict()  # least recently used first
        self._feeding: set[Key] = set()  # sessions a document stream feeds (``feeding``)
        self._lock = threading.Lock()
        self._leases = threading.Lock()  # taken before _lock: one renewal or release of a lease at a time

    def folder(self, user: str, session_id: str) -> Folder:
        return self.root.child(check_session_id(user)).child(check_session_id(session_id))

    def _on_disk(self, user: str) -> set[str]:
        return {sid for (sid,) in saved_sessions(self.root.child(check_session_id(user)))}

    def ids(self, user: str) -> list[str]:
        with self._lock:
            live = {sid for (u, sid) in self._live if u == user}
        return sorted(live | self._on_disk(user))

    # ---- pins ------------------------------------------------------------------------------------

    @contextmanager
    def feeding(self, user: str, session_id: str) -> Iterator[None]:
        """One document stream feeds the session: it stays where it is (never demoted) meanwhile, and a second
        stream is refused (Conflict), since two would interleave their pieces. Any thread."""
        key = (user, check_session_id(session_id))
        with self._lock:
            if key in self._feeding:
                raise Conflict(
                    f"session {session_id!r} is reading another document: one stream at a time", "session_busy"
                )
            self._feeding.add(key)
        try:
            yield
        finally:
            with self._lock:
                self._feeding.discard(key)

    # ---- create, import, get ---------------------------------------------------------------------

    def create(self, user: str, session_id: str | None, settings: dict | None = None) -> Session:
        config = SessionConfig.from_dict(merge(self.defaults, check_caps(settings or {})))
        self._check_price(user, config)  # before anything is allocated
        return self._add(user, session_id, lambda: self.engine.create_session(config, session_id))

    def _check_price(self, user: str, config: SessionConfig) -> None:
        with self._lock:
            held = [e.session.config for (u, _), e in self._live.items() if u == user]
        check_price(self.engine.base.model, self.limits, config, held)

    def import_adapter(
        self, user: str, session_id: str | None, files: dict[str, bytes], settings: dict | None = None
    ) -> Session:
        """A new session from a peft LoRA adapter's files, saved at once. ``settings``: all but the fast weights
        (the adapter's)."""
        settings = check_caps(settings or {})
        if settings.get("fast"):
            raise ValueError("fast-weight settings come from the adapter: send only memory, ingest and recall settings")
        merged = {k: v for k, v in merge(self.defaults, settings).items() if k != "fast"}

        def build() -> Session:  # the adapter's tensors are in memory already (the request): priced once read
            session = import_peft(self.engine, files, session_id, merged)
            self._check_price(user, session.config)
            return session

        session = self._add(user, session_id, build)
        self.save(user, session.id)
        return session

    def _add(self, user: str, session_id: str | None, build: Callable[[], Session]) -> Session:
        """Register a new session if the user's quotas allow it; nothing is written or kept otherwise."""
        with self._lock:
            existing = {sid for (u, sid) in self._live if u == user} | self._on_disk(user)
        if session_id is not None and session_id in existing:
            raise AlreadyExists(f"session {session_id!r} already exists")
        if len(existing) >= self.limits.max_sessions_per_user:
            raise QuotaExceeded(f"at most {self.limits.max_sessions_per_user} sessions per user")
        session = build()
        need = self._user_bytes(user) + KEEP_CHECKPOINTS * estimate_checkpoint_bytes(session)
        if need > self.limits.max_bytes_per_user:
            raise QuotaExceeded(f"over the disk quota of {self.limits.max_bytes_per_user} bytes per user")
        key = (user, session.id)
        with self._leased(self.folder(*key)) as lease:  # another server may create it too
            if has_checkpoint(self.folder(*key)):
                raise AlreadyExists(f"session {session.id!r} already exists")
            with self._lock:
                # A new session is dirty: nothing of it is on disk yet.
                entry = Entry(session, lease, saved_version=-1, saved_chunks=0, bytes=session.resident_bytes())
                if self._live.setdefault(key, entry) is not entry:
                    raise AlreadyExists(f"session {session.id!r} already exists")
        self.enforce_budgets(keep=key)
        return session

    def _user_bytes(self, user: str) -> int:
        """The user's checkpoints on disk, plus the estimated checkpoints of live sessions never saved.

        A session keeps its previous checkpoint as a fallback: it takes KEEP_CHECKPOINTS checkpoints.
        """
        with self._lock:
            unsaved = [e.session for (u, _), e in self._live.items() if u == user and e.saved_version == -1]
        return self.root.child(user).size() + KEEP_CHECKPOINTS * sum(map(estimate_checkpoint_bytes, unsaved))

    def check_exists(self, user: str, session_id: str) -> None:
        """NotFound unless the user has this session (in memory or on disk); no device work. Any thread."""
        key = (user, check_session_id(session_id))
        with self._lock:
            if key in self._live:
                return
        if not has_checkpoint(self.folder(user, session_id)):
            raise NotFound(f"no session {session_id!r}")

    def get(self, user: str, session_id: str) -> Session:
        """The session on the device: promoted from host memory, or loaded from its last checkpoint."""
        key = (user, check_session_id(session_id))
        with self._lock:
            entry = self._live.get(key)
        if entry is not None and not self._still_held(key, entry):
            entry = None  # taken over: loaded again below once the other server lets it go (LeaseHeld until then)
        if entry is None:
            folder = self.folder(user, session_id)
            if not has_checkpoint(folder):
                raise NotFound(f"no session {session_id!r}")
            with self._leased(folder) as lease:  # LeaseHeld: open on another server
                try:
                    session = self.engine.load_session(folder)
                except (SessionFormatError, BaseModelMismatch) as e:
                    raise _private(e, folder) from None
            if session.restored_from:
                self.events.fallback()
            entry = Entry.saved(session, lease)
            with self._lock:
                entry = self._live.setdefault(key, entry)
            self.events.move("disk", "device")
        elif entry.tier == "host":
            entry.session.to(self.engine.base.device)
            entry.tier = "device"
            self.events.move("host", "device")
        with self._lock:
            entry.last_used = time.time()
            self._live.move_to_end(key)
        entry.bytes = entry.session.resident_bytes()
        self.enforce_budgets(keep=key)
        return entry.session

    # ---- residency -------------------------------------------------------------------------------

    def enforce_budgets(self, keep: Key | None = None) -> None:
        """Demote least recently used sessions until each tier fits its budget (on the worker).

        Never demoted: ``keep`` (in use now), pinned sessions and sessions with queued work. A session
        leaves memory only after a successful save: a failed one keeps it in host memory.
        """
        for source, target, budget in (
            ("device", "host", self.limits.device_budget_bytes),
            ("host", "disk", self.limits.host_budget_bytes),
        ):
            with self._lock:
                tier = [(k, e) for k, e in self._live.items() if e.tier == source]
            for _, e in tier:
                e.bytes = e.session.resident_bytes()
            used = sum(e.bytes for _, e in tier)
            for key, entry in tier:
                if used <= budget:
                    break
                if key == keep or key in self._feeding or self.busy(key):
                    continue
                if target == "host":
                    entry.session.to(self.host)
                    entry.tier = "host"
                elif not self._drop(key, entry):
                    continue
                used -= entry.bytes
                self.events.move(source, target)

    def _drop(self, key: Key, entry: Entry) -> bool:
        """Save ``entry`` if it changed, then forget it from memory; False (logged) when the save failed."""
        if entry.dirty:
            try:
                self.save(*key)
            except Exception:
                log.warning("a session stays in memory: saving it before moving it to disk failed", exc_info=True)
                return False
        with self._leases:
            with self._lock:
                if self._live.get(key) is not entry or key in self._feeding:
                    return False
                del self._live[key]
            release(self.folder(*key), entry.lease)
        return True

    def park(self, user: str, session_id: str) -> None:
        """Save the session if it changed, drop it from memory and release its lease, so that another server may
        take it (a session being fed stays). Nothing when it is not in memory."""
        key = (user, check_session_id(session_id))
        with self._lock:
            entry = self._live.get(key)
        if entry is not None and self._drop(key, entry):
            self.events.move(entry.tier, "disk")

    def residency(self) -> dict[str, tuple[int, int]]:
        """tier -> (sessions, bytes): bytes in memory for device and host, checkpoint bytes for disk. Any thread."""
        out = {tier: (0, 0) for tier in TIERS}
        with self._lock:
            live = set(self._live)
            for e in self._live.values():
                n, b = out[e.tier]
                out[e.tier] = (n + 1, b + e.bytes)
        parked = [key for key in saved_sessions(self.root, depth=2) if key not in live]
        out["disk"] = (len(parked), sum(self.folder(*key).size() for key in parked))
        return out

    # ---- info, save, delete, reset ---------------------------------------------------------------

    def info(self, user: str, session_id: str) -> dict:
        """Session info without loading a session that is only on disk. Any thread."""
        key = (user, check_session_id(session_id))
        folder = self.folder(user, session_id)
        with self._lock:
            entry = self._live.get(key)
        if entry is not None:
            info, residency = entry.session.info(), entry.tier
        elif not has_checkpoint(folder):
            raise NotFound(f"no session {session_id!r}")
        else:
            try:
                info, residency = saved_info(folder), "disk"
            except SessionFormatError as e:
                raise _private(e, folder) from None
        return {**info, "residency": residency, "disk_bytes": folder.size()}

    def save(self, user: str, session_id: str) -> None:
        """Checkpoint a session held in memory (one only on disk is saved already)."""
        key = (user, check_session_id(session_id))
        folder = self.folder(user, session_id)
        with self._lock:
            entry = self._live.get(key)
        if entry is None:
            if not has_checkpoint(folder):
                raise NotFound(f"no session {session_id!r}")
            return
        session = entry.session
        with session.lock:
            # After the save, the newest two checkpoints remain: older ones no longer count.
            older = sum(folder.child(c).size() for c in checkpoints(folder)[1:])
            need = self.root.child(user).size() - older + estimate_checkpoint_bytes(session)
            if need > self.limits.max_bytes_per_user:
                raise QuotaExceeded(f"over the disk quota of {self.limits.max_bytes_per_user} bytes per user")
            try:
                session.save(folder, fence=entry.lease.fence)
            except LeaseLost:
                self._forget(key, entry)
                raise
            entry.saved_version, entry.saved_chunks, entry.saved_at = session.version, session.stats.chunks, time.time()

    def delete(self, user: str, session_id: str) -> None:
        """Forget the session here and in the store: its checkpoints go, its lease stays (released), so that the
        fencing numbers of a session made again under this id keep growing past any stale writer's."""
        key = (user, check_session_id(session_id))
        folder = self.folder(user, session_id)
        with self._lock:
            entry = self._live.pop(key, None)
        if entry is None and not has_checkpoint(folder):
            raise NotFound(f"no session {session_id!r}")
        # Still ours (LeaseLost: another server's now), or taken for the delete (LeaseHeld: in use elsewhere).
        lease = renew(folder, entry.lease, self.lease_seconds) if entry is not None else self._take_lease(folder)
        try:
            remove_checkpoints(folder)
        finally:
            release(folder, lease)

    def reset(self, user: str, session_id: str) -> Session:
        session = self.get(user, session_id)
        session.reset()
        return session

    # ---- autosave --------------------------------------------------------------------------------

    def chunks_since_save(self, user: str, session_id: str) -> int:
        entry = self._live.get((user, session_id))
        return 0 if entry is None else entry.session.stats.chunks - entry.saved_chunks

    def dirty(self, idle_seconds: float = 0.0) -> list[Key]:
        """Sessions in memory changed since their checkpoint and unused for ``idle_seconds``."""
        now = time.time()
        with self._lock:
            return [k for k, e in self._live.items() if e.dirty and now - e.last_used >= idle_seconds]
