"""Which asyncio event loop runs a server: the standard one or uvloop (a libuv loop).

The choice is a pure function (:func:`loop_factory`) so it is testable; ``auto`` takes uvloop when
it is installed, because it costs less CPU per gRPC message (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import sys
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

logger = logging.getLogger(__name__)

EventLoopChoice = Literal["auto", "asyncio", "uvloop"]
T = TypeVar("T")


class EventLoopUnavailable(RuntimeError):
    """``uvloop`` was asked for by name but is not installed."""


def loop_factory(choice: EventLoopChoice) -> Callable[[], asyncio.AbstractEventLoop]:
    """A factory for the event loop ``choice`` names (for ``asyncio.Runner``)."""
    has_uvloop = importlib.util.find_spec("uvloop") is not None
    if choice == "uvloop" and not has_uvloop:
        raise EventLoopUnavailable(
            "event_loop=uvloop, but uvloop is not installed (pip install uvloop), "
            "or set RNNSERVE_EVENT_LOOP=asyncio"
        )
    if choice == "asyncio" or not has_uvloop:
        return asyncio.new_event_loop
    import uvloop

    return uvloop.new_event_loop


def run(
    main: Coroutine[Any, Any, None],
    choice: EventLoopChoice,
    gil_switch_interval_s: float | None = None,
) -> None:
    """Run ``main`` to completion on a new loop of the chosen kind (see :func:`run_to_result`)."""
    run_to_result(main, choice, gil_switch_interval_s)


def run_to_result(
    main: Coroutine[Any, Any, T],
    choice: EventLoopChoice,
    gil_switch_interval_s: float | None = None,
) -> T:
    """Like :func:`run`, returning ``main``'s result.

    Concurrency: ``gil_switch_interval_s`` (``sys.setswitchinterval``, process-wide) bounds how
    long a thread that wants the GIL waits while the loop thread runs Python. Two threads wait on
    the loop thread in a server: gRPC's completion-queue poller, which delivers every message, and
    the model worker, which needs the GIL back when onnxruntime returns. Python's default (5 ms)
    makes either wait up to 5 ms behind a busy loop; a shorter interval trades a little CPU for
    much lower tail latency (docs/PERFORMANCE.md).
    """
    if gil_switch_interval_s is not None:
        sys.setswitchinterval(gil_switch_interval_s)
    with asyncio.Runner(loop_factory=loop_factory(choice)) as runner:
        return runner.run(main)
