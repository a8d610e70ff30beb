"""`ttt chat`: talk to a session over the server's OpenAI-compatible HTTP API.

``ChatClient`` streams one answer from ``POST /v1/chat/completions`` (``stream: true``), parsing the SSE
``data:`` lines itself; ``run_chat`` is the REPL (and the ``--message`` / piped-stdin modes) on top of it.
A failed request raises :class:`ChatError`, printed as ``error: <status or kind>: <message>``.
"""

from __future__ import annotations

import contextlib
import json
import os
import ssl
import sys
from collections.abc import Iterator

import httpx

DEFAULT_HTTP = "http://127.0.0.1:8000"
# No read timeout worth the name: an answer can wait behind other sessions' work; Ctrl-C stops it.
TIMEOUT = httpx.Timeout(connect=10.0, read=600.0, write=60.0, pool=10.0)

COMMANDS = {"/exit", "/quit", "/reset", "/help"}
HELP = """\
Type a message and press Enter; the answer streams in. The whole conversation is sent each time.
  /reset   forget the conversation so far (the session keeps what it learned)
  /help    this text
  /exit    quit (also /quit or Ctrl-D)
Ctrl-C stops an answer and returns to the prompt. Start a message with // to send a leading /."""


class ChatError(Exception):
    """A failed request: ``status`` is the HTTP status (an int) or a kind of failure ("connection", ...)."""

    def __init__(self, status: int | str, message: str):
        super().__init__(status, message)
        self.status, self.message = status, message

    def __str__(self) -> str:
        return f"{self.status}: {self.message}" if self.message else str(self.status)


def _error_from_body(status: int | str, body: bytes | str, fallback: str) -> ChatError:
    """OpenAI's ``{"error": {"message", "type", ...}}`` if the body is that, else its text (or ``fallback``)."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        err = json.loads(text)["error"]
        message = err.get("message") or err.get("type") or fallback
    except (ValueError, KeyError, TypeError, AttributeError):
        message = " ".join(text.split())[:300] or fallback
    return ChatError(status, str(message))


def iter_sse_data(response: httpx.Response) -> Iterator[str]:
    """The payload of each ``data:`` line of a server-sent-events response (other lines are ignored)."""
    for line in response.iter_lines():
        if line.startswith("data:"):
            yield line[5:].removeprefix(" ")


class ChatClient:
    """``ChatClient("http://127.0.0.1:8000", api_key)``: streamed chat completions and the model list."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout: httpx.Timeout = TIMEOUT,
        tls_ca: str | os.PathLike | None = None,
    ):
        """``tls_ca``: a PEM file to trust for an ``https://`` server with its own authority (see ``TTTClient``)."""
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        verify = ssl.create_default_context(cafile=os.fspath(tls_ca)) if tls_ca is not None else True
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, verify=verify)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> ChatClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _transport_error(self, e: httpx.HTTPError) -> ChatError:
        kind = (
            "connection"
            if isinstance(e, httpx.ConnectError)
            else "timeout"
            if isinstance(e, httpx.TimeoutException)
            else "network"
        )
        return ChatError(kind, f"{self.base_url}: {e or type(e).__name__}")

    def base_model(self) -> str:
        """The base model's name: the entry of ``GET /v1/models`` without a parent."""
        try:
            r = self.http.get("/v1/models")
        except httpx.HTTPError as e:
            raise self._transport_error(e) from None
        if r.status_code != 200:
            raise _error_from_body(r.status_code, r.content, r.reason_phrase)
        try:
            return next(m["id"] for m in r.json()["data"] if m.get("parent") is None)
        except (ValueError, KeyError, TypeError, StopIteration):
            raise ChatError("protocol", "GET /v1/models listed no base model") from None

    def stream(self, model: str, messages: list[dict], **params) -> Iterator[str]:
        """The answer's text pieces as they arrive. Closing the generator (or leaving it early) closes the stream.

        ``params``: ``max_tokens``, ``temperature``, ``seed``, ... (None values are not sent).
        """
        body = {"model": model, "messages": messages, "stream": True}
        body.update({k: v for k, v in params.items() if v is not None})
        try:
            with self.http.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    raise _error_from_body(r.status_code, r.read(), r.reason_phrase)
                for data in iter_sse_data(r):
                    if data == "[DONE]":
                        return
                    try:
                        event = json.loads(data)
                    except ValueError:
                        raise ChatError("protocol", f"not JSON in the event stream: {data[:100]!r}") from None
                    if "error" in event:  # a failure after the 200
                        err = event["error"] or {}
                        raise _error_from_body(err.get("code") or err.get("type") or "error", data, "failed")
                    for choice in event.get("choices") or ():
                        piece = (choice.get("delta") or {}).get("content")
                        if piece:
                            yield piece
            raise ChatError("protocol", "the server closed the stream before [DONE]")
        except httpx.HTTPError as e:
            raise self._transport_error(e) from None


