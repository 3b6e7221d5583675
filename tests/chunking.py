"""Chunk plans shared by the tests and the tritonclient probe (imports nothing from the service)."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import numpy as np


def chunk_spans(chunks: Sequence[int]) -> list[tuple[int, int]]:
    """(start, end) step ranges of consecutive chunks with the given lengths."""
    return list(pairwise(np.cumsum([0, *chunks]).tolist()))
