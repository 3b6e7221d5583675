"""The chunk checks of the hot path: the finite-values check and the chunk decoder's fast path
must reject exactly what the general paths reject; no shape a client sends reaches numpy unless
numpy can take it."""

from __future__ import annotations

import numpy as np
import pytest

from service.api.tensors import MAX_DIMENSION, MAX_ELEMENTS, decode_float32, from_floats
from service.chunks import SUMMED_IN_PYTHON_BELOW, all_finite
from service.errors import InvalidArgument

SIZES = [1, 2, SUMMED_IN_PYTHON_BELOW - 1, SUMMED_IN_PYTHON_BELOW, 4096]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_one_bad_value_anywhere_is_caught(size: int, bad: float) -> None:
    for where in {0, size // 2, size - 1}:
        x = np.ones((size, 1), np.float32)
        x[where, 0] = bad
        assert not all_finite(x)


@pytest.mark.parametrize("size", SIZES)
def test_finite_values_pass_even_when_their_float32_sum_overflows(size: int) -> None:
    big = np.full((size, 2), np.finfo(np.float32).max, np.float32)
    assert all_finite(big)
    assert all_finite(np.zeros((size, 2), np.float32))


@pytest.mark.parametrize("size", SIZES)
def test_infinities_that_cancel_are_caught(size: int) -> None:
    x = np.zeros((size, 2), np.float32)
    x[0, 0], x[-1, 1] = np.inf, -np.inf
    assert not all_finite(x)


def test_the_chunk_decoder_fast_path_checks_what_the_general_path_checks() -> None:
    data = np.arange(6, dtype="<f4").tobytes()
    np.testing.assert_array_equal(decode_float32([3, 2], data), np.arange(6).reshape(3, 2))
    assert decode_float32([0, 2], b"").shape == (0, 2)
    for shape, payload in (([3, 2], data[:-4]), ([-3, -2], data), ([2, 2], data)):
        with pytest.raises(InvalidArgument):
            decode_float32(shape, payload)


# Each holds no values, but numpy refuses all of them (ValueError): they must not reach it.
SHAPES_NUMPY_REFUSES = [[2**62, 0], [2**62, 2**62, 0], [0, 2**62], [2**63 - 1, 0],
                        [2**30, 2**30, 2**30, 0], [2**40, 2**40, 0]]  # fmt: skip


@pytest.mark.parametrize("shape", [*SHAPES_NUMPY_REFUSES, [2**31, 0], [-1, 0], [1] * 9], ids=str)
def test_a_shape_out_of_bounds_is_invalid_argument_for_both_decoders(shape: list[int]) -> None:
    for decode in (lambda: decode_float32(shape, b"", "x"), lambda: from_floats(shape, [], "x")):
        with pytest.raises(InvalidArgument, match="x has an invalid shape"):
            decode()


@pytest.mark.parametrize("shape", SHAPES_NUMPY_REFUSES, ids=str)
def test_the_shapes_refused_are_ones_numpy_refuses(shape: list[int]) -> None:
    with pytest.raises(ValueError):
        np.frombuffer(b"", np.float32).reshape(shape)


def test_the_largest_empty_shapes_within_bounds_decode() -> None:
    for shape in ([MAX_DIMENSION, 0], [MAX_ELEMENTS, 1, 0], [46341, 46340, 0, 0]):
        assert decode_float32(shape, b"").shape == tuple(shape)
        assert from_floats(shape, []).shape == tuple(shape)


def test_a_shape_of_a_huge_rank_is_refused_in_a_short_message() -> None:
    with pytest.raises(InvalidArgument) as info:
        decode_float32([1] * 100_000, b"", "input")
    assert info.value.message == "input has an invalid shape of rank 100000; at most 8 dimensions"
