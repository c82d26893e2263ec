"""Wall-clock correction from NTP servers."""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections.abc import Callable, Sequence

import ntplib

from ._ratelog import RateLimitedLog
from ._tasks import Tasks, every

__all__ = ["DEFAULT_NTP_SERVERS", "ClockSync"]

log = logging.getLogger("p2ptimeline.clock")

DEFAULT_NTP_SERVERS: tuple[tuple[str, int], ...] = (("pool.ntp.org", 123),)
"""Servers `ClockSync` asks when given none."""


class ClockSync:
    """Keeps the offset between the local clock and NTP time.

    `sync()` asks every server at once (in worker threads, since `ntplib`
    blocks) and keeps the median of the offsets of those that answered; when
    none answers it falls back to offset 0 and logs a warning. `now()` is the
    local clock corrected by that offset.

    Args:
        servers: ``(host, port)`` of the NTP servers to ask. An empty sequence
            means "trust the local clock": `sync()` then does nothing.
        timeout: Seconds to wait for each server.
        time_source: The local clock (seconds since the epoch); a parameter so
            tests can skew it.
    """

    def __init__(
        self,
        servers: Sequence[tuple[str, int]] = DEFAULT_NTP_SERVERS,
        timeout: float = 1.0,
        *,
        time_source: Callable[[], float] = time.time,
    ) -> None:
        self.servers = tuple(servers)
        self.timeout = timeout
        self._time_source = time_source
        self._offset = 0.0
        self._synced = False
        self._refresher = Tasks(log)

    @property
    def offset(self) -> float:
        """Seconds to add to the local clock to get NTP time."""
        return self._offset

    @property
    def synced(self) -> bool:
        """Whether the last `sync()` heard from at least one server."""
        return self._synced

    def now(self) -> float:
        """The corrected time, in seconds since the epoch."""
        return self._time_source() + self._offset

    def now_ms(self) -> int:
        """The corrected time, in whole milliseconds since the epoch."""
        return int(self.now() * 1000)

    async def sync(self) -> float:
        """Ask the servers and update `offset`.

        Returns:
            The new offset in seconds (0.0 when no server answered).
        """
        if not self.servers:
            return self._offset
        answers = await asyncio.gather(*(self._ask(s) for s in self.servers))
        offsets = [offset for offset in answers if offset is not None]
        if offsets:
            self._offset = statistics.median(offsets)
            self._synced = True
            log.debug(
                "clock offset %+.3f s from %d server(s)", self._offset, len(offsets)
            )
        else:
            self._offset = 0.0
            self._synced = False
            log.warning("no NTP server answered; using the local clock uncorrected")
        return self._offset

    def start(self, interval: float = 600.0) -> None:
        """Sync now and then every `interval` seconds, until `stop()`.

        Does nothing if already refreshing.
        """
        if self._refresher.closed:  # stopped before: a new run
            self._refresher = Tasks(log)
        if not len(self._refresher):
            self._refresher.spawn(self._refresh(interval), name="NTP refresh")

    async def stop(self) -> None:
        """Stop the periodic refresh started by `start()`. Idempotent."""
        await self._refresher.close()

    async def _refresh(self, interval: float) -> None:
        ratelog = RateLimitedLog(log, interval)
        try:
            await self.sync()
        except Exception:  # a bug: the refresh goes on all the same
            log.exception("syncing the clock failed")
        await every(interval, self.sync, ratelog)

    async def _ask(self, server: tuple[str, int]) -> float | None:
        host, port = server
        try:
            async with asyncio.timeout(self.timeout + 1.0):
                return await asyncio.to_thread(self._query, host, port)
        except (OSError, ntplib.NTPException, TimeoutError) as exc:
            log.info("NTP server %s:%d did not answer: %s", host, port, exc)
            return None

    def _query(self, host: str, port: int) -> float:
        # ntplib computes the offset against time.time(); correct for the
        # difference when the local clock is a different source.
        skew = self._time_source() - time.time()
        stats = ntplib.NTPClient().request(
            host, version=3, port=port, timeout=self.timeout
        )
        return float(stats.offset) - skew
