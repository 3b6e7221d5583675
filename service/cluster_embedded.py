"""The embedded cluster store of ``rnnserve serve --workers N``: the supervisor's
:class:`MemoryBackend` served over a Unix socket (:class:`EmbeddedStore`), and
:class:`SocketBackend`, the :class:`~service.cluster_backend.ClusterBackend` each worker uses.

Why this design:

- No server to install: ``--workers N`` on one machine needs a store shared by its workers, and
  the supervisor (the parent of the workers, which outlives every one of them) is already there.
  It holds the store in memory, so a worker killed -9 loses nothing the store had; the store dies
  only with the supervisor, that is with the whole server (its workers follow it: they are started
  with a parent-death signal).
- The reference semantics for free: the supervisor runs :class:`MemoryBackend`, the contract's
  reference implementation (each operation atomic on one event loop, its clock monotonic: one
  process's clock for every lease and TTL), and this module only carries calls to it. One request,
  one reply; what a replica's :meth:`~ClusterBackend.listen` registers on the server is an inbox
  that pushes each message down that replica's connection.
- A Unix socket in a private directory (mode 0700, the socket 0600): only this user's processes
  reach it, with no port to allocate or guard, and loopback-only by construction.
- No pickle: a frame is an 8-byte prefix (two big-endian uint32: header and body lengths), a JSON
  header (the operation, its arguments, ``blobs``: the length of each binary argument) and the
  body, the blobs' raw bytes one after the other. Nothing received is ever executed.

Concurrency: requests on one connection are pipelined. Each carries an id; the client's reader
task hands each reply to the caller waiting on that id, so concurrent callers on one worker's
event loop each get their own reply. The server answers one connection's requests in order (each
operation is atomic and does not wait), so a connection's calls apply in the order they were sent.

Failures: no call waits longer than ``timeout_s``; a store that cannot be reached, a connection
that drops and a reply that does not come are all a builtin :class:`ConnectionError` naming the
socket (a call that timed out may have been applied, as with Redis). The next call connects
again. A client whose connection drops (a worker killed) costs the server nothing: its inboxes
are unregistered and the other connections go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import shutil
import stat
import struct
import tempfile
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.cluster_backend import (
    Claimed,
    ClusterBackend,
    HeldBy,
    Inbox,
    MemoryBackend,
    Message,
    Write,
)

logger = logging.getLogger(__name__)

PREFIX = struct.Struct(">II")  # header bytes, body bytes
MAX_HEADER_BYTES = 64 * 1024 * 1024  # a write of many sessions names each
MAX_BODY_BYTES = 2**32 - 1  # the prefix's limit: the blobs of one batch of writes
MAX_UNIX_PATH_BYTES = 107  # sun_path holds 108 bytes with the terminating NUL
# A server's connection whose client does not read (replies and pushes pile up) is closed.
MAX_PUSH_BACKLOG_BYTES = 64 * 1024 * 1024
DEFAULT_TIMEOUT_S = 10.0

Header = dict[str, Any]


class ProtocolError(Exception):
    """A frame that is not this protocol's (the connection is closed)."""


def encode(header: Header, blobs: Sequence[bytes] = ()) -> bytes:
    """One frame: the prefix, ``header`` as JSON (with ``blobs``' lengths), then the blobs."""
    if blobs:
        header = {**header, "blobs": [len(blob) for blob in blobs]}
    text = json.dumps(header, separators=(",", ":")).encode()
    body = sum(len(blob) for blob in blobs)
    if len(text) > MAX_HEADER_BYTES or body > MAX_BODY_BYTES:
        raise ValueError(f"a frame of {len(text)} + {body} bytes is over the protocol's limits")
    return b"".join((PREFIX.pack(len(text), body), text, *blobs))


