"""What one request may ask for: caps on session settings, and open ingest streams per user.

Both front doors apply the same caps (HTTP also documents them in its OpenAPI schema). They only keep
a single request from asking for an impossible allocation; ``ttt.config`` checks the values further.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from server.errors import QuotaExceeded

# (section, field) -> (min, max) for numbers, or the longest length for strings and lists.
RANGES: dict[tuple[str, str], tuple[int, int]] = {
    ("fast", "rank"): (1, 1024),
    ("fast", "mlp_hidden"): (1, 16384),
    ("ingest", "chunk_tokens"): (2, 1 << 16),
    ("ingest", "context_tokens"): (0, 1 << 16),
    ("ingest", "sink_tokens"): (0, 1 << 16),
    ("ingest", "steps_per_chunk"): (1, 100),
}
LENGTHS: dict[tuple[str, str], int] = {
    ("fast", "kind"): 64,
    ("fast", "layers"): 1024,
    ("fast", "targets"): 16,
    ("ingest", "optimizer"): 64,
    ("ingest", "activation_checkpointing"): 64,
}


def field_limits(section: str, name: str) -> dict:
    """The caps of one setting as pydantic ``Field`` keywords."""
    if (section, name) in RANGES:
        lo, hi = RANGES[section, name]
        return {"ge": lo, "le": hi}
    return {"max_length": LENGTHS[section, name]}


def check_settings(settings: dict) -> dict:
    """``settings`` (a partial SessionConfig dict) if every capped value is within its cap; ValueError otherwise."""
    for section, values in settings.items():
        for name, value in values.items() if isinstance(values, dict) else ():
            if (section, name) in RANGES and isinstance(value, (int, float)):
                lo, hi = RANGES[section, name]
                if not lo <= value <= hi:
                    raise ValueError(f"{section}.{name} must be between {lo} and {hi}")
            if (section, name) in LENGTHS and hasattr(value, "__len__") and len(value) > LENGTHS[section, name]:
                raise ValueError(f"{section}.{name} is longer than {LENGTHS[section, name]}")
    return settings


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
