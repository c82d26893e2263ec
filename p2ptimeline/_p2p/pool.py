"""`ConnectionPool`: a peer's outgoing connections, one per remote address.

Connections are opened on demand, at most `Limits.max_connecting` at once,
reused between requests, and the least recently used is closed past
`Limits.max_connections`. An address whose connect failed is not tried
again for `Limits.connect_backoff` seconds: requests to it fail at once.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging

from .._errors import PeerUnreachable
from .._ratelog import RateLimitedLog
from .._serializer import Serializer
from .connection import LOG_INTERVAL, Connection, Limits
from .wire import Message

__all__ = ["ConnectionPool"]

log = logging.getLogger("p2ptimeline.peer")

_REMEMBERED_FAILURES = 4096
"""Most addresses a pool remembers as unreachable (the oldest are forgotten)."""


class ConnectionPool:
    """Outgoing connections, one per remote address, reused between requests."""

    def __init__(self, serializer: Serializer, limits: Limits) -> None:
        self._serializer = serializer
        self._limits = limits
        self._log = RateLimitedLog(log, LOG_INTERVAL)
        self._connections: collections.OrderedDict[tuple[str, int], Connection] = (
            collections.OrderedDict()
        )
        self._opening: dict[tuple[str, int], asyncio.Task[Connection]] = {}
        self._waiting: collections.Counter[tuple[str, int]] = collections.Counter()
        self._connecting = asyncio.Semaphore(limits.max_connecting)
        self._unreachable: collections.OrderedDict[tuple[str, int], float] = (
            collections.OrderedDict()
        )
        self._closed = False

    async def request(self, address: tuple[str, int], message: Message) -> Message:
        """Send `message` to the peer at `address` and return its reply.

        Raises:
            PeerUnreachable: It cannot be reached (or could not moments ago),
                or did not answer within `Limits.request_timeout`.
            ProtocolError: It refused the request or broke the protocol.
        """
        try:
            async with asyncio.timeout(self._limits.request_timeout):
                connection = await self._connection(address)
                return await connection.request(message)
        except TimeoutError:
            raise PeerUnreachable(f"{address} did not answer in time") from None

    async def _connection(self, address: tuple[str, int]) -> Connection:
        if self._closed:
            raise PeerUnreachable("the connection pool is closed")
        connection = self._connections.get(address)
        if connection is not None and not connection.closed:
            self._connections.move_to_end(address)
            return connection
        retry_at = self._unreachable.get(address)
        if retry_at is not None:
            if asyncio.get_running_loop().time() < retry_at:
                raise PeerUnreachable(f"cannot connect to {address} (just failed)")
            del self._unreachable[address]
        opening = self._opening.get(address)
        if opening is None:
            opening = asyncio.create_task(self._open(address))
            self._opening[address] = opening
            opening.add_done_callback(functools.partial(self._opened, address))
        self._waiting[address] += 1
        try:
            return await asyncio.shield(opening)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if opening.cancelled() and task is not None and not task.cancelling():
                # Not this request's cancellation: the pool closed meanwhile.
                raise PeerUnreachable(f"cannot connect to {address}: closed") from None
            raise
        finally:
            self._waiting[address] -= 1
            if not self._waiting[address]:
                del self._waiting[address]
                opening.cancel()  # no request wants it any more (no-op if done)

    def _opened(self, address: tuple[str, int], task: asyncio.Task[Connection]) -> None:
        if self._opening.get(address) is task:
            del self._opening[address]
        if not task.cancelled():
            task.exception()  # seen: the requests that wanted it may be gone

    async def _open(self, address: tuple[str, int]) -> Connection:
        loop = asyncio.get_running_loop()
        async with self._connecting:
            try:
                async with asyncio.timeout(self._limits.connect_timeout):
                    _, connection = await loop.create_connection(
                        lambda: Connection(self._serializer, self._limits, self._log),
                        *address,
                    )
            except (OSError, TimeoutError) as exc:
                self._note_unreachable(address)
                raise PeerUnreachable(f"cannot connect to {address}: {exc!r}") from None
        if self._closed:
            connection.close()
            raise PeerUnreachable("the connection pool is closed")
        self._connections[address] = connection
        self._evict()
        return connection

    def _note_unreachable(self, address: tuple[str, int]) -> None:
        backoff = self._limits.connect_backoff
        if backoff <= 0:
            return
        self._unreachable[address] = asyncio.get_running_loop().time() + backoff
        self._unreachable.move_to_end(address)
        while len(self._unreachable) > _REMEMBERED_FAILURES:
            self._unreachable.popitem(last=False)

    def _evict(self) -> None:
        now = asyncio.get_running_loop().time()
        limits = self._limits
        for address, connection in list(self._connections.items()):
            if connection.closed or (
                connection.idle and now - connection.last_used > limits.idle_timeout
            ):
                del self._connections[address]
                connection.close()
        while len(self._connections) > limits.max_connections:
            _, connection = self._connections.popitem(last=False)
            connection.close()

    async def close(self) -> None:
        """Close every connection and stop every connect. Idempotent."""
        self._closed = True
        openings = list(self._opening.values())
        for task in openings:
            task.cancel()
        connections = list(self._connections.values())
        self._connections.clear()
        for connection in connections:
            connection.close()
        await asyncio.gather(*openings, return_exceptions=True)
        await asyncio.gather(*(c.wait_closed() for c in connections))
