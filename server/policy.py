"""What one user may hold: sessions, bytes and memory (``Limits``, ``check_price``) and open ingest streams. (The
caps on session settings live with the settings themselves, ``ttt.config.SCHEMA``, and both front doors apply
them.)"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from server.errors import QuotaExceeded
from ttt import SessionConfig
from ttt.session import priced_bytes


@dataclass
class Limits:
    max_sessions_per_user: int = 256
    max_bytes_per_user: int = 16 << 30  # checkpoints on disk
    device_budget_bytes: int = 8 << 30
    host_budget_bytes: int = 32 << 30
    max_session_bytes: int = 2 << 30  # a session's priced memory (ttt.session.priced_bytes)
    max_memory_bytes_per_user: int = 8 << 30  # the priced memory of a user's sessions in memory, summed


def check_price(model, limits: Limits, config: SessionConfig, held: list[SessionConfig]) -> None:
    """QuotaExceeded if a session of ``config`` would hold more memory on ``model`` than one session may, or than
    the user's sessions in memory (``held``: their configs) may together."""
    price = priced_bytes(config, model)
    if price > limits.max_session_bytes:
        raise QuotaExceeded(
            f"these settings need about {price} bytes of memory on this model; one session may "
            f"hold {limits.max_session_bytes}: choose a smaller rank, fewer layers or targets"
        )
    if price + sum(priced_bytes(c, model) for c in held) > limits.max_memory_bytes_per_user:
        raise QuotaExceeded(
            f"a user's sessions in memory may hold {limits.max_memory_bytes_per_user} bytes; "
            "this one would pass it (sessions idle long enough move to disk and free theirs)"
        )


class StreamSlots:
    """At most ``per_user`` ingest streams (gRPC Ingest or HTTP document uploads) open at once per user, and
    ``total`` in all: each gRPC stream holds one of the server's threads, and unary calls need some left."""

    def __init__(self, per_user: int, total: int):
        self.per_user, self.total = per_user, total
        self._open: Counter[str] = Counter()
        self._lock = threading.Lock()

    def open(self, user: str) -> int:
        """The user's streams open now."""
        with self._lock:
            return self._open[user]

    @contextmanager
    def hold(self, user: str) -> Iterator[None]:
        with self._lock:
            if self._open[user] >= self.per_user:
                raise QuotaExceeded(f"at most {self.per_user} ingest streams open at once per user")
            if self._open.total() >= self.total:
                raise QuotaExceeded(f"the server has {self.total} ingest streams open, its limit: try again later")
            self._open[user] += 1
        try:
            yield
        finally:
            with self._lock:
                self._open[user] -= 1
