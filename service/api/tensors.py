"""Packed float32 tensors on the wire <-> numpy arrays, with the checks a client needs to see."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from service.errors import InvalidArgument

FLOAT32 = np.dtype("<f4")
MAX_RANK = 8


def decode_float32(shape: Sequence[int], data: bytes, what: str = "tensor") -> np.ndarray:
    """Little-endian float32 bytes of ``shape`` as a read-only array (no copy)."""
    dims = list(shape)
    if len(dims) > MAX_RANK or (dims and min(dims) < 0):
        raise InvalidArgument(f"{what} has an invalid shape {dims}")
    expected = 4 * math.prod(dims)
    if len(data) != expected:
        raise InvalidArgument(
            f"{what} of shape {dims} needs {expected} bytes of float32, got {len(data)}"
        )
    return np.frombuffer(data, dtype=FLOAT32).reshape(dims)


def from_floats(shape: Sequence[int], values: Sequence[float], what: str = "tensor") -> np.ndarray:
    dims = [int(d) for d in shape]
    if len(dims) > MAX_RANK or any(d < 0 for d in dims):
        raise InvalidArgument(f"{what} has an invalid shape {dims}")
    if len(values) != math.prod(dims):
        raise InvalidArgument(
            f"{what} of shape {dims} needs {math.prod(dims)} values, got {len(values)}"
        )
    return np.asarray(values, dtype=np.float32).reshape(dims)


def float32_bytes(array: np.ndarray) -> bytes:
    """Little-endian float32 bytes of ``array`` in C order; a float32 array is not converted."""
    return (array if array.dtype == FLOAT32 else array.astype(FLOAT32)).tobytes()


def encode_float32(array: np.ndarray) -> tuple[list[int], bytes]:
    """Shape and little-endian float32 bytes of ``array``."""
    return list(array.shape), float32_bytes(array)
