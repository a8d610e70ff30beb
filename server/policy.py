"""What one user may hold open: ingest streams. (The caps on session settings live with the settings
themselves, ``ttt.config.SCHEMA``, and both front doors apply them.)"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from server.errors import QuotaExceeded

class StreamSlots:
    """At most ``limit`` ingest streams (gRPC Ingest or HTTP document uploads) open at once per user."""

    def __init__(self, limit: int):
        self.limit = limit
        self._open: Counter[str] = Counter()
        self._lock = threading.Lock()

    @contextmanager
    def hold(self, user: str) -> Iterator[None]:
        with self._lock:
            if self._open[user] >= self.limit:
                raise QuotaExceeded(f"at most {self.limit} ingest streams open at once per user")
            self._open[user] += 1
        try:
            yield
        finally:
            with self._lock:
                self._open[user] -= 1
