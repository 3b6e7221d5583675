"""The chunk checks of the hot path: the finite-values check and the chunk decoder's fast path
must reject exactly what the general paths reject."""

from __future__ import annotations

import numpy as np
import pytest

from service.api.tensors import decode_float32
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
