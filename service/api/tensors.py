"""Packed float32 (and int64) tensors on the wire <-> numpy arrays, with the checks a client
needs to see.

A shape is checked in Python ints before numpy sees it: rank, sign, each dimension and the
element count are bounded, so no shape a client sends can make numpy raise (a zero dimension makes
a tensor empty, but numpy still refuses one whose other dimensions multiply past its index range).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from service.errors import InvalidArgument

FLOAT32 = np.dtype("<f4")
INT64 = np.dtype("<i8")
MAX_RANK = 8
MAX_DIMENSION = 2**31 - 1  # the longest any axis of a tensor can be
MAX_ELEMENTS = 2**31 - 1  # the product of a shape's non-zero dimensions


def checked_shape(shape: Sequence[int], what: str) -> tuple[list[int], int]:
    """``shape`` as a list of ints and its element count, or INVALID_ARGUMENT: at most
    ``MAX_RANK`` dimensions, each 0 to ``MAX_DIMENSION``, whose non-zero ones multiply to at
    most ``MAX_ELEMENTS``."""
    if len(shape) > MAX_RANK:
        raise InvalidArgument(
            f"{what} has an invalid shape of rank {len(shape)}; at most {MAX_RANK} dimensions"
        )
    dims = list(shape)
    if not dims:
        return dims, 1
    if min(dims) < 0:
        raise InvalidArgument(f"{what} has an invalid shape {dims}")
    if max(dims) > MAX_DIMENSION:
        raise InvalidArgument(
            f"{what} has an invalid shape {dims}: a dimension can be at most {MAX_DIMENSION}"
        )
    count = math.prod(dims)
    extent = count or math.prod(d for d in dims if d)  # what numpy bounds, even for no values
    if extent > MAX_ELEMENTS:
        raise InvalidArgument(
            f"{what} has an invalid shape {dims}: its non-zero dimensions multiply to more than "
            f"{MAX_ELEMENTS} elements"
        )
    return dims, count


def decode_float32(shape: Sequence[int], data: bytes, what: str = "tensor") -> np.ndarray:
    """Little-endian float32 bytes of ``shape`` as a read-only array (no copy)."""
    dims, count = checked_shape(shape, what)
    if len(data) != 4 * count:
        raise InvalidArgument(
            f"{what} of shape {dims} needs {4 * count} bytes of float32, got {len(data)}"
        )
    return np.frombuffer(data, dtype=FLOAT32).reshape(dims)


def decode_int64(shape: Sequence[int], data: bytes, what: str = "tensor") -> np.ndarray:
    """Little-endian int64 bytes of ``shape`` as a read-only array (no copy)."""
    dims, count = checked_shape(shape, what)
    if len(data) != 8 * count:
        raise InvalidArgument(
            f"{what} of shape {dims} needs {8 * count} bytes of int64, got {len(data)}"
        )
    return np.frombuffer(data, dtype=INT64).reshape(dims).astype(np.int64, copy=False)


def from_ints(shape: Sequence[int], values: Sequence[int], what: str = "tensor") -> np.ndarray:
    """``values`` (as many as ``shape`` holds, in C order) as an int64 array of ``shape``."""
    dims, count = checked_shape(shape, what)
    if len(values) != count:
        raise InvalidArgument(f"{what} of shape {dims} needs {count} values, got {len(values)}")
    return np.asarray(values, dtype=np.int64).reshape(dims)


def from_floats(shape: Sequence[int], values: Sequence[float], what: str = "tensor") -> np.ndarray:
    """``values`` (as many as ``shape`` holds, in C order) as a float32 array of ``shape``."""
    dims, count = checked_shape(shape, what)
    if len(values) != count:
        raise InvalidArgument(f"{what} of shape {dims} needs {count} values, got {len(values)}")
    return np.asarray(values, dtype=np.float32).reshape(dims)


def float32_bytes(array: np.ndarray) -> bytes:
    """Little-endian float32 bytes of ``array`` in C order; a float32 array is not converted."""
    return (array if array.dtype == FLOAT32 else array.astype(FLOAT32)).tobytes()


def encode_float32(array: np.ndarray) -> tuple[list[int], bytes]:
    """Shape and little-endian float32 bytes of ``array``."""
    return list(array.shape), float32_bytes(array)
