"""``ttt serve`` in a subprocess on loopback ports it picks itself (port 0: no race for a port chosen here and bound
there), read from its "serving" log line. Used by ``bench.load --start`` (so that the clients do not share the
server's interpreter and its GIL) and by tests/test_crash.py (which kills it)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
SERVING_LINE = re.compile(rb"serving .* gRPC (\d+), HTTP (\d+);")


class ServerProcess:
    """Start with the ``ttt serve`` flags in ``args`` (ports and host are set here) and ``TTT_*`` settings in
    ``env``; ``wait_ready()``, then ``grpc`` / ``http`` are its addresses; ``kill()`` is SIGKILL, ``stop()``
    SIGTERM (a clean shutdown)."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path):
        self.grpc_port = self.http_port = 0
        self.log = open(log_path, "wb")  # noqa: SIM115  (the server writes it until stop() or kill())
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "clients.cli",
                "serve",
                "--host",
                "127.0.0.1",
                "--grpc-port",
                "0",
                "--http-port",
                "0",
                *args,
            ],
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until the server logs its ports (both doors accept connections then) and ``/readyz`` agrees."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.output()}")
            if not self.grpc_port and (m := SERVING_LINE.search(Path(self.log.name).read_bytes())):
                self.grpc_port, self.http_port = int(m[1]), int(m[2])
            if self.grpc_port:
                status = httpx.get(f"{self.http}/readyz", timeout=timeout).status_code
                if status != 200:
                    raise RuntimeError(f"/readyz says {status} after the serving line: {self.output()}")
                return
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout} s: {self.output()}")

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-4000:]

    def stop(self, timeout: float = 300.0) -> None:
        """SIGTERM (the server saves its sessions and finishes the work it accepted); SIGKILL after ``timeout``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self.log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(60)
        self.log.close()
