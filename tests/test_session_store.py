from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from service.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted
from service.session import EndReason
from service.session_store import INITIAL_CAPACITY, SessionStore


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_store(
    max_sessions: int = 1000, clock: FakeClock | None = None, **kw: object
) -> SessionStore:
    return SessionStore(
        state_count=2,
        layers=2,
        hidden=4,
        max_sessions=max_sessions,
        clock=clock or FakeClock(),
        **kw,
    )


def test_generated_ids_are_128_bit_hex_and_distinct() -> None:
    store = make_store()
    ids = {store.create().session_id for _ in range(200)}
    assert len(ids) == 200
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_new_session_starts_from_zero_state_even_in_a_reused_slot() -> None:
    store = make_store()
    first = store.create("a")
    store.scatter(np.array([first.slot]), [np.ones((2, 1, 4), np.float32)] * 2)
    store.end(first, EndReason.CLOSED)
    second = store.create("b")
    assert second.slot == first.slot
    assert all((s == 0).all() for s in store.read_state(second))


def test_initial_state_is_checked_and_applied() -> None:
    store = make_store()
    state = [np.full((2, 4), 0.5, np.float32), np.full((2, 4), -0.5, np.float32)]
    session = store.create("s", state)
    np.testing.assert_array_equal(store.read_state(session)[1], state[1])
    with pytest.raises(InvalidArgument, match="expected \\[2, 4\\]"):
        store.create("t", [np.zeros((4, 2), np.float32)] * 2)
    with pytest.raises(InvalidArgument, match="needs 2 tensors"):
        store.create("u", [np.zeros((2, 4), np.float32)])
    with pytest.raises(InvalidArgument, match="NaN"):
        store.create("v", [np.full((2, 4), np.nan, np.float32)] * 2)


def test_duplicate_unknown_and_malformed_ids() -> None:
    store = make_store()
    store.create("dup")
    with pytest.raises(AlreadyExists):
        store.create("dup")
    with pytest.raises(NotFound):
        store.get("missing")
    with pytest.raises(InvalidArgument):
        store.create("x" * 200)
    with pytest.raises(InvalidArgument):
        store.create("bad\nid")


def test_limit_on_sessions() -> None:
    store = make_store(max_sessions=3)
    for i in range(3):
        store.create(str(i))
    with pytest.raises(ResourceExhausted, match="limit of 3"):
        store.create("3")
    store.end(store.get("0"), EndReason.CLOSED)
    store.create("3")


def test_growth_keeps_every_state() -> None:
    store = make_store(max_sessions=10 * INITIAL_CAPACITY)
    sessions = [store.create(str(i)) for i in range(3 * INITIAL_CAPACITY)]
    assert store.capacity == 4 * INITIAL_CAPACITY
    for s in sessions[:INITIAL_CAPACITY]:
        store.scatter(np.array([s.slot]), [np.full((2, 1, 4), float(s.slot), np.float32)] * 2)
    store.create(
        "more"
    )  # no growth needed, but the early states must be intact after the growth above
    for s in sessions[:INITIAL_CAPACITY]:
        assert (store.read_state(s)[0] == s.slot).all()


def test_gather_and_scatter_touch_only_their_slots() -> None:
    store = make_store()
    a, b, c = (store.create(n) for n in "abc")
    slots = np.array([c.slot, a.slot])
    store.scatter(
        slots,
        [np.stack([np.full((2, 4), 3.0), np.full((2, 4), 1.0)], axis=1).astype(np.float32)] * 2,
    )
    assert (store.read_state(a)[0] == 1).all()
    assert (store.read_state(b)[0] == 0).all()
    assert (store.read_state(c)[0] == 3).all()
    gathered = store.gather(np.array([a.slot, c.slot]))
    assert gathered[0].shape == (2, 2, 4)
    assert gathered[0][0, 1, 0] == 3


def test_idle_expiry_skips_busy_sessions_and_reports_reasons() -> None:
    clock = FakeClock()
    ended: list[tuple[str, EndReason]] = []
    store = make_store(clock=clock, on_end=lambda s, r: ended.append((s.session_id, r)))
    idle = store.create("idle")
    busy = store.create("busy")
    busy.busy = True
    clock.now += 100
    fresh = store.create("fresh")
    assert store.expire_idle(ttl_s=50) == [idle]
    assert ended == [("idle", EndReason.IDLE_TIMEOUT)]
    assert busy.session_id in store.sessions and fresh.session_id in store.sessions


def test_close_while_busy_waits_for_the_chunk() -> None:
    ended: list[EndReason] = []
    store = make_store(on_end=lambda s, r: ended.append(r))
    session = store.create("s")
    session.busy = True
    store.end(session, EndReason.CLOSED)
    assert "s" in store.sessions and ended == []
    store.finish_chunk(session)
    assert "s" not in store.sessions and ended == [EndReason.CLOSED]
    assert session.ended == EndReason.CLOSED


def test_full_store_evicts_the_longest_idle_session_when_asked() -> None:
    clock = FakeClock()
    ended: list[tuple[str, EndReason]] = []
    store = make_store(
        max_sessions=3,
        clock=clock,
        evict_when_full=True,
        on_end=lambda s, r: ended.append((s.session_id, r)),
    )
    for name in ("old", "busy", "recent"):
        store.create(name)
        clock.now += 10
    store.get("busy").busy = True
    store.get("busy").last_used_s = 0.0  # the idlest by time, but it has a chunk in flight
    store.create("new")
    assert ended == [("old", EndReason.EVICTED)]
    assert set(store.sessions) == {"busy", "recent", "new"}
    for s in list(store.sessions.values()):
        s.busy = True
    with pytest.raises(ResourceExhausted):
        store.create("no room")  # nothing idle to evict


def test_an_idle_session_costs_little_beyond_its_state() -> None:
    """Python's allocations are deterministic for one interpreter version: here an idle session
    costs about 358 bytes beside its state (463 with a per-instance dict and a list each); its
    incarnation (a 63-bit int) and ``unconfirmed`` flag take 60 of them, its cluster fields
    (epoch, written incarnation, moving, on_idle) 24."""
    store = make_store(max_sessions=5000)
    state_before = store.state_bytes
    tracemalloc.start()
    try:
        for _ in range(2000):
            store.create()
        heap_bytes, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    per_session = (heap_bytes - (store.state_bytes - state_before)) / 2000
    assert per_session < 370, per_session


def test_end_listeners_are_added_on_demand_and_called_once() -> None:
    store = make_store()
    session = store.create("s")
    heard: list[EndReason] = []
    listener = lambda _s, reason: heard.append(reason)  # noqa: E731
    session.add_end_listener(listener)
    session.remove_end_listener(listener)
    session.remove_end_listener(listener)  # removing an absent listener is harmless
    session.add_end_listener(listener)
    store.end(session, EndReason.CLOSED)
    assert heard == [EndReason.CLOSED]
