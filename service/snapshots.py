"""Durable session state: the snapshot format and where snapshots are kept.

One snapshot holds every session of one model version: a fixed magic, a JSON header, the state
tensors as raw little-endian float32, and the sha256 of all of that. The header names the model and
its sha256, so a snapshot is never restored into a different model; the trailing sha256 covers every
byte, header included, so a truncated or altered file is detected (:class:`CorruptSnapshot`)
instead of being loaded. Format 1 snapshots (checksummed payload only) are still read.

Backends keep one blob per model version: :class:`DirectorySnapshots` (the default: a file,
replaced atomically) and :class:`RedisSnapshots` (one key, replaced by a single ``SET``).
This module knows nothing of gRPC or of the engine.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

MAGIC = b"RNNSNAP\x02"  # format 2: a sha256 of every byte before it ends the blob
MAGIC_V1 = b"RNNSNAP\x01"  # format 1 (rnnserve 0.1 round 1): only the payload was checksummed
FORMAT_VERSION = 2
_HEADER_LENGTH = struct.Struct("<Q")
_DIGEST_BYTES = 32


class CorruptSnapshot(ValueError):
    """A snapshot that cannot be trusted: wrong magic, checksum mismatch, unreadable header."""


@dataclass(frozen=True)
class SessionRecord:
    session_id: str
    steps: int
    owner: str
    last_output: np.ndarray | None = None  # [rows, outputs]: the reply to the last chunk
    client: str = ""  # what per-client limits count (kept so limits survive a restart)
    incarnation: str = ""  # "" in format 1 snapshots: a new one is drawn on restore
    confirmed: bool = False  # captured idle by a graceful shutdown: no later step can exist
    # Why a pipelined (KServe) sequence cannot go on until a START or a stated step count
    # (service.session.break_sequence); None: it can. Kept so that a restart or a move to
    # another replica does not mend it.
    broken: str | None = None


@dataclass(frozen=True)
class ModelSnapshot:
    """The sessions of one model version at one moment, and their states.

    ``states[k]`` has shape [pre, len(sessions), post] (a state as stored, service/signature.py);
    column ``i`` belongs to ``sessions[i]``. The last replies travel in the payload after the states. ``final``: written
    by a graceful shutdown, after which the server applied nothing more.
    """

    model: str
    version: str
    model_sha256: str
    created_unix_s: float
    sessions: list[SessionRecord]
    states: list[np.ndarray]
    final: bool = False

    @property
    def key(self) -> str:
        return snapshot_key(self.model, self.version)


def snapshot_key(model: str, version: str) -> str:
    return f"{model}/{version}"


def encode(snapshot: ModelSnapshot) -> bytes:
    """Magic, header length, JSON header, payload (states, then last replies), and the sha256 of
    all of it: one flipped bit anywhere, header included, is detected."""
    outputs = [r.last_output for r in snapshot.sessions if r.last_output is not None]
    output_size = outputs[0].shape[1] if outputs else 0
    payload = b"".join(
        np.ascontiguousarray(a, dtype="<f4").tobytes() for a in [*snapshot.states, *outputs]
    )
    layers, _, hidden = snapshot.states[0].shape if snapshot.states else (0, 0, 0)
    stored = [[int(s.shape[0]), int(s.shape[2])] for s in snapshot.states]  # [pre, post] each
    header = {
        "format": FORMAT_VERSION,
        "model": snapshot.model,
        "version": snapshot.version,
        "model_sha256": snapshot.model_sha256,
        "created_unix_s": snapshot.created_unix_s,
        "final": snapshot.final,
        "state_count": len(snapshot.states),
        "layers": layers,
        "hidden": hidden,
        "state_shapes": stored,
        "output_size": output_size,
        "sessions": [_entry(r) for r in snapshot.sessions],
        "payload_bytes": len(payload),
    }
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    body = MAGIC + _HEADER_LENGTH.pack(len(header_bytes)) + header_bytes + payload
    return body + hashlib.sha256(body).digest()


def _entry(r: SessionRecord) -> list[str | int | None]:
    rows = 0 if r.last_output is None else len(r.last_output)
    entry: list[str | int | None] = [
        r.session_id, r.steps, r.owner, rows, r.client, r.incarnation, int(r.confirmed)
    ]  # fmt: skip
    if r.broken is not None:  # (an eighth field, only when set: older readers ignore it)
        entry.append(r.broken)
    return entry


def decode(blob: bytes) -> ModelSnapshot:
    """The snapshot in ``blob``; raises :class:`CorruptSnapshot` if anything does not add up."""
    try:
        return _decode(blob)
    except CorruptSnapshot:
        raise
    except (KeyError, IndexError, TypeError, ValueError, struct.error) as error:
        raise CorruptSnapshot(f"malformed header: {type(error).__name__}: {error}") from None


def _decode(blob: bytes) -> ModelSnapshot:
    if blob.startswith(MAGIC):
        if len(blob) < len(MAGIC) + _HEADER_LENGTH.size + _DIGEST_BYTES:
            raise CorruptSnapshot("truncated before its header")
        body, digest = blob[:-_DIGEST_BYTES], blob[-_DIGEST_BYTES:]
        if hashlib.sha256(body).digest() != digest:
            raise CorruptSnapshot("sha256 does not match its content (truncated or altered)")
    elif blob.startswith(MAGIC_V1):
        body = blob
    else:
        raise CorruptSnapshot("not an rnnserve snapshot (bad magic)")
    offset = len(MAGIC) + _HEADER_LENGTH.size
    if len(body) < offset:
        raise CorruptSnapshot("truncated before its header")
    (header_length,) = _HEADER_LENGTH.unpack_from(body, len(MAGIC))
    try:
        header: dict[str, Any] = json.loads(body[offset : offset + header_length])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorruptSnapshot(f"unreadable header: {error}") from None
    expected_format = FORMAT_VERSION if body is not blob else 1
    if header.get("format") != expected_format:
        raise CorruptSnapshot(f"unknown snapshot format {header.get('format')!r}")
    payload = body[offset + header_length :]
    if len(payload) != header["payload_bytes"]:
        raise CorruptSnapshot(
            f"payload is {len(payload)} bytes, the header says {header['payload_bytes']} (truncated?)"
        )
    if expected_format == 1 and hashlib.sha256(payload).hexdigest() != header["payload_sha256"]:
        raise CorruptSnapshot("payload sha256 does not match the header (altered on disk?)")
    return _contents(header, payload)


def _contents(header: dict[str, Any], payload: bytes) -> ModelSnapshot:
    entries = header["sessions"]
    count = int(header["state_count"])
    stored = header.get("state_shapes") or [[header["layers"], header["hidden"]]] * count
    if len(stored) != count:
        raise CorruptSnapshot("state_shapes does not match state_count")
    shapes = [(int(pre), len(entries), int(post)) for pre, post in stored]
    sizes = [4 * int(np.prod(shape)) for shape in shapes]
    output_size = int(header["output_size"])
    rows = [int(e[3]) for e in entries]
    if sum(sizes) + 4 * output_size * sum(rows) != len(payload):
        raise CorruptSnapshot("payload size does not match the sessions and tensor sizes")
    states, offset = [], 0
    for shape, size in zip(shapes, sizes, strict=True):
        states.append(
            np.frombuffer(payload, "<f4", count=size // 4, offset=offset).reshape(shape).copy()
        )
        offset += size
    sessions = []
    for entry, n in zip(entries, rows, strict=True):
        session_id, steps, owner = str(entry[0]), int(entry[1]), str(entry[2])
        client, incarnation, confirmed = (*entry[4:7],) if len(entry) >= 7 else (owner, "", 0)
        broken = str(entry[7]) if len(entry) >= 8 and entry[7] is not None else None
        last = None
        if n:
            count = n * output_size
            last = np.frombuffer(payload, "<f4", count=count, offset=offset).reshape(n, -1).copy()
            offset += 4 * count
        record = SessionRecord(
            session_id, steps, owner, last, str(client), str(incarnation), bool(confirmed), broken
        )
        sessions.append(record)
    return ModelSnapshot(
        model=header["model"],
        version=header["version"],
        model_sha256=header["model_sha256"],
        created_unix_s=float(header["created_unix_s"]),
        sessions=sessions,
        states=states,
        final=bool(header.get("final", False)),
    )


class SnapshotBackend(Protocol):
    """Where snapshot blobs live. Called from a worker thread, one call at a time."""

    def write(self, key: str, blob: bytes) -> None:
        """Replace the blob of ``key`` atomically: a reader sees the old one or the new one."""

    def read(self, key: str) -> bytes | None:
        """The blob of ``key``, or None if there is none."""

    def quarantine(self, key: str) -> str:
        """Move a corrupt blob aside (kept for inspection, never read again); say where."""

    def describe(self) -> str: ...


class DirectorySnapshots:
    """``<root>/<model>/<version>.snapshot`` files, written to a temporary file, fsynced, and
    renamed over the old one (then the directory is fsynced), so a crash at any moment leaves
    either the previous snapshot or the new one, never half of one."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, key: str) -> Path:
        return self.root / f"{key}.snapshot"

    def write(self, key: str, blob: bytes) -> None:
        path = self.path(key)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # session state: the owner's
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(temporary, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, path)
        except BaseException:
            # A half-written file would keep a full disk full: the next try must find the space.
            temporary.unlink(missing_ok=True)
            raise
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def read(self, key: str) -> bytes | None:
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            return None

    def quarantine(self, key: str) -> str:
        path = self.path(key)
        target = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        os.replace(path, target)
        return str(target)

    def describe(self) -> str:
        return f"directory {self.root}"


