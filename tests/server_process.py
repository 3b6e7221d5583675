"""``rnnserve serve`` as a child process for the tests that kill, stop and restart servers:
started on loopback, its JSON log read until it serves (never longer than a watchdog allows),
then drained in the background so it never blocks on a full pipe."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 60.0


def free_port() -> int:
    """A free loopback port, for a server that must come back on the same address."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_command(repository: Path, port: int, *flags: str) -> list[str]:
    """``python -m service.cli serve`` of ``repository`` on ``port``, JSON logs, metrics on any
    free port, then ``flags``."""
    return [sys.executable, "-m", "service.cli", "serve", "--grpc-port", str(port),
            "--metrics-port", "0", "--model-repository", str(repository), "--log-format", "json",
            *flags]  # fmt: skip


class ServerProcess:
    """One server's successive lives: :meth:`start` returns once it serves; :attr:`lines` holds
    every life's log, :attr:`restored` its "restored ..." messages."""

    def __init__(self, command: list[str]) -> None:
        self.command = command
        self.process: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self.restored: list[str] = []

    def launch(self) -> None:
        self.process = subprocess.Popen(self.command, cwd=ROOT, stderr=subprocess.PIPE, text=True,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip

    def wait_serving(self) -> None:
        """Read the log until the server says it serves; fail if it exits first. A watchdog kills
        it if that takes more than START_TIMEOUT_S, so nothing waits forever."""
        process = self.process
        assert process is not None and process.stderr is not None
        watchdog = threading.Timer(START_TIMEOUT_S, process.kill)
        watchdog.start()
        try:
            for line in process.stderr:
                self.lines.append(line)
                message = json.loads(line).get("message", "") if line.startswith("{") else line
                if "restored" in message:
                    self.restored.append(message)
                if "serving" in message:
                    break
            else:
                process.stderr.close()
                pytest.fail(f"server exited with {process.wait()}: {''.join(self.lines)[-3000:]}")
        finally:
            watchdog.cancel()
        threading.Thread(target=self._drain, args=(process,), daemon=True).start()

    def _drain(self, process: subprocess.Popen[str]) -> None:
        assert process.stderr is not None
        with process.stderr:  # closed once the server has exited
            for line in process.stderr:
                self.lines.append(line)

    def start(self) -> None:
        self.launch()
        self.wait_serving()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, signum: int) -> int:
        """Send ``signum`` (if it still runs) and wait for the exit status."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signum)
        return self.process.wait(timeout=60)

    def kill(self) -> None:
        """kill -9, if it still runs."""
        if self.alive():
            self.signal(signal.SIGKILL)
