"""Hybrid logical clock (Kulkarni, Demirbas et al., 2014). Pure: no I/O.

A hybrid logical clock issues timestamps that stay close to physical time,
never go backwards even when the physical clock does, and, merged with the
timestamps a node receives, respect causality: anything stamped after
seeing a message orders after that message.
"""

from __future__ import annotations

from collections.abc import Callable

from ._errors import InvalidRecord
from ._models import HybridTimestamp

__all__ = ["HybridLogicalClock"]

_MAX_LOGICAL = 0xFFFF


class HybridLogicalClock:
    """Issues and merges `HybridTimestamp`s.

    Args:
        physical_ms: Returns the current physical time in milliseconds since
            the epoch (for example from `ClockSync.now_ms`).
        max_drift: Seconds: a received timestamp further than this ahead of
            the physical clock is refused rather than merged, so one peer
            with a wild clock cannot drag everyone's timestamps into the
            future.
    """

    def __init__(
        self, physical_ms: Callable[[], int], *, max_drift: float = 60.0
    ) -> None:
        self._physical_ms = physical_ms
        self._max_drift_ms = int(max_drift * 1000)
        self._last = HybridTimestamp(physical_ms=0, logical=0)

    @property
    def last(self) -> HybridTimestamp:
        """The latest timestamp issued or merged."""
        return self._last

    def now(self) -> HybridTimestamp:
        """A new timestamp for a local event (a post, a follow, ...)."""
        return self._advance(self._last, self._physical_ms())

    def observe(
        self, remote: HybridTimestamp, *, trusted: bool = False
    ) -> HybridTimestamp:
        """Merge a timestamp received from another node.

        Args:
            remote: The timestamp received.
            trusted: Skip the drift check: `remote` comes from a trusted
                source, such as a record this user signed earlier elsewhere.

        Returns:
            The clock's new timestamp, which orders after `remote`.

        Raises:
            InvalidRecord: `remote` is more than `max_drift` seconds ahead of the
                physical clock; the clock is left unchanged.
        """
        physical = self._physical_ms()
        if not trusted and remote.physical_ms > physical + self._max_drift_ms:
            raise InvalidRecord(
                f"timestamp {remote.physical_ms - physical} ms in the future"
            )
        return self._advance(max(self._last, remote), physical)

    def _advance(self, floor: HybridTimestamp, physical: int) -> HybridTimestamp:
        """The smallest timestamp after `floor` whose physical part >= `physical`."""
        if physical > floor.physical_ms:
            stamp = HybridTimestamp(physical_ms=physical, logical=0)
        elif floor.logical < _MAX_LOGICAL:
            stamp = HybridTimestamp(
                physical_ms=floor.physical_ms, logical=floor.logical + 1
            )
        else:  # 65,536 events in one millisecond: borrow the next one
            stamp = HybridTimestamp(physical_ms=floor.physical_ms + 1, logical=0)
        self._last = stamp
        return stamp
