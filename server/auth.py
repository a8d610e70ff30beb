"""Bearer keys -> users. Keys are stored as sha256 hex digests and compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from pathlib import Path

from server.errors import AuthError
from ttt.engine import check_session_id

OPEN_USER = "local"  # the single user of a server that runs without a keys file (loopback only)


def hash_key(key: str) -> str:
    # Keys are 256-bit random tokens (see new_key), so a plain digest is enough: no dictionary to attack.
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return "ttt-" + secrets.token_urlsafe(32)


class KeyRing:
    """Maps a presented bearer key to its user. ``None`` file: every caller is OPEN_USER."""

    def __init__(self, keys_file: Path | None):
        self.open = keys_file is None
        self._digests: list[tuple[str, str]] = []  # (sha256 hex, user)
        if keys_file is not None:
            data = json.loads(Path(keys_file).read_text())
            if not isinstance(data, dict):
                raise ValueError(f"{keys_file}: expected a JSON object {{user: [sha256 hex, ...]}}")
            for user, digests in data.items():
                check_session_id(user)  # user names become folder names, like session ids
                for d in [digests] if isinstance(digests, str) else digests:
                    self._digests.append((d.removeprefix("sha256:").lower(), user))

    def user_for(self, authorization: str | None) -> str:
        if self.open:
            return OPEN_USER
        if not authorization or not authorization.lower().startswith("bearer "):
            raise AuthError("missing bearer key: send 'authorization: Bearer <key>'")
        digest = hash_key(authorization[7:].strip())
        user = None
        for known, owner in self._digests:  # no early exit: time does not depend on which key matched
            if hmac.compare_digest(known, digest):
                user = owner
        if user is None:
            raise AuthError("unknown API key")
        return user
