"""One writer per session: a lease with an owner, an expiry and a fencing number, in the session's folder, and
the fenced ``LATEST`` pointer that checkpoint writes move.

    <session>/LEASE    {"owner": "replica-a", "fence": 7, "expires": 1764561234.5, "address": "..."}
    <session>/LATEST   "ckpt-000012 <sha256 of its manifest.json> 7"

``acquire`` takes the lease when it is free, expired or already the caller's, always with a new fencing number
(the last one + 1); ``take_lease`` also stamps ``LATEST`` with it at once. ``store.save_session(...,
fence=n)`` moves ``LATEST`` only while ``LATEST``'s fence is not above ``n``, in the same compare-and-swap: a
holder that lost its lease (paused past its expiry, partitioned, presumed dead) can never replace a newer
checkpoint, whatever the clocks say. Expiries are wall-clock times compared across machines: clocks skewed by
more than a lease's length let two owners believe they hold it, but the fence still lets only the newer one write.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

from .storage import Folder

LATEST = "LATEST"  # names a session folder's newest complete checkpoint, its manifest's sha256 (and fence)


@dataclass(frozen=True)
class Pointer:
    """What ``LATEST`` says: ``ckpt-000007 <sha256 of its manifest.json>``, then the fence when one was given."""

    checkpoint: str
    manifest_sha256: str
    fence: int = 0

    @classmethod
    def parse(cls, data: bytes | None) -> Pointer | None:
        parts = data.decode(errors="replace").split() if data else []
        if 2 <= len(parts) <= 3 and parts[0].startswith("ckpt-") and parts[-1].isdigit() == (len(parts) == 3):
            return cls(parts[0], parts[1], int(parts[2]) if len(parts) == 3 else 0)
        return None

    def encode(self) -> bytes:
        return f"{self.checkpoint} {self.manifest_sha256}{f' {self.fence}' if self.fence else ''}\n".encode()


LEASE = "LEASE"
SWAP_ATTEMPTS = 16  # compare-and-swap retries while other writers race for the same object


class LeaseHeld(Exception):
    """Another owner holds the session's lease until ``expires`` (unix seconds); ``address``: where it said it
    serves the session (for a router that sends the request there)."""

    def __init__(self, message: str, owner: str, expires: float, address: str = ""):
        super().__init__(message)
        self.owner, self.expires, self.address = owner, expires, address


class LeaseLost(Exception):
    """This owner's lease was taken over: a newer fencing number owns the session now; nothing was written."""


@dataclass(frozen=True)
class Lease:
    owner: str
    fence: int
    expires: float
    address: str = ""  # where the owner serves the session, as it chose to say it (ttt serve --ray: its doors)


def read_lease(folder: Folder) -> tuple[Lease | None, object]:
    data, version = folder.read_versioned(LEASE)
    return (Lease(**json.loads(data)) if data else None), version


def _refuse_unless_free(current: Lease | None, owner: str, now: float) -> None:
    if current is not None and current.owner != owner and now < current.expires:
        raise LeaseHeld(
            f"session is open on {current.owner} for up to {current.expires - now:.0f} s more: retry then",
            current.owner,
            current.expires,
            current.address,
        )


def check_free(folder: Folder, owner: str) -> None:
    """LeaseHeld if another owner holds the session's lease now (one it created and has not saved yet included)."""
    _refuse_unless_free(read_lease(folder)[0], owner, time.time())


def acquire(folder: Folder, owner: str, seconds: float, address: str = "") -> Lease:
    """Take the session's lease for ``seconds`` with a new fencing number; LeaseHeld if another owner holds it."""
    for _ in range(SWAP_ATTEMPTS):
        current, version = read_lease(folder)
        now = time.time()
        _refuse_unless_free(current, owner, now)
        lease = Lease(owner, (current.fence if current else 0) + 1, now + seconds, address)
        if folder.swap(LEASE, json.dumps(asdict(lease)).encode(), version):
            return lease
    raise LeaseHeld("session's lease is contended: retry", "", time.time())


def renew(folder: Folder, lease: Lease, seconds: float) -> Lease:
    """Extend a held lease (same fence); LeaseLost when another owner took it over meanwhile."""
    for _ in range(SWAP_ATTEMPTS):
        current, version = read_lease(folder)
        if current is None or current.fence != lease.fence or current.owner != lease.owner:
            raise LeaseLost(f"{folder.name}: lease {lease.fence} taken over (now {current})")
        renewed = dataclasses.replace(lease, expires=time.time() + seconds)
        if folder.swap(LEASE, json.dumps(asdict(renewed)).encode(), version):
            return renewed
    raise LeaseLost(f"{folder.name}: could not renew lease {lease.fence}")


def release(folder: Folder, lease: Lease) -> None:
    """Give the lease up at once (it stays in the folder, expired, so that fencing numbers keep growing); nothing
    happens if it was taken over already."""
    for _ in range(SWAP_ATTEMPTS):
        current, version = read_lease(folder)
        if current is None or current.fence != lease.fence:
            return
        expired = dataclasses.replace(lease, expires=0.0)
        if folder.swap(LEASE, json.dumps(asdict(expired)).encode(), version):
            return


def swap_latest(root: Folder, change: Callable[[Pointer | None], Pointer | None]) -> None:
    """Replace ``LATEST`` by ``change(current)`` (None: leave it) in a compare-and-swap, again while others race."""
    for _ in range(SWAP_ATTEMPTS):
        data, version = root.read_versioned(LATEST)
        new = change(Pointer.parse(data))
        if new is None or root.swap(LATEST, new.encode(), version):
            return
    raise OSError(f"{root}/{LATEST}: other writers kept moving it; not moved")


def fence_latest(root: Folder, fence: int) -> None:
    """Stamp ``LATEST`` with ``fence`` (when above its own): from now on a save under an older fence is refused."""
    swap_latest(root, lambda p: replace(p, fence=fence) if p is not None and p.fence < fence else None)


def take_lease(folder: Folder, owner: str, seconds: float, address: str = "") -> Lease:
    """The session's lease for ``owner`` with a new fencing number, ``LATEST`` stamped with it."""
    lease = acquire(folder, owner, seconds, address)
    try:
        fence_latest(folder, lease.fence)
    except BaseException:
        release(folder, lease)
        raise
    return lease
