"""`Transport`: the seam through which a peer exchanges messages with others.

A peer sends its requests through its transport (`request`) and answers
through it the requests that reach its server (`answer`). The peer's own
transport sends over its `ConnectionPool` and answers with the peer's
dispatch table. `Peer(transport=...)` wraps it: a wrapper is a subclass of
`Transport` that overrides what it changes and hands the rest to `inner`,
so tests and tools can count, delay, drop or rewrite messages in either
direction without reaching into the peer::

    class NoNotices(Transport):
        async def request(self, address, message):
            if type(message).__name__ == "FollowNotice":
                raise PeerUnreachable("dropped on purpose")
            return await super().request(address, message)

    peer = Peer(..., transport=NoNotices)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from .pool import ConnectionPool
from .wire import Message

__all__ = ["Address", "PoolTransport", "Transport", "TransportWrapper"]

Address = tuple[str, int]
"""``(host, port)`` of a peer."""


class Transport:
    """A peer's messages to and from other peers; passes everything to `inner`.

    Args:
        inner: The transport this one wraps.
    """

    def __init__(self, inner: Transport) -> None:
        self.inner = inner

    async def request(self, address: Address, message: Message) -> Message:
        """Send the request `message` to the peer at `address`; its reply.

        Raises:
            NetworkError: The peer did not answer.
            RemoteError: It answered wrongly (`Refused`: it turned the
                request down).
        """
        return await self.inner.request(address, message)

    async def answer(self, message: Message, remote: Address) -> Message:
        """The reply to the request `message` that came from `remote`."""
        return await self.inner.answer(message, remote)


TransportWrapper = Callable[[Transport], Transport]
"""What `Peer(transport=...)` takes: makes a transport around the peer's own
(a `Transport` subclass is one)."""


class PoolTransport(Transport):
    """A peer's own transport: requests over its pool, answers by its table."""

    def __init__(
        self,
        pool: ConnectionPool,
        dispatch: Callable[[Message, Address], Awaitable[Message]],
    ) -> None:
        self._pool = pool
        self._dispatch = dispatch

    async def request(self, address: Address, message: Message) -> Message:
        return await self._pool.request(address, message)

    async def answer(self, message: Message, remote: Address) -> Message:
        return await self._dispatch(message, remote)