async def read_frame(reader: asyncio.StreamReader) -> tuple[Header, list[bytes]]:
    """The next frame: its header and its blobs. Raises :class:`asyncio.IncompleteReadError` at
    the end of the stream, :class:`ProtocolError` for anything malformed."""
    header_bytes, body_bytes = PREFIX.unpack(await reader.readexactly(PREFIX.size))
    if header_bytes > MAX_HEADER_BYTES:
        raise ProtocolError(f"a header of {header_bytes} bytes")
    try:
        header = json.loads(await reader.readexactly(header_bytes))
    except ValueError as error:
        raise ProtocolError(f"a header that is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise ProtocolError("a header that is not a JSON object")
    body = await reader.readexactly(body_bytes) if body_bytes else b""
    lengths = header.get("blobs", [])
    if not isinstance(lengths, list) or sum(lengths) != body_bytes:
        raise ProtocolError("blob lengths that do not add up to the body")
    blobs, start = [], 0
    for length in lengths:
        blobs.append(body[start : start + length])
        start += length
    return header, blobs


def _message(data: Any) -> Message:
    return Message(kind=str(data["kind"]), key=str(data["key"]), sender=str(data["sender"]))


def _message_data(message: Message) -> Header:
    return {"kind": message.kind, "key": message.key, "sender": message.sender}


# --- The server: the supervisor's store ----------------------------------------------------------


@dataclass(eq=False)  # by identity: a set holds them
class _Peer:
    """One client connection of the server, and the inboxes it listens with (by listen id)."""

    writer: asyncio.StreamWriter
    listens: dict[int, asyncio.Task[None]] = field(default_factory=dict)


class EmbeddedStore:
    """A :class:`MemoryBackend` served on a Unix socket: ``await start()`` on the event loop that
    is to own it (the supervisor's, or a test's), ``await stop()``; workers connect a
    :class:`SocketBackend` to :attr:`path`.

    ``path`` None: the socket goes in a new private directory (removed by :meth:`stop`). A path
    given must be in a directory that only this user can enter (mode 0700), which is created if
    missing. ``reply_timeout_s``: how long a client may leave a reply unread before its
    connection is closed."""

    def __init__(
        self,
        path: Path | None = None,
        backend: MemoryBackend | None = None,
        reply_timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.backend = backend if backend is not None else MemoryBackend()
        self.reply_timeout_s = reply_timeout_s
        self._own_directory: Path | None = None
        if path is None:
            self._own_directory = Path(tempfile.mkdtemp(prefix="rnnserve-store-"))  # mode 0700
            path = self._own_directory / "store.sock"
        self._path = path
        self._server: asyncio.AbstractServer | None = None
        self._peers: set[_Peer] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._peers_changed: asyncio.Condition | None = None

    @property
    def path(self) -> Path:
        """The Unix socket's path (what ``cluster_embedded_socket`` names)."""
        return self._path

    @property
    def connections(self) -> int:
        """Client connections open now."""
        return len(self._peers)

    def describe(self) -> str:
        return f"embedded cluster store at {self._path}"

    async def start(self) -> None:
        """Listen on :attr:`path` (socket mode 0600 in a 0700 directory)."""
        if len(os.fsencode(self._path)) > MAX_UNIX_PATH_BYTES:
            raise ValueError(
                f"{self._path}: a Unix socket path is at most {MAX_UNIX_PATH_BYTES} bytes"
            )
        directory = self._path.parent
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = directory.stat()
        if info.st_uid != os.getuid() or info.st_mode & 0o077:
            raise PermissionError(
                f"{directory}: the store's directory must be this user's alone (mode 0700)"
            )
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(self._path.lstat().st_mode):  # left by a server that died
                self._path.unlink()
        self._peers_changed = asyncio.Condition()
        self._server = await asyncio.start_unix_server(self._connected, path=str(self._path))
        os.chmod(self._path, 0o600)
        logger.debug("%s: listening", self.describe())

    async def stop(self) -> None:
        """Close every connection and the socket; remove the socket (and the directory this
        store made)."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for peer in list(self._peers):
            peer.writer.close()
        # Each handler sees its connection end and returns (not cancelled: asyncio's streams
        # would report a cancelled handler as an error).
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=self.reply_timeout_s)
        if server is not None:
            await server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self._path.unlink()
        if self._own_directory is not None:
            shutil.rmtree(self._own_directory, ignore_errors=True)
            self._own_directory = None

    async def until_connections(self, count: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        """Wait until exactly ``count`` clients are connected (TimeoutError after ``timeout_s``)."""
        assert self._peers_changed is not None, "start() first"
        async with asyncio.timeout(timeout_s), self._peers_changed:
            await self._peers_changed.wait_for(lambda: len(self._peers) == count)

    async def _peers_now(self) -> None:
        if self._peers_changed is not None:
            async with self._peers_changed:
                self._peers_changed.notify_all()

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        peer = _Peer(writer)
        self._peers.add(peer)
        await self._peers_now()
        try:
            while True:
                header, blobs = await read_frame(reader)
                reply = await self._answer(peer, header, blobs)
                if writer.is_closing():
                    break
                writer.write(reply)
                async with asyncio.timeout(self.reply_timeout_s):
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass  # the client went away (or stopped reading): its inboxes go with it
        except ProtocolError as error:
            logger.warning("%s: closing a connection: %s", self.describe(), error)
        finally:
            for listen in peer.listens.values():
                listen.cancel()
            await asyncio.gather(*peer.listens.values(), return_exceptions=True)
            self._peers.discard(peer)
            self._handlers.discard(task)
            writer.close()
            await self._peers_now()

    async def _answer(self, peer: _Peer, header: Header, blobs: list[bytes]) -> bytes:
        """The reply frame to one request (an error in it, never an exception out of it, for a
        request that is well framed but wrong)."""
        request_id = header.get("id")
        try:
            result, reply_blobs = await self._apply(peer, header, blobs)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # a malformed request: the caller's bug, told to the caller
            logger.warning("%s: request %s failed: %r", self.describe(), header.get("op"), error)
            return encode({"id": request_id, "error": f"{type(error).__name__}: {error}"})
        return encode({"id": request_id, "result": result}, reply_blobs)

    async def _apply(self, peer: _Peer, h: Header, blobs: list[bytes]) -> tuple[Any, list[bytes]]:
        backend, op = self.backend, h["op"]
        if op == "register":
            await backend.register(str(h["replica"]), float(h["lease_s"]))
            return None, []
        if op == "renew":
            return await backend.renew(str(h["replica"]), float(h["lease_s"])), []
        if op == "leave":
            await backend.leave(str(h["replica"]))
            return None, []
        if op == "create":
            key, replica, ttl_s = str(h["key"]), str(h["replica"]), float(h["ttl_s"])
            return await backend.create(key, replica, blobs[0], ttl_s), []
        if op == "acquire":
            got = await backend.acquire(str(h["key"]), str(h["replica"]), float(h["ttl_s"]))
            if isinstance(got, Claimed):
                return {"epoch": got.epoch, "released": got.released}, [got.blob]
            if isinstance(got, HeldBy):
                return {"held_by": got.replica}, []
            return None, []
        if op == "write":
            writes = [
                Write(
                    key=str(w["key"]),
                    replica=str(w["replica"]),
                    epoch=int(w["epoch"]),
                    blob=None if w["blob"] is None else blobs[int(w["blob"])],
                    release=bool(w["release"]),
                )
                for w in h["writes"]
            ]
            return await backend.write(writes, float(h["ttl_s"])), []
        if op == "delete":
            key, replica, epoch = str(h["key"]), str(h["replica"]), int(h["epoch"])
            return await backend.delete(key, replica, epoch), []
        if op == "send":
            await backend.send(str(h["replica"]), _message(h["message"]))
            return None, []
        if op == "listen":
            listen_id = int(h["listen"])
            task = asyncio.create_task(
                backend.listen(str(h["replica"]), self._inbox(peer, listen_id))
            )
            peer.listens[listen_id] = task
            # The listen task registers its inbox in its first step, which runs before this
            # coroutine resumes (both are scheduled in order): the reply says it is registered.
            await asyncio.sleep(0)
            return None, []
        if op == "unlisten":
            listening = peer.listens.pop(int(h["listen"]), None)
            if listening is not None:
                listening.cancel()
                await asyncio.gather(listening, return_exceptions=True)
            return None, []
        raise ValueError(f"unknown operation {op!r}")

    def _inbox(self, peer: _Peer, listen_id: int) -> Inbox:
        """The inbox that pushes a message down ``peer``'s connection (fire and forget, as a
        message to nobody is lost: senders retry). A peer that reads nothing is cut off."""

        def push(message: Message) -> None:
            writer = peer.writer
            if writer.is_closing():
                return
            transport = writer.transport
            if transport.get_write_buffer_size() > MAX_PUSH_BACKLOG_BYTES:
                logger.warning("%s: a client reads nothing; closing it", self.describe())
                writer.close()
                return
            writer.write(encode({"push": listen_id, "message": _message_data(message)}))

        return push


# --- The client: each worker's backend -----------------------------------------------------------


class _Connection:
    """One connection to the store: the replies awaited (by request id) and the inboxes
    listening (by listen id), both fed by the reader task."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.pending: dict[int, asyncio.Future[tuple[Header, list[bytes]]]] = {}
        self.listeners: dict[int, tuple[Inbox, asyncio.Future[None]]] = {}
        self.broken: ConnectionError | None = None
        self.deliveries: set[asyncio.Future[None]] = set()
        self.reading: asyncio.Task[None] | None = None

    def fail(self, error: ConnectionError) -> None:
        """The connection is over: every caller and listener gets ``error``."""
        if self.broken is None:
            self.broken = error
        for future in self.pending.values():
            if not future.done():
                future.set_exception(error)
        for _, ended in self.listeners.values():
            if not ended.done():
                ended.set_exception(error)
        self.writer.close()


class SocketBackend:
    """The :class:`ClusterBackend` of a ``--workers`` worker: every operation is forwarded to the
    supervisor's :class:`EmbeddedStore` at ``path``, and answered by its :class:`MemoryBackend`.

    ``timeout_s``: the longest any call waits (to connect, and for its reply); then, or when the
    store cannot be reached, :class:`ConnectionError` naming the socket. One connection, opened at
    the first call and again after it drops; calls from many tasks share it (pipelined)."""

    def __init__(self, path: Path | str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.path = Path(path)
        self.timeout_s = timeout_s
        self._connection: _Connection | None = None
        self._connecting = asyncio.Lock()
        self._ids = itertools.count(1)
        self._closed = False

    def describe(self) -> str:
        return f"embedded cluster store at {self.path}"

    def _unreachable(self, why: object) -> ConnectionError:
        return ConnectionError(f"{self.describe()}: {why}")

    async def _connected(self) -> _Connection:
        if self._closed:
            raise self._unreachable("this backend is closed")
        connection = self._connection
        if connection is not None and connection.broken is None:
            return connection
        async with self._connecting:
            connection = self._connection
            if connection is not None and connection.broken is None:
                return connection
            try:
                async with asyncio.timeout(self.timeout_s):
                    reader, writer = await asyncio.open_unix_connection(str(self.path))
            except TimeoutError:
                raise self._unreachable(f"no connection within {self.timeout_s:g} s") from None
            except OSError as error:  # no such socket, refused (the supervisor is gone)
                raise self._unreachable(f"cannot connect ({error.strerror or error})") from None
            connection = _Connection(reader, writer)
            connection.reading = asyncio.create_task(self._read(connection))
            self._connection = connection
            return connection

    async def _read(self, connection: _Connection) -> None:
        """Hand each reply to its caller and each pushed message to its inbox, until the
        connection ends."""
        try:
            while True:
                header, blobs = await read_frame(connection.reader)
                if "push" in header:
                    self._deliver(connection, int(header["push"]), _message(header["message"]))
                    continue
                future = connection.pending.get(header.get("id", -1))
                if future is not None and not future.done():  # else: its caller gave up
                    future.set_result((header, blobs))
        except asyncio.CancelledError:
            connection.fail(self._unreachable("the connection was closed"))
            raise
        except (asyncio.IncompleteReadError, OSError):
            connection.fail(self._unreachable("the connection was lost (the store is gone)"))
        except (ProtocolError, KeyError, TypeError, ValueError) as error:
            connection.fail(self._unreachable(f"a malformed frame from the store ({error})"))

    def _deliver(self, connection: _Connection, listen_id: int, message: Message) -> None:
        listener = connection.listeners.get(listen_id)
        if listener is None:
            return  # that listen ended while the message was on its way: lost, senders retry
        try:
            delivered = listener[0](message)
        except Exception:
            logger.exception("%s: an inbox failed on %s", self.describe(), message)
            return
        if delivered is not None:  # run apart: it may itself call the store
            task = asyncio.ensure_future(_awaited(delivered))
            connection.deliveries.add(task)
            task.add_done_callback(connection.deliveries.discard)

    async def _call(
        self, op: str, arguments: Header, blobs: Sequence[bytes] = ()
    ) -> tuple[Any, list[bytes]]:
        """Send one request and wait for its reply: (result, reply blobs)."""
        connection = await self._connected()
        request_id = next(self._ids)
        future: asyncio.Future[tuple[Header, list[bytes]]] = (
            asyncio.get_running_loop().create_future()
        )
        connection.pending[request_id] = future
        try:
            connection.writer.write(encode({"id": request_id, "op": op, **arguments}, blobs))
            async with asyncio.timeout(self.timeout_s):
                await connection.writer.drain()
                header, reply_blobs = await future
        except TimeoutError:
            raise self._unreachable(f"no reply to {op} within {self.timeout_s:g} s") from None
        except OSError as error:  # the connection failed (this write, or the reader saw it)
            connection.fail(self._unreachable(f"the connection was lost ({error})"))
            raise ConnectionError(str(connection.broken)) from None
        finally:
            connection.pending.pop(request_id, None)
            if future.done() and not future.cancelled():
                future.exception()  # retrieved: a failure that raced a cancel is not logged
        if "error" in header:
            raise RuntimeError(f"{self.describe()} refused {op}: {header['error']}")
        return header.get("result"), reply_blobs

    async def register(self, replica: str, lease_s: float) -> None:
        await self._call("register", {"replica": replica, "lease_s": lease_s})

    async def renew(self, replica: str, lease_s: float) -> bool:
        result, _ = await self._call("renew", {"replica": replica, "lease_s": lease_s})
        return bool(result)

    async def leave(self, replica: str) -> None:
        await self._call("leave", {"replica": replica})

    async def create(self, key: str, replica: str, blob: bytes, ttl_s: float) -> int | None:
        arguments = {"key": key, "replica": replica, "ttl_s": ttl_s}
        result, _ = await self._call("create", arguments, [blob])
        return None if result is None else int(result)

    async def acquire(self, key: str, replica: str, ttl_s: float) -> Claimed | HeldBy | None:
        arguments = {"key": key, "replica": replica, "ttl_s": ttl_s}
        result, blobs = await self._call("acquire", arguments)
        if result is None:
            return None
        if "held_by" in result:
            return HeldBy(str(result["held_by"]))
        return Claimed(epoch=int(result["epoch"]), blob=blobs[0], released=bool(result["released"]))

    async def write(self, writes: Sequence[Write], ttl_s: float) -> list[bool]:
        blobs: list[bytes] = []
        described = []
        for w in writes:
            index = None
            if w.blob is not None:
                index = len(blobs)
                blobs.append(w.blob)
            described.append(
                {"key": w.key, "replica": w.replica, "epoch": w.epoch, "blob": index,
                 "release": w.release}
            )  # fmt: skip
        result, _ = await self._call("write", {"writes": described, "ttl_s": ttl_s}, blobs)
        return [bool(landed) for landed in result]

    async def delete(self, key: str, replica: str, epoch: int) -> bool:
        result, _ = await self._call("delete", {"key": key, "replica": replica, "epoch": epoch})
        return bool(result)

    async def send(self, replica: str, message: Message) -> None:
        await self._call("send", {"replica": replica, "message": _message_data(message)})

    async def listen(self, replica: str, inbox: Inbox) -> None:
        """Deliver ``replica``'s messages to ``inbox`` until cancelled; raises ConnectionError if
        the connection to the store drops (listen again: the next call reconnects)."""
        connection = await self._connected()
        listen_id = next(self._ids)
        ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        connection.listeners[listen_id] = (inbox, ended)
        try:
            await self._call("listen", {"replica": replica, "listen": listen_id})
            try:
                await ended  # until cancelled, or the connection fails it
            except ConnectionError:
                raise ConnectionError(str(connection.broken)) from None
        finally:
            connection.listeners.pop(listen_id, None)
            if connection.broken is None and not connection.writer.is_closing():
                # Its reply is not awaited (this task may be cancelled): the server unregisters
                # the inbox in order, before any later request of this connection.
                frame = encode({"id": next(self._ids), "op": "unlisten", "listen": listen_id})
                connection.writer.write(frame)

    async def close(self) -> None:
        """Close the connection; calls in flight and listeners get ConnectionError."""
        self._closed = True
        connection, self._connection = self._connection, None
        if connection is None:
            return
        connection.fail(self._unreachable("this backend is closed"))
        if connection.reading is not None:
            connection.reading.cancel()
            await asyncio.gather(connection.reading, return_exceptions=True)
        with contextlib.suppress(OSError):
            await connection.writer.wait_closed()


async def _awaited(delivered: Awaitable[None]) -> None:
    try:
        await delivered
    except Exception:
        logger.exception("an inbox failed on a message of the embedded cluster store")


def _conforms(backend: SocketBackend) -> ClusterBackend:
    return backend  # mypy checks that SocketBackend implements the whole protocol
