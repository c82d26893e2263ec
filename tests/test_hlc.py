"""Hybrid logical clock: monotonic, close to physical time, causal."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import p2ptimeline as pt


class FakeClock:
    """A settable physical clock, in milliseconds."""

    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def ts(physical: int, logical: int = 0) -> pt.HybridTimestamp:
    return pt.HybridTimestamp(physical_ms=physical, logical=logical)


def test_follows_physical_time() -> None:
    """With a clock that moves forward, timestamps are the physical time."""
    clock = FakeClock(1000)
    hlc = pt.HybridLogicalClock(clock)
    assert hlc.now() == ts(1000)
    clock.ms = 1005
    assert hlc.now() == ts(1005)


def test_same_millisecond_bumps_logical() -> None:
    """Events within one millisecond get increasing logical counters."""
    hlc = pt.HybridLogicalClock(FakeClock(1000))
    assert [hlc.now() for _ in range(3)] == [ts(1000), ts(1000, 1), ts(1000, 2)]


def test_never_goes_back_when_physical_clock_does() -> None:
    """A physical clock stepping back does not make timestamps go back."""
    clock = FakeClock(5000)
    hlc = pt.HybridLogicalClock(clock)
    first = hlc.now()
    clock.ms = 1000
    second, third = hlc.now(), hlc.now()
    assert first < second < third
    assert second == ts(5000, 1)


def test_observe_orders_after_remote() -> None:
    """After observing a remote timestamp ahead of us, local events order after it."""
    hlc = pt.HybridLogicalClock(FakeClock(1000))
    merged = hlc.observe(ts(1500, 7))
    assert merged == ts(1500, 8)
    assert hlc.now() > ts(1500, 7)


def test_observe_old_remote_keeps_local_time() -> None:
    """An old remote timestamp does not pull the clock back."""
    clock = FakeClock(2000)
    hlc = pt.HybridLogicalClock(clock)
    hlc.now()
    assert hlc.observe(ts(10, 3)) == ts(2000, 1)


def test_far_future_remote_is_refused() -> None:
    """A remote timestamp beyond max_drift is refused and leaves the clock alone."""
    hlc = pt.HybridLogicalClock(FakeClock(1000), max_drift=0.5)
    hlc.now()
    with pytest.raises(pt.InvalidRecord, match="future"):
        hlc.observe(ts(1501))
    assert hlc.last == ts(1000)
    assert hlc.observe(ts(1500)) == ts(1500, 1)
    assert hlc.observe(ts(9999), trusted=True) == ts(9999, 1)


def test_logical_overflow_borrows_next_millisecond() -> None:
    """65,536 events in one millisecond still yield increasing timestamps."""
    hlc = pt.HybridLogicalClock(FakeClock(1000))
    assert hlc.observe(ts(1000, 0xFFFF)) == ts(1001, 0)
    assert hlc.now() == ts(1001, 1)


events = st.lists(
    st.one_of(
        st.tuples(st.just("tick"), st.integers(0, 10_000)),
        st.tuples(st.just("recv"), st.integers(0, 10_000), st.integers(0, 0xFFFF)),
    ),
    max_size=60,
)


@given(events)
def test_timestamps_strictly_increase_under_any_history(
    history: list[tuple[int, ...]],
) -> None:
    """Whatever the physical clock and the messages do, timestamps strictly increase."""
    clock = FakeClock(0)
    hlc = pt.HybridLogicalClock(clock, max_drift=10**6)
    previous = hlc.last
    for event in history:
        if event[0] == "tick":
            clock.ms = event[1]
            stamp = hlc.now()
        else:
            remote = ts(event[1], event[2])
            stamp = hlc.observe(remote)
            assert stamp > remote
        assert stamp > previous
        assert stamp.physical_ms >= clock.ms
        previous = stamp