# ---- the REPL ------------------------------------------------------------------------------------


def _say(text: str, file=None) -> None:
    file = file or sys.stdout
    file.write(text)
    file.flush()


def _read_line(interactive: bool) -> str | None:
    """The next input line without its newline; None at end of input."""
    if interactive:
        try:
            return input("> ")
        except EOFError:
            _say("\n")
            return None
    line = sys.stdin.readline()
    return line.rstrip("\r\n") if line else None


class Chat:
    """One conversation: the history, the model to address, the sampling parameters."""

    def __init__(self, client: ChatClient, session: str | None, system: str | None, params: dict):
        self.client, self.session, self.system, self.params = client, session, system, params
        self.model = session  # the base model's name is looked up on first use
        self.history: list[dict] = []
        self.interrupted = False  # the last answer was stopped with Ctrl-C

    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def ask(self, text: str) -> bool:
        """Send ``text`` with the history, print the answer as it streams; True when it completed.

        An error is printed (``error: ...``) and leaves the history as it was; Ctrl-C stops the answer,
        keeping what was printed of it in the history.
        """
        pieces: list[str] = []
        stream = None
        self.interrupted = False
        try:
            if self.model is None:
                self.model = self.client.base_model()
            self.history.append({"role": "user", "content": text})
            stream = self.client.stream(self.model, self.messages(), **self.params)
            for piece in stream:
                pieces.append(piece)
                _say(piece)
        except ChatError as e:
            if pieces:
                _say("\n")
            if self.history and self.history[-1]["role"] == "user":
                self.history.pop()
            _say(f"error: {e}\n", sys.stderr)
            return False
        except KeyboardInterrupt:
            self.interrupted = True
            if stream is not None:
                stream.close()  # closes the HTTP response: the server stops decoding
            _say("\n")
            if pieces:
                self.history.append({"role": "assistant", "content": "".join(pieces)})
            elif self.history and self.history[-1]["role"] == "user":
                self.history.pop()
            _say("(stopped)\n", sys.stderr)
            return False
        finally:
            if stream is not None:
                stream.close()
        _say("\n")
        self.history.append({"role": "assistant", "content": "".join(pieces)})
        return True

    def repl(self, interactive: bool) -> int:
        """Read messages until /exit or end of input. Interactive: 0; piped: 1 if any message failed."""
        if interactive:
            target = f"session {self.session}" if self.session else "the base model (no session)"
            _say(f"chatting with {target} at {self.client.base_url}; /help for commands, Ctrl-D to quit\n", sys.stderr)
            with contextlib.suppress(ImportError):
                import readline  # noqa: F401  (line editing and history for input())
        failed = False
        while True:
            try:
                line = _read_line(interactive)
            except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh prompt (piped: stop)
                _say("\n")
                if not interactive:
                    raise
                continue
            if line is None:
                break
            command = line.strip()
            if not command:
                continue
            if command in ("/exit", "/quit"):
                break
            if command == "/reset":
                self.history.clear()
                if interactive:
                    _say("(conversation cleared)\n", sys.stderr)
                continue
            if command == "/help":
                _say(HELP + "\n", sys.stderr)
                continue
            if command.startswith("//"):
                line = line.lstrip()[1:]
            elif command.startswith("/") and " " not in command:
                _say(f"error: unknown command {command} (/help lists them; // sends a leading /)\n", sys.stderr)
                failed = True
                continue
            if not self.ask(line):
                failed = True
        return 1 if failed and not interactive else 0


def run_chat(args, environ) -> int:
    base_url = args.http or environ.get("TTT_HTTP") or DEFAULT_HTTP
    if "://" not in base_url:
        base_url = "http://" + base_url
    api_key = args.api_key or environ.get("TTT_API_KEY") or None
    params = {"max_tokens": args.max_tokens, "temperature": args.temperature, "seed": args.seed}
    tls_ca = args.tls_ca or environ.get("TTT_TLS_CA") or None
    with ChatClient(base_url, api_key, tls_ca=tls_ca) as client:
        chat = Chat(client, args.session, args.system, params)
        try:
            if args.message is not None:
                return 0 if chat.ask(args.message) else 130 if chat.interrupted else 1
            return chat.repl(interactive=sys.stdin.isatty())
        except KeyboardInterrupt:
            return 130
