"""What one user may hold open: ingest streams. (The caps on session settings live with the settings
themselves, ``ttt.config.SCHEMA``, and both front doors apply them.)"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from server.errors import QuotaExceeded


class StreamSlots:
    """At most ``per_user`` ingest streams (gRPC Ingest or HTTP document uploads) open at once per user, and
    ``total`` in all: each gRPC stream holds one of the server's threads, and unary calls need some left."""

    def __init__(self, per_user: int, total: int):
        self.per_user, self.total = per_user, total
        self._open: Counter[str] = Counter()
        self._lock = threading.Lock()

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
