"""Log lines that a remote party can trigger, at a bounded rate.

A hostile peer can make us refuse, drop or close as often as it likes. Each
of those deserves a line in the log, but not thousands a second, and never a
traceback per frame. `RateLimitedLog` emits the first message of each kind
in an interval and counts the others; the count is told with the next
message of that kind that is emitted. A message is cut at `MAX_LINE`
characters. Pure bookkeeping: no asyncio, and the
clock is a parameter.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["MAX_LINE", "RateLimitedLog"]

MAX_LINE = 300
"""Most characters of a message kept: the rest is cut (remote data in a
message, such as an error's text, is bounded by what its sender sent)."""


class RateLimitedLog:
    """At most one message of each kind per `interval` seconds on `logger`.

    A kind is named by a `key`: a constant of the calling code, such as
    `"refused"`. Keys are remembered for good, so they must never be made of
    remote input (an address, a name): put that in the message arguments.

    Args:
        logger: Where emitted messages go.
        interval: Seconds between two messages of the same kind.
        clock: Monotonic seconds; `time.monotonic` unless testing.
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 10.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self._clock = clock
        self._next: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def debug(self, key: str, msg: str, *args: object) -> None:
        """Log `msg % args` at DEBUG, unless a `key` message was logged lately."""
        self._log(logging.DEBUG, key, msg, args)

    def info(self, key: str, msg: str, *args: object) -> None:
        """Log `msg % args` at INFO, unless a `key` message was logged lately."""
        self._log(logging.INFO, key, msg, args)

    def warning(self, key: str, msg: str, *args: object) -> None:
        """Log `msg % args` at WARNING, unless a `key` message was logged lately."""
        self._log(logging.WARNING, key, msg, args)

    def exception(self, key: str, msg: str, *args: object) -> None:
        """Log `msg % args` at ERROR with the traceback being handled, unless
        a `key` message was logged lately. Call it from an `except` block."""
        self._log(logging.ERROR, key, msg, args, exc_info=True)

    def suppressed(self, key: str) -> int:
        """How many `key` messages were dropped since the last one emitted."""
        return self._suppressed.get(key, 0)

    def _log(
        self,
        level: int,
        key: str,
        msg: str,
        args: tuple[object, ...],
        *,
        exc_info: bool = False,
    ) -> None:
        if not self.logger.isEnabledFor(level):
            return
        now = self._clock()
        if now < self._next.get(key, now):
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._next[key] = now + self.interval
        text = msg % args if args else msg
        if len(text) > MAX_LINE:  # remote data in it (an error's text, a name)
            text = f"{text[:MAX_LINE]}... ({len(text):,} characters)"
        dropped = self._suppressed.pop(key, 0)
        if dropped:
            text += f" ({dropped} more like it suppressed)"
        # stacklevel 3: the record names the caller of info(), not this module.
        self.logger.log(level, "%s", text, exc_info=exc_info, stacklevel=3)
