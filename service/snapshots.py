"""Durable session state: the snapshot format and where snapshots are kept.

One snapshot holds every session of one model version: a fixed magic, a JSON header and the state
tensors as raw little-endian float32. The header names the model and its sha256, so a snapshot is
never restored into a different model, and carries the sha256 of the payload, so a truncated or
altered file is detected (:class:`CorruptSnapshot`) instead of being loaded.

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

MAGIC = b"RNNSNAP\x01"
FORMAT_VERSION = 1
_HEADER_LENGTH = struct.Struct("<Q")


class CorruptSnapshot(ValueError):
    """A snapshot that cannot be trusted: wrong magic, unreadable header, or payload mismatch."""


@dataclass(frozen=True)
class SessionRecord:
    session_id: str
    steps: int
    owner: str
    last_output: np.ndarray | None = None  # [rows, outputs]: the reply to the last chunk


@dataclass(frozen=True)
class ModelSnapshot:
    """The sessions of one model version at one moment, and their states.

    ``states[k]`` has shape [layers, len(sessions), hidden]; column ``i`` belongs to
    ``sessions[i]``. The last replies travel in the payload after the states.
    """

    model: str
    version: str
    model_sha256: str
    created_unix_s: float
    sessions: list[SessionRecord]
    states: list[np.ndarray]

    @property
    def key(self) -> str:
        return snapshot_key(self.model, self.version)


def snapshot_key(model: str, version: str) -> str:
    return f"{model}/{version}"


def encode(snapshot: ModelSnapshot) -> bytes:
    outputs = [r.last_output for r in snapshot.sessions if r.last_output is not None]
    output_size = outputs[0].shape[1] if outputs else 0
    payload = b"".join(
        np.ascontiguousarray(a, dtype="<f4").tobytes() for a in [*snapshot.states, *outputs]
    )
    layers, _, hidden = snapshot.states[0].shape if snapshot.states else (0, 0, 0)
    header = {
        "format": FORMAT_VERSION,
        "model": snapshot.model,
        "version": snapshot.version,
        "model_sha256": snapshot.model_sha256,
        "created_unix_s": snapshot.created_unix_s,
        "state_count": len(snapshot.states),
        "layers": layers,
        "hidden": hidden,
        "output_size": output_size,
        "sessions": [
            [r.session_id, r.steps, r.owner, 0 if r.last_output is None else len(r.last_output)]
            for r in snapshot.sessions
        ],
        "payload_bytes": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
    }
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    return MAGIC + _HEADER_LENGTH.pack(len(header_bytes)) + header_bytes + payload


def decode(blob: bytes) -> ModelSnapshot:
    """The snapshot in ``blob``; raises :class:`CorruptSnapshot` if anything does not add up."""
    try:
        return _decode(blob)
    except CorruptSnapshot:
        raise
    except (KeyError, IndexError, TypeError, ValueError, struct.error) as error:
        raise CorruptSnapshot(f"malformed header: {type(error).__name__}: {error}") from None


def _decode(blob: bytes) -> ModelSnapshot:
    if not blob.startswith(MAGIC):
        raise CorruptSnapshot("not an rnnserve snapshot (bad magic)")
    offset = len(MAGIC) + _HEADER_LENGTH.size
    if len(blob) < offset:
        raise CorruptSnapshot("truncated before its header")
    (header_length,) = _HEADER_LENGTH.unpack_from(blob, len(MAGIC))
    try:
        header: dict[str, Any] = json.loads(blob[offset : offset + header_length])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorruptSnapshot(f"unreadable header: {error}") from None
    if header.get("format") != FORMAT_VERSION:
        raise CorruptSnapshot(f"unknown snapshot format {header.get('format')!r}")
    payload = blob[offset + header_length :]
    if len(payload) != header["payload_bytes"]:
        raise CorruptSnapshot(
            f"payload is {len(payload)} bytes, the header says {header['payload_bytes']} (truncated?)"
        )
    if hashlib.sha256(payload).hexdigest() != header["payload_sha256"]:
        raise CorruptSnapshot("payload sha256 does not match the header (altered on disk?)")
    entries = header["sessions"]
    shape = (header["layers"], len(entries), header["hidden"])
    size = int(np.prod(shape)) * 4
    output_size = int(header["output_size"])
    rows = [int(e[3]) for e in entries]
    if size * header["state_count"] + 4 * output_size * sum(rows) != len(payload):
        raise CorruptSnapshot("payload size does not match the sessions and tensor sizes")
    states = [
        np.frombuffer(payload, "<f4", count=size // 4, offset=k * size).reshape(shape).copy()
        for k in range(header["state_count"])
    ]
    offset = size * header["state_count"]
    sessions = []
    for (session_id, steps, owner, _), n in zip(entries, rows, strict=True):
        last = None
        if n:
            count = n * output_size
            last = np.frombuffer(payload, "<f4", count=count, offset=offset).reshape(n, -1).copy()
            offset += 4 * count
        sessions.append(SessionRecord(str(session_id), int(steps), str(owner), last))
    return ModelSnapshot(
        model=header["model"],
        version=header["version"],
        model_sha256=header["model_sha256"],
        created_unix_s=float(header["created_unix_s"]),
        sessions=sessions,
        states=states,
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
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(temporary, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
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
    """One Redis key per model version (``<prefix><model>/<version>``), replaced by one SET."""

    def __init__(self, url: str, prefix: str = "rnnserve:snapshot:") -> None:
        try:
            import redis
        except ImportError as error:
            raise RuntimeError(
                "snapshot_backend=redis needs the redis package: pip install 'rnnserve[redis]'"
            ) from error
        self.url = url
        self.prefix = prefix
        self.client = redis.Redis.from_url(url)

    def write(self, key: str, blob: bytes) -> None:
        self.client.set(self.prefix + key, blob)

    def read(self, key: str) -> bytes | None:
        value = self.client.get(self.prefix + key)
        if value is None:
            return None
        if not isinstance(value, bytes):  # only with decode_responses, which we never set
            raise TypeError(f"Redis returned {type(value).__name__} for a snapshot")
        return value

    def quarantine(self, key: str) -> str:
        target = f"{self.prefix}{key}:corrupt-{int(time.time())}"
        self.client.rename(self.prefix + key, target)
        return target

    def describe(self) -> str:
        return f"redis {self.url.split('@')[-1]}"  # never log a password from the URL
