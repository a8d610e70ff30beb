"""Every session operation once, under both front doors: the gRPC service and the HTTP routers only translate
their messages into these calls and the results back (and exceptions through ``server.errors``).

Work on a session's tensors runs as one scheduler unit and is returned as a Future (a gRPC handler thread waits on
it, an HTTP route awaits it without a thread); what needs no device (info, the list, the stream slots) answers
at once. Results are plain data: session info dicts, adapter files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager

from server.documents import DocumentFeed, stream_settings
from server.errors import Conflict, NotFound
from ttt.engine import check_session_id
from ttt.peft import peft_files


class SessionService:
    def __init__(self, state):
        """``state``: the running ``server.main.ServerState`` (its registry, scheduler, stream slots, limits)."""
        self.state = state

    def _unit(self, user: str, sid: str | None, fn: Callable, *args) -> Future:
        return self.state.scheduler.submit((user, sid), fn, *args)

    # ---- what needs no device ----

    def info(self, user: str, sid: str) -> dict:
        """Without loading a session that is only on disk (NotFound for another user's)."""
        return self.state.registry.info(user, check_session_id(sid))

    def list(self, user: str) -> list[dict]:
        return [self.info(user, sid) for sid in self.state.registry.ids(user)]

    def check_exists(self, user: str, sid: str) -> None:
        self.state.registry.check_exists(user, check_session_id(sid))

    # ---- one unit each ----

    def create(self, user: str, sid: str | None, settings: dict, adapter: dict[str, bytes] | None = None) -> Future:
        """A new session (its fast weights from a peft adapter's two files, when given) -> its info."""
        registry = self.state.registry

        def build() -> dict:
            if adapter is not None:
                session = registry.import_adapter(user, sid, adapter, settings)
            else:
                session = registry.create(user, sid, settings)
            return registry.info(user, session.id)

        return self._unit(user, sid, build)

    def delete(self, user: str, sid: str) -> Future:
        return self._unit(user, sid, self.state.registry.delete, user, check_session_id(sid))

    def save(self, user: str, sid: str) -> Future:
        """A checkpoint now -> the session's info."""
        return self._then_info(user, sid, self.state.registry.save)

    def reset(self, user: str, sid: str) -> Future:
        """Forget everything learned -> the session's info."""
        return self._then_info(user, sid, self.state.registry.reset)

    def _then_info(self, user: str, sid: str, action: Callable[[str, str], object]) -> Future:
        sid = check_session_id(sid)

        def run() -> dict:
            action(user, sid)
            return self.state.registry.info(user, sid)

        return self._unit(user, sid, run)

    def adapter_files(self, user: str, sid: str) -> Future:
        """The session's fast weights as a peft adapter's two files (LoRA sessions only)."""
        sid = check_session_id(sid)
        return self._unit(user, sid, lambda: peft_files(self.state.registry.get(user, sid)))

    # ---- documents ----

    @contextmanager
    def stream_slot(self, user: str) -> Iterator[None]:
        """One of the user's (and the server's) open document streams, held from before the first read."""
        with self.state.streams.hold(user):
            yield

    @contextmanager
    def feeding(self, user: str, sid: str) -> Iterator[None]:
        """The session is fed by this stream only (Conflict for a second one) and stays where it is meanwhile."""
        with self.state.registry.feeding(user, check_session_id(sid)):
            yield

    def open_feed(
        self,
        user: str,
        sid: str,
        *,
        requested: dict | None = None,
        create_if_missing: bool = False,
        document_offset: int | None = None,
        is_active: Callable[[], bool] = lambda: True,
        time_left: Callable[[], float | None] = lambda: None,
    ) -> Future:
        """-> the DocumentFeed of a stream into the session (inside ``feeding``). ``requested``: step settings for
        this stream's chunks, or all settings of a session created because ``create_if_missing``;
        ``document_offset``: where the stream's bytes start in the session's unfinished document (Conflict
        otherwise, before anything is read: a resumed upload never repeats or skips bytes); ``is_active`` and
        ``time_left``: the client's (``DocumentFeed``)."""
        registry, requested = self.state.registry, requested or {}

        def build() -> DocumentFeed:
            try:
                session = registry.get(user, sid)
            except NotFound:
                if not create_if_missing:
                    raise
                session = registry.create(user, sid, requested)
            held = session.text_stream.bytes_received
            if document_offset is not None and document_offset != held:
                raise Conflict(
                    f"document_offset {document_offset} is not where session {sid!r}'s unfinished document ends "
                    f"({held} bytes): send the rest from there",
                    "document_offset",
                )
            step = stream_settings(session.config, requested)
            return DocumentFeed.for_server(
                self.state, session, user, step_settings=step, is_active=is_active, time_left=time_left
            )

        return self.state.scheduler.submit_next((user, sid), build)  # the client waits for it: next in line
