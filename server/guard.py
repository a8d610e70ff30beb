"""The HTTP door's guard (ASGI middleware): what is checked before any route reads a byte of the body.

1. Open mode (no keys, loopback only): the request must come from this machine's own programs. A web page the
   local user opens can POST to ``127.0.0.1`` (CSRF) and a DNS name can be rebound to it; browsers then send a
   foreign ``Origin`` or ``Host``, which are refused (403).
2. The bearer key (401), for every route but the probes, the console's static files (the page asks for a key
   itself) and ``/metrics`` and the API pages unless ``private_pages``. The caller's user goes into
   ``request.state.user`` for the routes.
3. The body size (413): ``Content-Length`` over ``max_body`` is refused at once; a body sent without one is
   read in here up to ``max_body`` (and refused past it), then handed to the route. Document uploads are exempt:
   they are read piece by piece and bounded by the per-document token limit instead.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from starlette.datastructures import Headers

from server.auth import AuthError, KeyRing
from server.console import is_console_path
from server.errors import Forbidden, TooLarge

PROBES = frozenset({"/healthz", "/readyz"})
PAGES = frozenset({"/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def _host_name(netloc: str) -> str:
    """``"[::1]:8000"`` -> ``"::1"``, ``"LocalHost:80"`` -> ``"localhost"``; unparseable -> ``""``."""
    try:
        return (urlsplit(f"//{netloc}").hostname or "").lower()
    except ValueError:
        return ""


def check_local(headers: Headers) -> None:
    host, origin = headers.get("host", ""), headers.get("origin")
    if _host_name(host) not in LOOPBACK_NAMES:
        raise Forbidden(f"Host {host!r} is not this machine: an open (keyless) server answers loopback names only")
    if origin is not None and (origin == "null" or _host_name(urlsplit(origin).netloc) not in LOOPBACK_NAMES):
        raise Forbidden(f"requests from web pages of {origin!r} are refused by an open (keyless) server")


async def read_limited(receive: Callable[[], Awaitable[dict]], limit: int) -> Callable[[], Awaitable[dict]]:
    """A body sent without ``Content-Length``, read in (at most ``limit`` bytes, else TooLarge) and replayed."""
    body, more = bytearray(), True
    while more:
        message = await receive()
        if message["type"] != "http.request":  # the client went away: let the route see it
            return _replay([message], receive)
        body += message.get("body", b"")
        more = message.get("more_body", False)
        if len(body) > limit:
            raise TooLarge(f"the request body is over the limit of {limit} bytes")
    return _replay([{"type": "http.request", "body": bytes(body), "more_body": False}], receive)


def _replay(messages: list[dict], receive: Callable[[], Awaitable[dict]]) -> Callable[[], Awaitable[dict]]:
    async def replayed() -> dict:
        return messages.pop(0) if messages else await receive()

    return replayed


class Guard:
    def __init__(self, app, keyring: KeyRing, max_body: int, private_pages: bool, refuse):
        """``refuse(error) -> ASGI response`` in the door's error shape."""
        self.app, self.keyring, self.max_body, self.private_pages, self.refuse = (
            app,
            keyring,
            max_body,
            private_pages,
            refuse,
        )

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers, path = Headers(scope=scope), scope["path"]
        try:
            if self.keyring.open:
                check_local(headers)
            public = path in PROBES or is_console_path(path) or (path in PAGES and not self.private_pages)
            if not public:
                scope.setdefault("state", {})["user"] = self.keyring.user_for(headers.get("authorization"))
            if not path.endswith("/documents"):
                length = headers.get("content-length")
                if length is None or "transfer-encoding" in headers:  # chunked decides the length: count it
                    receive = await read_limited(receive, self.max_body)
                elif int(length) > self.max_body:  # the HTTP parser let through digits only
                    raise TooLarge(f"the request body is over the limit of {self.max_body} bytes")
        except (AuthError, Forbidden, TooLarge) as e:
            return await self.refuse(e)(scope, receive, send)
        await self.app(scope, receive, send)
