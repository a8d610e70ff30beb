"""The leases of the sessions a registry holds (``ttt.lease``): one writer per session among servers sharing a store.

A session in memory holds its lease: taken when it is created or loaded, renewed at half its time by the autosave
loop, checked before each chunk a document stream trains, released when the session leaves memory. A lease that
was taken over, or that expired while the store did not answer, means another server may own the session now: it
is dropped from memory unsaved, and a stream feeding it stops (LeaseLost: what it sent since the last checkpoint
is not kept; resume from the session's ``document_bytes``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from ttt import Session
from ttt.lease import Lease, LeaseLost, release, renew, take_lease
from ttt.storage import Folder

log = logging.getLogger(__name__)


class Leasing:
    """The lease side of ``server.registry.SessionRegistry`` (its ``_live`` entries each hold a ``lease``)."""

    def _take_lease(self, folder: Folder) -> Lease:
        """The session's lease for this server (LeaseHeld: another server holds it)."""
        return take_lease(folder, self.owner, self.lease_seconds, self.address)

    @contextmanager
    def _leased(self, folder: Folder) -> Iterator[Lease]:
        """The session's lease, released again if what the block does fails."""
        lease = self._take_lease(folder)
        try:
            yield lease
        except BaseException:
            release(folder, lease)
            raise

    def _still_held(self, key, entry) -> bool:
        """Whether ``entry`` (in memory) still holds its lease: renewed first when it has expired (the store may
        have been away); False, and the session dropped, when another server took it over."""
        if time.time() < entry.lease.expires:
            return True
        with self._leases:
            if self._live.get(key) is not entry:
                return False
            try:
                entry.lease = renew(self.folder(*key), entry.lease, self.lease_seconds)
            except LeaseLost:
                self._forget(key, entry)
                return False
        return True

    def check_held(self, user: str, session_id: str, session: Session) -> None:
        """LeaseLost unless ``session`` is still this server's (before a document stream trains its next chunk)."""
        key = (user, session_id)
        with self._lock:
            entry = self._live.get(key)
        if entry is None or entry.session is not session or not self._still_held(key, entry):
            raise LeaseLost(
                f"session {session_id!r} was taken over by another server: what this stream sent since its last "
                "checkpoint is not kept; resume from its document_bytes"
            )

    def _forget(self, key, entry) -> None:
        """Drop a session whose lease was taken over, unsaved: another server owns it now."""
        log.warning("session %s/%s: its lease was taken over; dropped from memory unsaved", *key)
        with self._lock:
            if self._live.get(key) is entry:
                del self._live[key]

    def renew_leases(self) -> None:
        """Renew the leases of the sessions in memory past half their time. One taken over meanwhile, or expired
        while the store does not answer, is dropped (its saves would be refused). Any thread."""
        with self._lock:
            held = list(self._live.items())
        for key, entry in held:
            with self._leases:  # not while _drop releases it: a renewed released lease would hold it on
                if self._live.get(key) is not entry or entry.lease.expires - time.time() > self.lease_seconds / 2:
                    continue
                try:
                    entry.lease = renew(self.folder(*key), entry.lease, self.lease_seconds)
                except LeaseLost:
                    self._forget(key, entry)
                except Exception:
                    log.warning("session %s/%s: lease not renewed", *key, exc_info=True)
                    if time.time() >= entry.lease.expires:
                        self._forget(key, entry)

    def release_all(self) -> None:
        """Give up every lease held (at shutdown, after the last saves): other servers may take the sessions now."""
        with self._leases:
            with self._lock:
                held = list(self._live.items())
                self._live.clear()
            for key, entry in held:
                release(self.folder(*key), entry.lease)
