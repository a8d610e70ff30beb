"""What the `ttt` client commands do (`ingest`, `sessions ...`, `chat`); ``clients/cli.py`` parses their flags.

Each handler takes the parsed arguments and returns the exit status; a failed call raises ``TTTError`` (the
server's code and message) or ``CLIError`` (a local problem), which ``cli.run_client_command`` prints.
"""

from __future__ import annotations

import datetime
import math
import os
import sys


class CLIError(Exception):
    """A local problem (bad file, bad flag): printed as ``error: <message>``."""


def _client(args):
    from clients.client import DEFAULT_SERVER, TTTClient

    server = args.server or os.environ.get("TTT_SERVER") or DEFAULT_SERVER
    api_key = args.api_key or os.environ.get("TTT_API_KEY") or None
    return TTTClient(server, api_key, tls_ca=args.tls_ca or os.environ.get("TTT_TLS_CA") or None)


def _fmt_loss(x: float, chunks: int = 1) -> str:
    return "-" if not chunks or x is None or not math.isfinite(x) else f"{x:.4f}"


def _fmt_time(t: float) -> str:
    if not t:
        return "-"
    return datetime.datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _read_pieces(stream, piece_bytes: int, counter: list[int]):
    """Raw byte pieces of ``stream`` (pieces may end inside a UTF-8 character: the server joins them)."""
    while True:
        piece = stream.read(piece_bytes)
        if not piece:
            return
        counter[0] += len(piece)
        yield piece


def _baseline(client, args, settings: dict | None) -> tuple[int, dict | None]:
    """The session's tokens before this stream (0 if it does not exist yet), for the progress estimate; and the
    settings still to send (none for a session that exists: they apply to new ones only)."""
    from clients.client import TTTError

    try:
        info = client.get_session(args.session)
    except TTTError as e:
        if e.code_name != "NOT_FOUND":
            raise
        return 0, settings
    if settings:
        print(
            f"note: session {args.session} exists; --chunk-tokens and --memory apply only to new sessions",
            file=sys.stderr,
        )
    return info["tokens_ingested"] + info["pending_tokens"], None


def _open_input(path: str):
    """(binary stream, size in bytes or None, display name) of a file, or of standard input for '-'."""
    if path == "-":
        return sys.stdin.buffer, None, "<stdin>"
    try:
        stream = open(path, "rb")  # noqa: SIM115  (closed by the caller once streamed)
    except OSError as e:
        raise CLIError(f"{path}: {e.strerror or e}") from None
    return stream, os.fstat(stream.fileno()).st_size, os.path.basename(path)


def _show_chunk(bar, event: dict, chunks: int, tokenized: int, size: int | None, sent: int) -> None:
    if size and sent and tokenized > 0:
        # Tokens per byte so far, times the file's size: the tokens this file will add
        # (bytes sent may run ahead of the server's reading: an estimate, refined every chunk).
        bar.total = max(round(tokenized * size / sent), bar.n + event["tokens"])
    bar.update(event["tokens"])
    postfix = {"chunks": chunks, "loss": _fmt_loss(event["loss_before"])}
    if event["tokens_per_second"]:
        postfix["chunk_tok/s"] = f"{event['tokens_per_second']:.0f}"
    if event["rolled_back"]:
        postfix["rolled_back"] = "yes"
    bar.set_postfix(postfix, refresh=True)


def _ingest_file(client, args, path: str, settings: dict | None) -> dict:
    from tqdm import tqdm

    baseline, settings = _baseline(client, args, settings)
    stream, size, name = _open_input(path)
    sent = [0]  # bytes handed to gRPC so far
    bar = tqdm(
        total=None, desc=name, unit="tok", unit_scale=True, file=sys.stderr, disable=args.quiet, dynamic_ncols=True
    )
    summary, chunks = None, 0
    try:
        pieces = _read_pieces(stream, args.piece_bytes, sent)
        end = not args.keep_pending
        for event in client.ingest(
            args.session, pieces, create_if_missing=True, end_of_document=end, settings=settings
        ):
            if event["type"] == "chunk":
                chunks += 1
                tokenized = event["tokens_ingested"] + event["pending_tokens"] - baseline
                _show_chunk(bar, event, chunks, tokenized, size, sent[0])
            elif event["type"] == "summary":
                summary = event
        if summary is not None and bar.total is not None:
            bar.total = bar.n
            bar.refresh()
    finally:
        bar.close()
        if stream is not sys.stdin.buffer:
            stream.close()
    if summary is None:
        raise CLIError(f"{name}: the server closed the stream without a summary")
    rate = summary["tokens_received"] / summary["seconds"] if summary["seconds"] > 0 else 0.0
    print(
        f"{name}: {summary['tokens_received']} tokens, {summary['chunks_trained']} chunks, "
        f"mean loss {_fmt_loss(summary['mean_loss_before'], summary['chunks_trained'])}, "
        f"{summary['seconds']:.1f} s ({rate:.0f} tokens/s); session {summary['session_id']}: "
        f"{summary['tokens_ingested']} tokens ingested, {summary['pending_tokens']} pending",
        flush=True,
    )
    return summary


