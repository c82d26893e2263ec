"""The inbox: where posts from other peers enter the store and the
`incoming()` streams, whether pushed or pulled.

Only posts already verified come here. The inbox refuses those stamped too
far in the future (`PeerConfig.max_future`), stores the rest, moves the
user's hybrid clock past each new one, and offers each new one to every
`incoming()` iterator, whose bounded queue drops its oldest post rather
than grow.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable, Sequence

from .._errors import InvalidRecord
from .._models import Post
from .context import PeerContext

__all__ = ["Inbox"]

log = logging.getLogger("p2ptimeline.peer")


class Inbox:
    """Accepts verified posts and hands the new ones to subscribers."""

    def __init__(self, context: PeerContext) -> None:
        self._context = context
        self._subscribers: set[asyncio.Queue[Post | None]] = set()

    def subscribe(self) -> AsyncIterator[Post]:
        """An iterator of the posts accepted from now on, until `close()`."""
        size = self._context.config.incoming_buffer
        queue: asyncio.Queue[Post | None] = asyncio.Queue(size)
        self._subscribers.add(queue)
        return self._drain(queue)

    async def _drain(self, queue: asyncio.Queue[Post | None]) -> AsyncIterator[Post]:
        try:
            while (post := await queue.get()) is not None:
                yield post
        finally:
            self._subscribers.discard(queue)

    def close(self) -> None:
        """End every subscriber's iteration (after the posts it holds)."""
        for queue in self._subscribers:
            _offer(queue, None)

    def horizon_ms(self) -> int:
        """The latest timestamp (ms since the epoch) a post may carry now."""
        context = self._context
        return context.clock.now_ms() + int(context.config.max_future * 1000)

    def timely(self, posts: Sequence[Post]) -> Sequence[Post]:
        """`posts` (oldest first) up to the first one stamped too far ahead."""
        horizon = self.horizon_ms()
        for count, post in enumerate(posts):
            if post.timestamp.physical_ms > horizon:
                return posts[:count]
        return posts

    async def accept(self, posts: Iterable[Post]) -> list[Post]:
        """Store verified posts; hand the new ones to `incoming()` iterators.

        Posts stamped too far in the future are refused (and logged).

        Returns:
            The posts that were new, in the order given.
        """
        horizon = self.horizon_ms()
        timely = []
        for post in posts:
            if post.timestamp.physical_ms > horizon:
                self._context.ratelog.info(
                    "future", "refused a post from the future by %s", post.author
                )
            else:
                timely.append(post)
        new = await self._context.store.add(timely)
        for post in new:
            with contextlib.suppress(InvalidRecord):
                self._context.hlc.observe(post.timestamp)
            for queue in self._subscribers:
                _offer(queue, post)
        return new


def _offer(queue: asyncio.Queue[Post | None], item: Post | None) -> None:
    """Put without waiting; drop the oldest item when the queue is full."""
    if queue.full():
        with contextlib.suppress(asyncio.QueueEmpty):
            queue.get_nowait()
            log.warning("incoming() is not keeping up: dropped a post")
    queue.put_nowait(item)
