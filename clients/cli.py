"""The `ttt` command: `ttt serve`, a client for a running server (`ingest`, `sessions`, `chat`), `keys`, and benchmarks.

Client commands talk gRPC to ``--server`` (default ``$TTT_SERVER`` or 127.0.0.1:50051) with the bearer key
``--api-key`` (default ``$TTT_API_KEY``). A failed call prints ``error: <CODE>: <message>`` and exits 1.
``ttt chat`` talks HTTP instead (``--http``, default ``$TTT_HTTP`` or http://127.0.0.1:8000; see clients/chat.py)
and prints ``error: <HTTP status or kind>: <message>``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path
from typing import get_args

from clients.commands import (
    CLIError,
    run_chat,
    run_ingest,
    run_sessions_import,
    run_sessions_list,
    run_sessions_reset,
    run_sessions_rm,
    run_sessions_save,
    run_sessions_show,
)

DEFAULT_PIECE_BYTES = 64 << 10


def add_serve(sub) -> None:
    from server.settings import DtypeName

    p = sub.add_parser("serve", help="run the gRPC + HTTP server (flags override TTT_* environment variables)")
    p.add_argument("--model", help="local Hugging Face model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", help="cuda, cpu, ... (default: CUDA when available)")
    p.add_argument(
        "--dtype",
        choices=get_args(DtypeName),
        help="the model's dtype (default: bfloat16 on CUDA, float32 on CPU)",
    )
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--grpc-port", type=int, help="default 50051")
    p.add_argument("--http-port", type=int, help="default 8000")
    p.add_argument("--data-dir", help="where sessions are saved (default ~/.local/share/ttt)")
    p.add_argument(
        "--store", metavar="URL", help="session store servers share: a folder or s3://bucket/prefix (any fsspec URL)"
    )
    p.add_argument("--replica-id", help="this server's name in session leases (each server sharing a store its own)")
    p.add_argument(
        "--api-keys-file", help="JSON {user: [sha256 of key, ...]}; without it the server is open, loopback only"
    )
    p.add_argument("--tls-cert", metavar="PEM", help="serve TLS on both doors with this certificate (with --tls-key)")
    p.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    ray = p.add_argument_group("Ray Serve (pip install .[ray]; docs/scale-out.md)")
    ray.add_argument("--ray", action="store_true", help="serve through a Ray Serve cluster of engine replicas")
    ray.add_argument("--ray-address", metavar="ADDR", help="the cluster to join (default: a local one)")
    ray.add_argument("--replicas", type=_positive, default=2, help="engine replicas (default 2)")
    ray.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs per replica (1 on GPU hosts; default 0)")


RAY_FLAGS = ("ray", "ray_address", "replicas", "replica_gpus")


def run_serve(args) -> None:
    from server.settings import Settings

    flags = {k: v for k, v in vars(args).items() if k not in ("command", "handler", *RAY_FLAGS) and v is not None}
    if not args.ray:
        from server.main import serve

        return serve(Settings(**flags))
    from server.ray_app import serve_ray

    serve_ray(Settings(**flags), args.replicas, args.ray_address, args.replica_gpus)


# ---- client commands ----------------------------------------------------------------------------


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


def _add_key_args(p: argparse.ArgumentParser) -> None:
    """How a client command proves who it is to either door."""
    p.add_argument(
        "--api-key", metavar="KEY", help="bearer key (default: $TTT_API_KEY; an open loopback server needs none)"
    )
    p.add_argument(
        "--tls-ca",
        metavar="PEM",
        help="PEM file of the authority (or self-signed certificate) of a TLS server (default: $TTT_TLS_CA)",
    )


def _connection_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--server", metavar="HOST:PORT", help="gRPC address (default: $TTT_SERVER or 127.0.0.1:50051)")
    _add_key_args(p)
    return p


def add_client_commands(sub) -> None:
    conn = _connection_parent()
    _add_ingest(sub, conn)
    _add_sessions(sub, conn)
    _add_chat(sub)
    _add_keys(sub)


def _add_ingest(sub, conn) -> None:
    p = sub.add_parser("ingest", parents=[conn], help="stream files into a session (created when missing)")
    p.add_argument("files", nargs="+", metavar="FILE", help="UTF-8 text files ('-': standard input); one stream each")
    p.add_argument("--session", "-s", required=True, metavar="ID", help="session id")
    p.add_argument("--chunk-tokens", type=_positive, metavar="N", help="tokens per training chunk (new sessions only)")
    p.add_argument(
        "--memory",
        metavar="PRESET",
        help="how hard a new session works to recall what it reads: off, fast (the default), "
        "balanced or deep, trading ingest speed for recall (new sessions only)",
    )
    p.add_argument(
        "--piece-bytes",
        type=_positive,
        default=DEFAULT_PIECE_BYTES,
        metavar="N",
        help=f"bytes per streamed message (default {DEFAULT_PIECE_BYTES})",
    )
    p.add_argument(
        "--keep-pending",
        action="store_true",
        help="do not train the last partial chunk: the document continues in a later stream",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar, only the summary lines")
    p.set_defaults(handler=run_ingest)


def _add_sessions(sub, conn) -> None:
    p = sub.add_parser("sessions", help="list, show, delete, save, reset or import sessions")
    ssub = p.add_subparsers(dest="action", required=True, metavar="{list,show,rm,save,reset,import}")
    q = ssub.add_parser("list", parents=[conn], help="a table of your sessions")
    q.set_defaults(handler=run_sessions_list)
    for name, handler, text in (
        ("show", run_sessions_show, "every field of a session"),
        ("rm", run_sessions_rm, "delete a session (in memory and on disk)"),
        ("save", run_sessions_save, "checkpoint a session now"),
        ("reset", run_sessions_reset, "forget everything a session learned"),
    ):
        q = ssub.add_parser(name, parents=[conn], help=text)
        q.add_argument("session_id", metavar="ID")
        q.set_defaults(handler=handler)
    q = ssub.add_parser(
        "import",
        parents=[conn],
        help="a new session from a peft LoRA adapter folder (adapter_config.json + adapter_model.safetensors)",
    )
    q.add_argument("folder", metavar="DIR")
    q.add_argument("--session", help="the new session's id (default: the server picks one)")
    q.set_defaults(handler=run_sessions_import)


def _add_chat(sub) -> None:
    p = sub.add_parser(
        "chat",
        help="talk to a session (OpenAI-compatible HTTP API): a REPL, or --message / piped lines",
        description="Interactive chat with a session over HTTP. Each line is a user message; the answer streams "
        "in and joins the history, which is sent with every message. In the REPL: /reset, /help, "
        "/exit (or Ctrl-D); Ctrl-C stops an answer. With --message, or when standard input is not a "
        "terminal (one message per line), answers are printed and the command exits.",
    )
    p.add_argument("--session", "-s", metavar="ID", help="session id (default: the base model, no session)")
    p.add_argument("--http", metavar="URL", help="HTTP address (default: $TTT_HTTP or http://127.0.0.1:8000)")
    _add_key_args(p)
    p.add_argument("--system", metavar="TEXT", help="a system message at the start of the conversation")
    p.add_argument("--message", "-m", metavar="TEXT", help="send this one message, print the answer, exit")
    p.add_argument("--max-tokens", type=_positive, metavar="N", help="most tokens per answer (server default 512)")
    p.add_argument(
        "--temperature", type=float, metavar="T", help="sampling temperature, 0 = greedy (server default 1.0)"
    )
    p.add_argument("--seed", type=int, metavar="N", help="sampling seed, for repeatable answers")
    p.set_defaults(handler=run_chat)


def _add_keys(sub) -> None:
    p = sub.add_parser("keys", help="manage the server's API keys file")
    ksub = p.add_subparsers(dest="action", required=True, metavar="{new}")
    q = ksub.add_parser("new", help="generate a key for USER, add its sha256 to the keys file, print the key once")
    q.add_argument("user")
    q.add_argument(
        "--file",
        "-f",
        metavar="KEYS_JSON",
        help="the keys file {user: [sha256, ...]} (default: $TTT_API_KEYS_FILE); created with mode 0600",
    )
    q.set_defaults(handler=run_keys_new)


def add_key_to_file(path: Path, user: str, digest: str) -> None:
    """Append ``digest`` to ``user``'s list in the JSON keys file, atomically; the file ends up mode 0600."""
    data: dict = {}
    if path.exists():
        try:
            data = json.loads(path.read_text() or "{}")
        except (OSError, ValueError) as e:
            raise CLIError(f"{path}: cannot read the keys file ({e})") from None
        if not isinstance(data, dict):
            raise CLIError(f"{path}: expected a JSON object {{user: [sha256 hex, ...]}}")
    digests = data.get(user, [])
    digests = [digests] if isinstance(digests, str) else list(digests)
    digests.append(digest)
    data[user] = digests
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o600)
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CLIError(f"{path}: {e.strerror or e}") from None


