"""Which asyncio event loop runs a server: the standard one or uvloop (a libuv loop).

The choice is a pure function (:func:`loop_factory`) so it is testable; ``auto`` takes uvloop when
it is installed, because it costs less CPU per gRPC message (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
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


def run(main: Coroutine[Any, Any, None], choice: EventLoopChoice) -> None:
    """Run ``main`` to completion on a new loop of the chosen kind."""
    run_to_result(main, choice)


def run_to_result(main: Coroutine[Any, Any, T], choice: EventLoopChoice) -> T:
    """Like :func:`run`, returning ``main``'s result."""
    with asyncio.Runner(loop_factory=loop_factory(choice)) as runner:
        return runner.run(main)
