"""ClockSync against NTP responders on 127.0.0.1 with known skews."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

import p2ptimeline as pt
from p2ptimeline.testing import NtpServer, eventually

TOLERANCE = 0.05  # seconds; loopback round trips are well under this


async def test_measures_the_skew_of_one_server() -> None:
    """The offset measured against a server 2.5 s ahead is about +2.5 s."""
    async with NtpServer(skew=2.5) as ntp:
        clock = pt.ClockSync(servers=[ntp.address], timeout=1.0)
        offset = await clock.sync()
    assert offset == pytest.approx(2.5, abs=TOLERANCE)
    assert clock.offset == offset
    assert clock.synced
    assert clock.now() == pytest.approx(time.time() + 2.5, abs=TOLERANCE)
    assert abs(clock.now_ms() - int((time.time() + 2.5) * 1000)) < 1000 * TOLERANCE


async def test_negative_skew() -> None:
    """A server behind the local clock gives a negative offset."""
    async with NtpServer(skew=-90.0) as ntp:
        clock = pt.ClockSync(servers=[ntp.address])
        assert await clock.sync() == pytest.approx(-90.0, abs=TOLERANCE)


async def test_takes_the_median_of_several_servers() -> None:
    """With three servers, one of them wildly off, the median wins."""
    async with (
        NtpServer(skew=1.0) as a,
        NtpServer(skew=1.2) as b,
        NtpServer(skew=3600.0) as c,
    ):
        clock = pt.ClockSync(servers=[a.address, b.address, c.address])
        assert await clock.sync() == pytest.approx(1.2, abs=TOLERANCE)


async def test_silent_servers_are_skipped() -> None:
    """Servers that do not answer are ignored if another one answers."""
    async with NtpServer(skew=0.7) as good, NtpServer() as silent:
        silent.answer = False
        clock = pt.ClockSync(servers=[silent.address, good.address], timeout=0.2)
        assert await clock.sync() == pytest.approx(0.7, abs=TOLERANCE)
        assert silent.requests == 1


async def test_falls_back_to_zero_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """When no server answers the offset is 0 and a warning is logged."""
    async with NtpServer(skew=5.0) as ntp:
        clock = pt.ClockSync(servers=[ntp.address])
        await clock.sync()
        assert clock.offset == pytest.approx(5.0, abs=TOLERANCE)
        ntp.answer = False
        clock.timeout = 0.2
        with caplog.at_level(logging.WARNING, logger="p2ptimeline"):
            assert await clock.sync() == 0.0
    assert not clock.synced
    assert "no NTP server answered" in caplog.text


async def test_no_servers_means_local_clock() -> None:
    """An empty server list keeps offset 0 without asking anyone."""
    clock = pt.ClockSync(servers=[])
    assert await clock.sync() == 0.0
    assert not clock.synced


async def test_custom_time_source_is_corrected() -> None:
    """With a local clock 30 s slow, the offset corrects it to the server's time."""
    async with NtpServer(skew=0.0) as ntp:
        clock = pt.ClockSync(
            servers=[ntp.address], time_source=lambda: time.time() - 30
        )
        assert await clock.sync() == pytest.approx(30.0, abs=TOLERANCE)
        assert clock.now() == pytest.approx(time.time(), abs=TOLERANCE)


async def test_periodic_refresh_starts_and_stops() -> None:
    """start() syncs repeatedly, following a changing server; stop() ends it."""
    async with NtpServer(skew=1.0) as ntp:
        clock = pt.ClockSync(servers=[ntp.address])
        clock.start(interval=0.05)
        try:
            await eventually(lambda: ntp.requests >= 2)
            ntp.skew = 4.0
            await eventually(lambda: abs(clock.offset - 4.0) < TOLERANCE)
        finally:
            await clock.stop()
        seen = ntp.requests
        await clock.stop()  # idempotent
        await asyncio.sleep(0.2)  # no refresh may happen after stop()
        assert ntp.requests == seen


async def test_a_cancelled_stop_still_ends_the_refresh() -> None:
    """stop() cancelled while the refresh winds down still ends it (no sync
    after), and a later start() refreshes again."""
    async with NtpServer(skew=1.0) as ntp:
        clock = pt.ClockSync(servers=[ntp.address])
        clock.start(interval=0.05)
        await eventually(lambda: ntp.requests >= 1)
        stopping = asyncio.create_task(clock.stop())
        await asyncio.sleep(0)  # stop() has cancelled the refresh, and waits
        stopping.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stopping
        await clock.stop()
        seen = ntp.requests
        await asyncio.sleep(0.2)  # several intervals: no refresh may happen
        assert ntp.requests == seen
        clock.start(interval=0.05)
        try:
            await eventually(lambda: ntp.requests >= seen + 2)
        finally:
            await clock.stop()