def run_keys_new(args) -> int:
    from server.auth import hash_key, new_key
    from ttt.engine import check_session_id

    keys_file = args.file or os.environ.get("TTT_API_KEYS_FILE")
    if not keys_file:
        raise CLIError("name the keys file with --file (or $TTT_API_KEYS_FILE)")
    try:
        check_session_id(args.user)  # the server keeps each user's sessions in a folder named after the user
    except ValueError:
        raise CLIError(
            "user name must be 1-128 characters of letters, digits, '_', '-', '.', starting with a letter or digit"
        ) from None
    key = new_key()
    add_key_to_file(Path(keys_file), args.user, hash_key(key))
    print(key)
    print(
        f"added a key for {args.user} to {keys_file} (shown once; the server reads the file when it starts)",
        file=sys.stderr,
    )
    return 0


# ---- entry point --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="ttt", description="Test-time-training inference server")
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve(sub)
    add_client_commands(sub)
    # Benchmarks parse their own flags (``ttt eval --help``): name -> (help, module with main(argv)).
    benchmarks = {
        "eval": ("how much a session remembers: NLL by position and fact recall vs full attention", "bench.eval"),
        "recall": (
            "does a session answer about what it read: needles, multi-fact stories, book questions",
            "bench.recall_cli",
        ),
        "bench": ("TTT vs full attention: ingest speed, chat latency and memory as documents grow", "bench.bench"),
        "sweep": ("measure candidate fast-weight defaults", "bench.sweep"),
    }
    for name, (text, _) in benchmarks.items():
        sub.add_parser(name, help=text, add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "serve":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        run_serve(args)
    elif args.command in benchmarks:
        importlib.import_module(benchmarks[args.command][1]).main(rest)
    else:
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return run_client_command(args)
    return 0


def run_client_command(args) -> int:
    from clients.client import TTTError

    try:
        return args.handler(args)
    except TTTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except CLIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted (chunks already trained stay learned; the rest stays pending)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
