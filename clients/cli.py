"""The `ttt` command: `ttt serve`, and tools for benchmarks."""

from __future__ import annotations

import argparse
import sys


def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="run the gRPC + HTTP server (flags override TTT_* environment variables)")
    p.add_argument("--model", help="local Hugging Face model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", help="cuda, cpu, ... (default: CUDA when available)")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--grpc-port", type=int, help="default 50051")
    p.add_argument("--http-port", type=int, help="default 8000")
    p.add_argument("--data-dir", help="where sessions are saved (default ~/.local/share/ttt)")
    p.add_argument("--api-keys-file", help="JSON {user: [sha256 of key, ...]}; without it the server is open, loopback only")


def run_serve(args) -> None:
    from server.main import serve
    from server.settings import Settings

    flags = {k: v for k, v in vars(args).items() if k != "command" and v is not None}
    serve(Settings(**flags))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="ttt", description="Test-time-training inference server")
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve(sub)
    sub.add_parser("bench", help="ingest throughput vs prefill, session bytes vs KV cache (bench/ingest.py)", add_help=False)
    sub.add_parser("sweep", help="measure candidate fast-weight defaults (bench/sweep.py)", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "serve":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        run_serve(args)
    elif args.command == "bench":
        from bench.ingest import main as bench

        bench(rest)
    else:
        from bench.sweep import main as sweep

        sweep(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