def run_ingest(args) -> int:
    settings = {"ingest": {"chunk_tokens": args.chunk_tokens}} if args.chunk_tokens else {}
    if args.memory:
        settings["memory"] = args.memory
    with _client(args) as client:
        for path in args.files:
            _ingest_file(client, args, path, settings)
    return 0


def run_sessions_list(args) -> int:
    with _client(args) as client:
        sessions = client.list_sessions()
    rows = [("ID", "TOKENS", "CHUNKS", "LAST LOSS", "RESIDENCY")]
    for s in sessions:
        rows.append(
            (
                s["session_id"],
                str(s["tokens_ingested"]),
                str(s["chunks"]),
                _fmt_loss(s["last_loss_before"], s["chunks"]),
                s["residency"],
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:4], widths[1:4], strict=True)] + [r[4]]
        print("  ".join(cells).rstrip())
    if not sessions:
        print("(no sessions)", file=sys.stderr)
    return 0


def _print_info(s: dict) -> None:
    fields = [
        ("session_id", s["session_id"]),
        ("tokens_ingested", s["tokens_ingested"]),
        ("pending_tokens", s["pending_tokens"]),
        ("chunks", s["chunks"]),
        ("rolled_back_chunks", s["rolled_back_chunks"]),
        ("last_loss_before", _fmt_loss(s["last_loss_before"], s["chunks"])),
        ("last_loss_after", _fmt_loss(s["last_loss_after"], s["chunks"])),
        ("bytes", f"{s['bytes']} ({_fmt_bytes(s['bytes'])})"),
        ("created_at", _fmt_time(s["created_at"])),
        ("updated_at", _fmt_time(s["updated_at"])),
        ("residency", s["residency"]),
        ("resident_bytes", _fmt_bytes(s["resident_bytes"])),
        ("disk_bytes", _fmt_bytes(s["disk_bytes"])),
        (
            "memory",
            f"{s['memory']}: {s['memory_spans']} surprising spans kept, {s['exact_tokens_read']} of their tokens "
            "read by every answer",
        ),
    ]
    if s["restored_from"]:  # the newest checkpoint was damaged: say which one was loaded, and why
        fields.append(("restored_from", s["restored_from"]))
        fields += [("warning", w) for w in s["warnings"]]
    width = max(len(k) for k, _ in fields)
    for k, v in fields:
        print(f"{k + ':':<{width + 1}} {v}")


def run_sessions_show(args) -> int:
    with _client(args) as client:
        _print_info(client.get_session(args.session_id))
    return 0


def run_sessions_rm(args) -> int:
    with _client(args) as client:
        client.delete_session(args.session_id)
    print(f"deleted {args.session_id}")
    return 0


def run_sessions_save(args) -> int:
    with _client(args) as client:
        info = client.save_session(args.session_id)
    print(f"saved {info['session_id']}: {info['tokens_ingested']} tokens ingested, {info['chunks']} chunks")
    return 0


def run_sessions_import(args) -> int:
    with _client(args) as client:
        try:
            info = client.import_adapter(args.folder, args.session)
        except ValueError as e:  # not an adapter folder (the server's refusals are TTTErrors)
            raise CLIError(str(e)) from None
    print(f"imported {args.folder} as session {info['session_id']} ({_fmt_bytes(info['bytes'])} of fast weights)")
    return 0


def run_sessions_reset(args) -> int:
    with _client(args) as client:
        info = client.reset_session(args.session_id)
    print(f"reset {info['session_id']}: {info['tokens_ingested']} tokens ingested")
    return 0


def run_chat(args) -> int:
    from clients.chat import run_chat as chat

    return chat(args, os.environ)
