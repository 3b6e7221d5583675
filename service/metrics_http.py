"""The Prometheus ``/metrics`` endpoint: an HTTP server whose cost stays bounded whatever its
clients do.

Concurrency decision: one thread runs an asyncio event loop of its own and serves every
connection as a coroutine (a few KB), not as a thread. prometheus_client's ``start_http_server``
starts a thread per connection and never times one out, so 300 half-open connections held 300
threads. Here:

- a connection has ``request_timeout_s`` to send its request and read the reply; one still open
  then (a half-open client, a client that does not read) is closed;
- at most ``max_connections`` are open: one more closes the connection open longest, so slow
  clients cannot lock a scraper out (a scrape is answered within milliseconds of its request,
  long before that many newer connections could push it out);
- a request head over ``MAX_REQUEST_HEAD_BYTES`` is answered 431 and closed.

The reply is prometheus_client's own WSGI app (the same body, content type, OpenMetrics
negotiation, ``name[]`` filter and gzip as ``start_http_server``), computed in this thread, one
scrape at a time: a scrape takes milliseconds. It is not the server's event loop, so a scrape never
delays a chunk (beyond sharing the GIL, as the per-connection threads did). HTTP/1.0: one request
per connection, as before.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import unquote

from prometheus_client import CollectorRegistry, make_wsgi_app

logger = logging.getLogger(__name__)

MAX_CONNECTIONS = 64
MAX_REQUEST_HEAD_BYTES = 16 * 1024
_END_OF_HEAD = b"\r\n\r\n"

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class MetricsHttpServer:
    """Serves ``registry`` on ``host:port`` (port 0: a free one, see :attr:`port`) from its own
    thread, from construction until :meth:`stop`. The port is bound in the constructor, so a
    port in use raises ``OSError`` there."""

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str,
        port: int,
        *,
        request_timeout_s: float,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.request_timeout_s = request_timeout_s
        self.max_connections = max_connections
        self._app: WsgiApp = make_wsgi_app(registry)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.create_server((host, port), family=family)
        self.port: int = self._socket.getsockname()[1]
        # Open connections in the order they arrived (the first is the one open longest); only
        # the server's thread touches it.
        self._open: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._loop = asyncio.new_event_loop()
        self._stopping = asyncio.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-http", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Close the port and every open connection, and end the thread."""
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join(timeout_s)
        self._socket.close()

    def _run(self) -> None:
        with asyncio.Runner(loop_factory=lambda: self._loop) as runner:
            runner.run(self._serve())

    async def _serve(self) -> None:
        server = await asyncio.start_server(
            self._connection, sock=self._socket, limit=MAX_REQUEST_HEAD_BYTES
        )
        try:
            await self._stopping.wait()
        finally:
            server.close()
            for writer in self._open.values():
                writer.transport.abort()
            await server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._open) >= self.max_connections:
            oldest = next(iter(self._open))
            self._open.pop(oldest).transport.abort()
        self._open[task] = writer
        try:
            async with asyncio.timeout(self.request_timeout_s):
                try:
                    head = await reader.readuntil(_END_OF_HEAD)
                except asyncio.LimitOverrunError:
                    reply = _response("431 Request Header Fields Too Large", [], b"")
                else:
                    reply = self._reply(head)
                writer.write(reply)
                writer.close()
                await writer.wait_closed()  # the reply is flushed (or the timeout drops it)
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass  # too slow, gone, or pushed out by a newer connection: nothing to answer
        finally:
            self._open.pop(task, None)
            writer.transport.abort()  # a no-op once closed; otherwise drops the connection now

    def _reply(self, head: bytes) -> bytes:
        """The HTTP response to one request head, from prometheus_client's WSGI app."""
        request_line, *header_lines = head[: -len(_END_OF_HEAD)].decode("latin-1").split("\r\n")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return _response("400 Bad Request", [], b"")
        method, target, _ = parts
        path, _, query = target.partition("?")
        environ: dict[str, Any] = {
            "REQUEST_METHOD": method,
            "PATH_INFO": unquote(path),
            "QUERY_STRING": query,
        }
        for line in header_lines:
            name, colon, value = line.partition(":")
            if colon:
                environ["HTTP_" + name.strip().upper().replace("-", "_")] = value.strip()
        started: list[Any] = []

        def start_response(status: str, headers: list[tuple[str, str]], *_: Any) -> None:
            started[:] = [status, headers]

        try:
            body = b"".join(self._app(environ, start_response))
        except Exception:
            logger.exception("collecting the metrics failed")
            return _response("500 Internal Server Error", [], b"")
        status, headers = started
        return _response(status, headers, body)


def _response(status: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
    lines = [
        f"HTTP/1.0 {status}",
        *(f"{name}: {value}" for name, value in headers),
        f"Content-Length: {len(body)}",
        "Connection: close",
        "",
        "",
    ]
    return "\r\n".join(lines).encode("latin-1") + body
