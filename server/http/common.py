"""What every route of the HTTP door shares: the error shape, server-sent events, the request's caller and the
scheduler, and the middleware that counts requests."""

from __future__ import annotations

import json
import logging
import math

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from server.errors import INTERNAL, ShuttingDown, message_of, status_of
from ttt.engine import check_session_id

log = logging.getLogger("ttt.server.http")


def error_response(
    status: int, kind: str, message: str, code: str | None = None, param: str | None = None
) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


def refusal(e: Exception) -> JSONResponse:
    """The error response of an exception, in OpenAI's shape (an unexpected one: 500, its text not shown)."""
    status = status_of(e)
    return error_response(
        status.http, status.kind, message_of(e), code=getattr(e, "error_code", None), param=getattr(e, "param", None)
    )


def finite(value):
    """``value`` with NaN and infinities (a loss with nothing to average, a diverged chunk) as None: JSON has no NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def failure_event(request: Request, e: Exception) -> dict:
    """A failure after a stream's 200: said in the stream, logged and counted under its real status."""
    status = status_of(e)
    log.log(logging.ERROR if status is INTERNAL else logging.WARNING, "stream failed after its 200", exc_info=e)
    request.state.status_after_start = status.http
    return {"error": {"message": message_of(e), "type": status.kind, "code": status.http}}


def wants_events(request: Request) -> bool:
    return "text/event-stream" in request.headers.get("accept", "")


# ---- the caller and the device ----


def server_state(request: Request):
    """The running ``server.main.ServerState`` (engine, registry, scheduler, settings, keyring, metrics)."""
    return request.app.state.server


def ready(request: Request):
    """The server state, once the server accepts work (503 before and after)."""
    state = server_state(request)
    if state.phase != "serving":
        raise ShuttingDown("the server is starting" if state.phase == "loading" else "the server is shutting down")
    return state


def user_of(request: Request) -> str:
    return request.state.user  # the Guard checked the key before the body was read


def caller(request: Request, session_id: str) -> tuple:
    """(server state, user, session id) of a request on one session, once the server is ready."""
    return ready(request), user_of(request), check_session_id(session_id)


class CountRequests:
    """ASGI middleware: one metrics count per request, by route and status (streaming-safe).

    An unexpected exception becomes a logged 500 in the error shape here, rather than in Starlette's
    outermost handler, which re-raises it to the server: uvicorn would log it again and drop the connection.
    A client that goes away mid-request (e.g. mid-upload) is counted as 499 and not logged as an error.
    """

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]
        started = [False]

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0], started[0] = message["status"], True
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except ClientDisconnect:
            if not started[0]:
                status[0] = 499
        except Exception:
            log.exception("internal error in %s %s", scope["method"], scope["path"])
            if started[0]:
                raise
            status[0] = 500
            await error_response(500, "server_error", "internal error")(scope, receive, send)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            # a stream that failed after its 200 counts as what it failed with
            final = scope.get("state", {}).get("status_after_start", status[0])
            self.metrics.request("http", f"{scope['method']} {route}", str(final))
