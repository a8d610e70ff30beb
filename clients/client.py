"""A small Python client for the TTT gRPC API (``server/proto/ttt/v1/ttt.proto``).

```python
from clients.client import TTTClient, TTTError

with TTTClient("127.0.0.1:50051", api_key="ttt-...") as client:
    client.create_session("notes", {"ingest": {"chunk_tokens": 256}, "fast": {"rank": 8}})
    with open("notes.txt", "rb") as f:
        for event in client.ingest("notes", iter(lambda: f.read(1 << 16), b"")):
            if event["type"] == "chunk":
                print(event["index"], event["loss_before"])
            else:
                print("done:", event["tokens_ingested"], "tokens")
    print(client.get_session("notes")["tokens_ingested"])
```

Every result is a plain dict (or a list of them) whose keys are the proto field names; every call sends
the bearer key as ``authorization: Bearer <key>`` metadata. A failed call raises :class:`TTTError`
(a ``grpc.RpcError``) carrying the status code and the server's message.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from server.proto.ttt.v1 import ttt_pb2 as pb
from server.proto.ttt.v1 import ttt_pb2_grpc as pb_grpc

DEFAULT_SERVER = "127.0.0.1:50051"

__all__ = ["DEFAULT_SERVER", "TTTClient", "TTTError", "settings_message"]


class TTTError(grpc.RpcError):
    """A failed call: ``code`` is the ``grpc.StatusCode`` (``code.name`` e.g. "NOT_FOUND"), ``message`` the
    server's text.

    It is a ``grpc.RpcError``, so ``except grpc.RpcError`` still catches it; the original error is ``__cause__``.
    """

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(code, message)
        self.code = code
        self.message = message

    @property
    def code_name(self) -> str:
        return self.code.name if isinstance(self.code, grpc.StatusCode) else str(self.code)

    def __str__(self) -> str:
        return f"{self.code_name}: {self.message}" if self.message else self.code_name

    @classmethod
    def from_rpc_error(cls, e: grpc.RpcError) -> TTTError:
        code = e.code() if callable(getattr(e, "code", None)) else grpc.StatusCode.UNKNOWN
        details = e.details() if callable(getattr(e, "details", None)) else str(e)
        return cls(code or grpc.StatusCode.UNKNOWN, details or "")


def settings_message(settings: Mapping[str, Any] | pb.SessionSettings | None) -> pb.SessionSettings:
    """A partial settings dict such as ``{"ingest": {"chunk_tokens": 64}, "fast": {"rank": 8}}`` as the proto.

    Only the fields given are set (the server fills the rest from its defaults); an unknown section or
    field, or a value of the wrong type, raises ``ValueError``.
    """
    if settings is None:
        return pb.SessionSettings()
    if isinstance(settings, pb.SessionSettings):
        return settings
    if not isinstance(settings, Mapping):
        raise ValueError(
            f"settings must be a dict like {{'ingest': {{'chunk_tokens': 64}}}}, not {type(settings).__name__}"
        )
    try:
        return json_format.ParseDict(dict(settings), pb.SessionSettings())
    except json_format.ParseError as e:
        raise ValueError(f"invalid session settings: {e}") from None


def message_dict(msg) -> dict:
    """Every field of a proto message (defaults included) under its proto name."""
    out = {}
    for field in msg.DESCRIPTOR.fields:
        value = getattr(msg, field.name)
        if field.is_repeated:
            value = list(value)
        out[field.name] = value
    return out


def _piece_request(piece: str | bytes | bytearray | memoryview | Sequence[int]) -> pb.IngestRequest | None:
    if isinstance(piece, str):
        return pb.IngestRequest(text=piece) if piece else None
    if isinstance(piece, (bytes, bytearray, memoryview)):
        return pb.IngestRequest(utf8=bytes(piece)) if len(piece) else None
    if isinstance(piece, Sequence) and all(isinstance(i, int) for i in piece):
        return pb.IngestRequest(tokens=pb.TokenIds(ids=list(piece))) if len(piece) else None
    raise TypeError(f"an ingest piece must be str, bytes or a list of token ids, not {type(piece).__name__}")


class TTTClient:
    """A connection to a TTT server. Close it with :meth:`close` or use it as a context manager.

    ``server`` is ``host:port``; ``api_key`` (optional: an open loopback server needs none) is sent as
    ``authorization: Bearer <key>`` on every call; ``timeout`` (seconds, optional) bounds each unary call;
    ``tls_ca``: a PEM file of the certificate authority (or the self-signed certificate) of a server that serves
    TLS (``ttt serve --tls-cert``); ``tls=True`` without it trusts the system's authorities.
    """

    def __init__(
        self,
        server: str = DEFAULT_SERVER,
        api_key: str | None = None,
        *,
        timeout: float | None = None,
        options: Sequence[tuple[str, Any]] = (),
        tls_ca: str | os.PathLike | None = None,
        tls: bool = False,
    ):
        self.server = server
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        if tls or tls_ca is not None:
            roots = Path(tls_ca).read_bytes() if tls_ca is not None else None
            self._channel = grpc.secure_channel(server, grpc.ssl_channel_credentials(roots), options=list(options))
        else:
            self._channel = grpc.insecure_channel(server, options=list(options))
        self._stub = pb_grpc.SessionsStub(self._channel)

    # ---- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> TTTClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- sessions --------------------------------------------------------------------------------

    def _call(self, method: str, request):
        try:
            return getattr(self._stub, method)(request, metadata=self._metadata, timeout=self.timeout)
        except grpc.RpcError as e:
            raise TTTError.from_rpc_error(e) from e

    def create_session(self, session_id: str | None = None, settings: Mapping[str, Any] | None = None) -> dict:
        """Create a session (``session_id`` None: the server picks one) and return its info dict."""
        request = pb.CreateSessionRequest(session_id=session_id or "", settings=settings_message(settings))
        return message_dict(self._call("CreateSession", request))

    def import_adapter(
        self, folder: str | os.PathLike, session_id: str | None = None, settings: Mapping[str, Any] | None = None
    ) -> dict:
        """A new session from a peft LoRA adapter folder (adapter_config.json + adapter_model.safetensors).

        The adapter's layers, projections and rank become the session's fast weights; ``settings`` may
        set only ingest settings. Returns the new session's info.
        """
        folder = Path(folder)
        try:
            adapter = pb.PeftAdapter(
                adapter_config=(folder / "adapter_config.json").read_bytes(),
                adapter_model=(folder / "adapter_model.safetensors").read_bytes(),
            )
        except OSError as e:
            raise ValueError(f"{folder}: not a peft adapter folder ({e.strerror}: {e.filename})") from None
        request = pb.CreateSessionRequest(
            session_id=session_id or "", settings=settings_message(settings), adapter=adapter
        )
        return message_dict(self._call("CreateSession", request))

    def get_session(self, session_id: str) -> dict:
        """The session's info: session_id, tokens_ingested, pending_tokens, chunks, last_loss_before, residency, ..."""
        return message_dict(self._call("GetSession", pb.SessionRef(session_id=session_id)))

    def list_sessions(self) -> list[dict]:
        """Info dicts of the caller's sessions (live and saved), sorted by id."""
        return [message_dict(s) for s in self._call("ListSessions", pb.ListSessionsRequest()).sessions]

    def delete_session(self, session_id: str) -> None:
        """Forget the session, in memory and on disk."""
        self._call("DeleteSession", pb.SessionRef(session_id=session_id))

    def save_session(self, session_id: str) -> dict:
        """Checkpoint the session now; returns its info."""
        return message_dict(self._call("SaveSession", pb.SessionRef(session_id=session_id)))

    def reset_session(self, session_id: str) -> dict:
        """Forget everything the session learned (fresh fast weights, nothing pending); returns its info."""
        return message_dict(self._call("ResetSession", pb.SessionRef(session_id=session_id)))

    # ---- ingest ----------------------------------------------------------------------------------

    def ingest(
        self,
        session_id: str,
        pieces: Iterable[str | bytes],
        *,
        create_if_missing: bool = True,
        end_of_document: bool = True,
        settings: Mapping[str, Any] | None = None,
    ) -> Iterator[dict]:
        """Stream a document into a session; yields a dict per trained chunk, then a summary dict.

        ``pieces``: str, or bytes that may end inside a UTF-8 character, or lists of token ids; any sizes
        (empty pieces are skipped). It is consumed lazily while the server trains, so a generator reading
        a file works. ``settings`` apply only when the session is created here. ``end_of_document``
        False keeps the last partial chunk pending for a later stream.

        Chunk dicts have ``"type": "chunk"`` and the ``ChunkProgress`` fields (index, tokens, loss_before,
        loss_after, seconds, tokens_per_second, tokens_ingested, pending_tokens, rolled_back, error); the
        last dict has ``"type": "summary"`` and the ``IngestSummary`` fields (tokens_received,
        chunks_trained, tokens_ingested, pending_tokens, mean_loss_before, seconds). Closing the iterator
        early cancels the stream: chunks already trained stay learned, the rest stays pending.
        """
        start = pb.IngestStart(
            session_id=session_id,
            create_if_missing=create_if_missing,
            settings=settings_message(settings),
            end_of_document=end_of_document,
        )
        failure: list[BaseException] = []  # an error raised by `pieces` (it runs on a gRPC thread)

        def requests():
            yield pb.IngestRequest(start=start)
            it = iter(pieces)
            while True:
                try:  # only the caller's iterator and piece checks: not the GeneratorExit of a closed stream
                    piece = next(it)
                    request = _piece_request(piece)
                except StopIteration:
                    return
                except Exception as e:
                    failure.append(e)
                    raise
                if request is not None:
                    yield request

        call = self._stub.Ingest(requests(), metadata=self._metadata)
        try:
            for response in call:
                kind = response.WhichOneof("message")
                if kind is None:
                    continue
                yield {"type": kind, **message_dict(getattr(response, kind))}
        except grpc.RpcError as e:
            if failure:
                raise failure[0] from None
            raise TTTError.from_rpc_error(e) from e
        finally:
            call.cancel()  # no-op when finished; stops the stream when the caller stops early