class RedisSnapshots:
    """One Redis key per model version (``<prefix><model>/<version>``), replaced by one SET.

    A Redis that cannot be reached (refused, down, silent for ``timeout_s`` on a connect or a
    reply) raises the builtin :class:`ConnectionError` naming the URL (never its password), at
    start-up and while serving alike: no call waits longer than the timeout per attempt.
    """

    def __init__(
        self, url: str, prefix: str = "rnnserve:snapshot:", timeout_s: float = 5.0
    ) -> None:
        try:
            import redis
        except ImportError as error:
            raise ModuleNotFoundError(
                "snapshot_backend=redis needs the redis package (a dependency of rnnserve): "
                "pip install 'redis>=5'"
            ) from error
        self.url = url
        self.prefix = prefix
        self.client = redis.Redis.from_url(
            url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s
        )
        self._unreachable = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)

    @property
    def where(self) -> str:
        """The URL without its user, password and query: safe to log and print."""
        scheme, separator, rest = self.url.partition("://")
        return scheme + separator + rest.rpartition("@")[2].partition("?")[0]

    def _unavailable(self, error: Exception) -> ConnectionError:
        return ConnectionError(f"snapshot backend Redis at {self.where} is unavailable ({error})")

    def write(self, key: str, blob: bytes) -> None:
        try:
            self.client.set(self.prefix + key, blob)
        except self._unreachable as error:
            raise self._unavailable(error) from error

    def read(self, key: str) -> bytes | None:
        try:
            value = self.client.get(self.prefix + key)
        except self._unreachable as error:
            raise self._unavailable(error) from error
        if value is None:
            return None
        if not isinstance(value, bytes):  # only with decode_responses, which we never set
            raise TypeError(f"Redis returned {type(value).__name__} for a snapshot")
        return value

    def quarantine(self, key: str) -> str:
        target = f"{self.prefix}{key}:corrupt-{int(time.time())}"
        try:
            self.client.rename(self.prefix + key, target)
        except self._unreachable as error:
            raise self._unavailable(error) from error
        return target

    def describe(self) -> str:
        return f"redis {self.url.split('@')[-1]}"  # never log a password from the URL
