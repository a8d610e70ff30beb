"""The `ttt` command."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="ttt", description="Test-time-training inference server tools")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("bench", help="ingest throughput vs prefill, session bytes vs KV cache (bench/ingest.py)", add_help=False)
    sub.add_parser("sweep", help="measure candidate fast-weight defaults (bench/sweep.py)", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        from bench.ingest import main as run
    else:
        from bench.sweep import main as run
    run(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
