"""Sessions by user: in memory while in use, checkpointed under ``<data_dir>/users/<user>/<session>/``.

Folder names come only from validated ids (``ttt.engine.check_session_id``), never from raw request
text. Methods that touch a session's tensors are called on the scheduler's worker.
"""

from __future__ import annotations

import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import SafetensorError, safe_open

from ttt import Engine, Session, SessionConfig
from ttt.engine import check_session_id
from ttt.store import read_manifest

Key = tuple[str, str]  # (user, session id)


class NotFound(KeyError):
    pass


class AlreadyExists(ValueError):
    pass


class QuotaExceeded(Exception):
    pass


@dataclass
class Entry:
    session: Session
    saved_version: int  # session.version at the last checkpoint (or load)
    saved_chunks: int  # stats.chunks at the last checkpoint, for chunk-count autosave
    saved_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)

    @classmethod
    def saved(cls, session: Session) -> "Entry":
        return cls(session, session.version, session.stats.chunks)

    @property
    def dirty(self) -> bool:
        return self.session.version != self.saved_version


def merge(base: dict, override: dict) -> dict:
    """A partial SessionConfig dict over another."""
    out = {k: dict(v) for k, v in base.items()}
    for section, values in override.items():
        out.setdefault(section, {}).update(values)
    return out


class SessionRegistry:
    def __init__(self, engine: Engine, data_dir: Path, defaults: dict | None = None, max_sessions_per_user: int = 256):
        self.engine = engine
        self.root = Path(data_dir) / "users"
        self.defaults = defaults or {}
        self.max_sessions_per_user = max_sessions_per_user
        self._live: dict[Key, Entry] = {}
        self._lock = threading.Lock()

    def folder(self, user: str, session_id: str) -> Path:
        return self.root / check_session_id(user) / check_session_id(session_id)

    def _on_disk(self, user: str) -> set[str]:
        d = self.root / check_session_id(user)
        return {p.name for p in d.iterdir() if (p / "LATEST").is_file()} if d.is_dir() else set()

    def ids(self, user: str) -> list[str]:
        with self._lock:
            live = {sid for (u, sid) in self._live if u == user}
        return sorted(live | self._on_disk(user))

    def create(self, user: str, session_id: str | None, settings: dict | None = None) -> Session:
        config = SessionConfig.from_dict(merge(self.defaults, settings or {}))
        with self._lock:
            existing = {sid for (u, sid) in self._live if u == user} | self._on_disk(user)
            if session_id is not None and session_id in existing:
                raise AlreadyExists(f"session {session_id!r} already exists")
            if len(existing) >= self.max_sessions_per_user:
                raise QuotaExceeded(f"at most {self.max_sessions_per_user} sessions per user")
            session = self.engine.create_session(config, session_id)
            # A new session is dirty: nothing of it is on disk yet.
            self._live[(user, session.id)] = Entry(session, saved_version=-1, saved_chunks=0)
        return session

    def get(self, user: str, session_id: str) -> Session:
        """The live session, loading its last checkpoint on first use."""
        key = (user, check_session_id(session_id))
        with self._lock:
            entry = self._live.get(key)
        if entry is None:
            folder = self.folder(user, session_id)
            if not (folder / "LATEST").is_file():
                raise NotFound(f"no session {session_id!r}")
            session = self.engine.load_session(folder)
            entry = Entry.saved(session)
            with self._lock:
                entry = self._live.setdefault(key, entry)
        entry.last_used = time.time()
        return entry.session

    def info(self, user: str, session_id: str) -> dict:
        """Session info without loading a session that is only on disk."""
        key = (user, check_session_id(session_id))
        with self._lock:
            entry = self._live.get(key)
        if entry is not None:
            return {**entry.session.info(), "residency": "device"}
        folder = self.folder(user, session_id)
        latest = folder / "LATEST"
        if not latest.is_file():
            raise NotFound(f"no session {session_id!r}")
        name, digest = latest.read_text().split()
        m = read_manifest(folder / name, digest)
        s = m["stats"]
        try:  # untrained tokens: the length of `pending` in tokens.safetensors (only its header is read)
            with safe_open(folder / name / "tokens.safetensors", framework="pt") as f:
                pending = f.get_slice("pending").get_shape()[0]
        except (OSError, SafetensorError):  # unreadable: loading says why (or falls back to the previous checkpoint)
            pending = 0
        return {
            "id": session_id,
            "pending_tokens": pending,
            "document_bytes": m["tokenizer_state"].get("bytes_received", 0),
            "fast_weight_bytes": 0,
            "residency": "disk",
            **s,
        }

    def save(self, user: str, session_id: str) -> Session:
        session = self.get(user, session_id)
        with session.lock:
            session.save(self.folder(user, session_id))
            entry = self._live[(user, session_id)]
            entry.saved_version, entry.saved_chunks, entry.saved_at = session.version, session.stats.chunks, time.time()
        return session

    def delete(self, user: str, session_id: str) -> None:
        key = (user, check_session_id(session_id))
        folder = self.folder(user, session_id)
        with self._lock:
            found = self._live.pop(key, None) is not None
        if folder.is_dir():
            shutil.rmtree(folder)
            found = True
        if not found:
            raise NotFound(f"no session {session_id!r}")

    def reset(self, user: str, session_id: str) -> Session:
        session = self.get(user, session_id)
        session.reset()
        return session

    @property
    def resident(self) -> int:
        return len(self._live)

    def chunks_since_save(self, user: str, session_id: str) -> int:
        entry = self._live.get((user, session_id))
        return 0 if entry is None else entry.session.stats.chunks - entry.saved_chunks

    def dirty(self, idle_seconds: float = 0.0) -> list[Key]:
        """Live sessions changed since their checkpoint and unused for ``idle_seconds``."""
        now = time.time()
        with self._lock:
            return [k for k, e in self._live.items() if e.dirty and now - e.last_used >= idle_seconds]
