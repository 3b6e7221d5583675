"""Event loop choice: uvloop when asked or when 'auto' finds it, asyncio otherwise, a clear error
when uvloop is asked for by name and missing."""

from __future__ import annotations

import asyncio
import importlib.util
import sys

import pytest

from service import event_loop
from service.event_loop import EventLoopUnavailable, loop_factory


def test_asyncio_is_used_when_asked() -> None:
    assert loop_factory("asyncio") is asyncio.new_event_loop


def test_auto_and_uvloop_take_uvloop_when_installed() -> None:
    uvloop = pytest.importorskip("uvloop")  # a dependency on Linux; absent only elsewhere
    assert loop_factory("auto") is uvloop.new_event_loop
    assert loop_factory("uvloop") is uvloop.new_event_loop


def test_without_uvloop_auto_falls_back_and_uvloop_fails_clearly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        event_loop.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "uvloop" else real_find_spec(name, *a),
    )
    assert loop_factory("auto") is asyncio.new_event_loop
    with pytest.raises(EventLoopUnavailable, match="RNNSERVE_EVENT_LOOP=asyncio"):
        loop_factory("uvloop")


def test_run_completes_the_coroutine_on_the_chosen_loop() -> None:
    seen: list[str] = []

    async def main() -> None:
        seen.append(type(asyncio.get_running_loop()).__module__)

    event_loop.run(main(), "asyncio")
    assert seen and seen[0].startswith("asyncio")


def test_run_sets_the_gil_switch_interval_it_is_given() -> None:
    before = sys.getswitchinterval()

    async def main() -> float:
        return sys.getswitchinterval()

    try:
        assert event_loop.run_to_result(main(), "asyncio", 0.00025) == pytest.approx(0.00025)
        assert event_loop.run_to_result(main(), "asyncio") == pytest.approx(0.00025)  # kept
    finally:
        sys.setswitchinterval(before)
