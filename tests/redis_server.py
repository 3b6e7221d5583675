"""A redis-server on loopback for a test, started and stopped by it (no Redis is assumed)."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def redis_server(directory: Path) -> Iterator[str]:
    """Run redis-server on a free loopback port for the block (no persistence, files in
    ``directory``); yields its URL."""
    server = shutil.which("redis-server")
    assert server, (
        "redis-server is needed (Debian package redis-server; bash scripts/test.sh installs it)"
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen(
        [server, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
         "--dir", str(directory)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stdout is not None
    try:
        for line in process.stdout:  # until it says it is ready
            if "Ready to accept connections" in line:
                break
        else:
            pytest.fail(f"redis-server exited with {process.wait()}")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=30)
        process.stdout.close()
