"""nginx (Debian's package) on loopback for a test, running the shipped deploy/nginx/rnnserve.conf
in front of the test's replicas: started and stopped by the test, its files in a directory of the
test's own (no nginx service is assumed, none is touched)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server_process import free_port

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_CONFIG = ROOT / "deploy" / "nginx" / "rnnserve.conf"
START_TIMEOUT_S = 20.0
MISSING = "nginx is needed (Debian package nginx; bash scripts/test.sh installs it)"


def nginx_binary() -> str:
    """The nginx executable; missing, the test fails saying how to get it (never a silent skip,
    as for redis-server and promtool: the README's test command installs it)."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        pytest.fail(MISSING)
    return found


def routing_config(listen_port: int, replica_ports: list[int]) -> str:
    """The shipped configuration with its example replicas replaced by ``replica_ports`` (each
    with the parameters the shipped lines carry) and its listen port by ``listen_port``, on
    loopback. Fails if the shipped file no longer has the lines this replaces."""
    text = SHIPPED_CONFIG.read_text()
    servers = list(re.finditer(r"^( *)server \S+:\d+( [^;\n]*)?;\n", text, re.M))
    assert len(servers) >= 2, "deploy/nginx/rnnserve.conf: no upstream server lines found"
    indent, parameters = servers[0].group(1), servers[0].group(2) or ""
    ours = "".join(f"{indent}server 127.0.0.1:{port}{parameters};\n" for port in replica_ports)
    text = text[: servers[0].start()] + ours + text[servers[-1].end() :]
    text, listens = re.subn(r"^( *)listen \d+ http2;", rf"\1listen 127.0.0.1:{listen_port} http2;",
                            text, flags=re.M)  # fmt: skip
    assert listens == 1, "deploy/nginx/rnnserve.conf: expected one `listen PORT http2;` line"
    return text


def main_config(directory: Path, include: Path, shutdown_timeout_s: float | None = None) -> str:
    """nginx.conf for a private instance: in the foreground, every file in ``directory``, an
    access log saying where each call went. ``shutdown_timeout_s``: ``worker_shutdown_timeout``
    (after a reload, the old worker closes the connections still open after that long; without
    it, a stream opened before a reload stays on its old route for as long as it lasts)."""
    temp = "\n".join(
        f"    {kind}_temp_path {directory / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    user = "user root root;\n" if os.geteuid() == 0 else ""  # workers reach the private directory
    if shutdown_timeout_s is not None:
        user += f"worker_shutdown_timeout {max(1, round(shutdown_timeout_s * 1000))}ms;\n"
    return (
        f"daemon off;\n{user}worker_processes 1;\npid {directory / 'nginx.pid'};\n"
        f"error_log {directory / 'error.log'} info;\n"
        "events { worker_connections 1024; }\n"
        "http {\n"
        "    log_format routing '$http_x_session_id $upstream_addr $status $request_uri';\n"
        f"    access_log {directory / 'access.log'} routing;\n"
        f"{temp}\n"
        f"    include {include};\n"
        "}\n"
    )


class Nginx:
    """A private nginx on a loopback port, proxying to replicas on loopback ports
    (``shutdown_timeout_s``: see :func:`main_config`)."""

    def __init__(
        self,
        directory: Path,
        replica_ports: list[int],
        port: int = 0,
        shutdown_timeout_s: float | None = None,
    ) -> None:
        self.binary = nginx_binary()
        self.directory = directory
        self.port = port or free_port()
        self.replica_ports = list(replica_ports)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "rnnserve.conf").write_text(routing_config(self.port, replica_ports))
        (directory / "nginx.conf").write_text(
            main_config(directory, directory / "rnnserve.conf", shutdown_timeout_s)
        )
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self, *extra: str) -> list[str]:
        return [self.binary, "-p", str(self.directory), "-c", str(self.directory / "nginx.conf"),
                "-e", str(self.directory / "error.log"), *extra]  # fmt: skip

    def check(self) -> None:
        """``nginx -t`` on the generated configuration."""
        result = subprocess.run(self.command("-t"), capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr

    def start(self) -> None:
        self.process = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._accepts():  # bounded poll: listening, or exited
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"nginx did not start:\n{self.errors()[-3000:]}")
            time.sleep(0.01)

    def _accepts(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        """Fast shutdown (SIGTERM: open streams are cut, as when nginx goes away)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def reload(self, replica_ports: list[int]) -> None:
        """Replace the upstream's replicas with ``replica_ports`` (the rest of the configuration as
        it was), check it (``nginx -t``), then ``nginx -s reload``: returns once the master has
        started the worker that runs it (bounded poll on the error log). The old worker finishes
        the calls it has (see :func:`main_config`'s ``shutdown_timeout_s``)."""
        assert self.process is not None and self.process.poll() is None, "nginx is not running"
        config = self.directory / "rnnserve.conf"
        text = config.read_text()
        servers = list(re.finditer(r"^( *)server 127\.0\.0\.1:\d+( [^;\n]*)?;\n", text, re.M))
        assert servers, f"{config}: no upstream server lines"
        indent, parameters = servers[0].group(1), servers[0].group(2) or ""
        ours = "".join(f"{indent}server 127.0.0.1:{port}{parameters};\n" for port in replica_ports)
        config.write_text(text[: servers[0].start()] + ours + text[servers[-1].end() :])
        self.check()
        started = self.errors().count("start worker process ")
        result = subprocess.run(self.command("-s", "reload"), capture_output=True, text=True,
                                timeout=30)  # fmt: skip
        assert result.returncode == 0, result.stderr
        deadline = time.monotonic() + START_TIMEOUT_S
        while self.errors().count("start worker process ") <= started:  # bounded poll
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"nginx did not reload:\n{self.errors()[-3000:]}")
            time.sleep(0.01)
        self.replica_ports = list(replica_ports)

    def wait_old_workers_gone(self, timeout_s: float = 60.0) -> None:
        """After a reload: wait until the old worker has exited (having finished its calls, or
        closed them at ``shutdown_timeout_s``), so that every call runs the new configuration
        (bounded poll on the error log: the master logs each worker started and exited)."""
        deadline = time.monotonic() + timeout_s
        while True:
            log = self.errors()
            workers = len(re.findall(r"start worker process \d+", log)) - len(
                re.findall(r"worker process \d+ exited", log)
            )
            if workers <= 1:  # (worker_processes 1)
                return
            assert time.monotonic() < deadline, f"old nginx workers still running:\n{log[-2000:]}"
            time.sleep(0.01)

    def errors(self) -> str:
        path = self.directory / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def access_log(self) -> list[list[str]]:
        """One ``[session id or "-", upstream address(es), status, uri]`` per finished call."""
        path = self.directory / "access.log"
        return [line.split(" ") for line in path.read_text().splitlines()] if path.exists() else []


@contextlib.contextmanager
def nginx(
    directory: Path,
    replica_ports: list[int],
    port: int = 0,
    shutdown_timeout_s: float | None = None,
) -> Iterator[Nginx]:
    """A started :class:`Nginx` for the block, stopped afterwards whatever happens."""
    server = Nginx(directory, replica_ports, port, shutdown_timeout_s)
    server.start()
    try:
        yield server
    finally:
        server.stop()
