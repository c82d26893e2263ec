"""Pulling: catching up on followees' posts, and serving others' catch-up.

A pull asks for an author's posts after this peer's *watermark* for that
author: the time up to which it is known to hold them all. (The newest post
held is no such mark: pushes can arrive with gaps when a forwarder dies.)
Only a pull from the author, who holds them all, moves the mark, and only up
to the last post accepted; followers, who hold what they received, are asked
when the author is offline, and a few of their answers are merged. Posts are
checked and stored a page at a time, as they arrive; a source that fails or
sends a bad page is skipped, and what it sent before stays.
"""

from __future__ import annotations

import logging
import random

from .._errors import NetworkError, ProtocolError, RemoteError, UnknownUser
from .._models import HybridTimestamp, Post
from .._tasks import bounded
from .context import PeerContext, Session
from .inbox import Inbox
from .transport import Address
from .wire import GetPosts, Message, PostBatch

__all__ = ["Puller"]

log = logging.getLogger("p2ptimeline.peer")

PAGE = 500
"""Posts per `GetPosts` reply, at most."""
_FRAME_ENVELOPE = 1024  # bytes of a PostBatch frame besides its posts, at most
_MAX_CATCH_UP = 100_000  # posts pulled of one author at most, per pull
_SOURCES = 8  # followers tried as sources of an offline author's posts
_MERGE = 3  # followers whose answers are merged when the author is offline
_SAMPLE = 64  # follower keys looked at, at most, to find those sources


class Puller:
    """Pulls followees' posts into the inbox, and answers `GetPosts`."""

    def __init__(self, context: PeerContext, inbox: Inbox) -> None:
        self._context = context
        self._inbox = inbox
        self._unsourced: set[str] = set()  # authors reported without a source

    async def sync(self, session: Session) -> int:
        """Pull from every followee of `session`'s user; how many posts were new."""
        counts = await bounded(self.pull, sorted(session.following))
        return sum(counts)

    async def pull(self, author: str) -> int:
        """Fetch the posts of `author` this peer may have missed; how many
        were new. Failures are logged, not raised."""
        context = self._context
        me = context.require_session().username
        mark_key = f"watermark/{me}/{author}"
        mark = await context.store.get_state(mark_key)
        since = HybridTimestamp.unpack(int.from_bytes(mark)) if mark else None
        try:
            key = await context.public_key(author)
            presence = await context.registry.get_presence(key)
        except (NetworkError, RemoteError, UnknownUser) as exc:
            log.info("could not pull %s's posts: %s", author, exc)
            return 0
        new = 0
        if presence is not None and presence.is_online(context.clock.now_ms()):
            self._unsourced.discard(author)
            new, complete = await self._pull_from(
                presence.address, author, key, since, mark_key=mark_key
            )
            if complete:
                return new
        try:
            holders = await self._holders(author)
        except (NetworkError, RemoteError) as exc:
            log.info("could not find holders of %s's posts: %s", author, exc)
            return new
        if holders:
            self._unsourced.discard(author)
        elif author not in self._unsourced:  # normal: say it once, not each pull
            self._unsourced.add(author)
            log.info("no online source of %s's posts to catch up from", author)
        answered = 0
        for address in holders:
            got, complete = await self._pull_from(address, author, key, since)
            new += got
            answered += complete
            if answered >= _MERGE:
                break
        return new

    async def _holders(self, author: str) -> list[Address]:
        """Addresses of up to `_SOURCES` online followers of `author` (other
        than this peer's user), picked at random to spread the load.

        Only the followers' keys are needed (their entries' signatures prove
        them), so the entries' names are not looked up.
        """
        context = self._context
        registry = context.registry
        entries = await registry.get_follow_entries(
            author, "followers", verify_names=False
        )
        me = context.session.username if context.session else None
        keys = [e.follower_key for e in entries if e.following and e.follower != me]
        keys = random.sample(keys, min(len(keys), _SAMPLE))
        found: list[Address] = []
        for start in range(0, len(keys), _SOURCES):
            batch = keys[start : start + _SOURCES]
            now = context.clock.now_ms()
            found += [
                record.address
                for record in await bounded(registry.get_presence, batch)
                if record is not None
                and record.is_online(now)
                and record.address != context.address
            ]
            if len(found) >= _SOURCES:
                break
        return found[:_SOURCES]

    async def _pull_from(
        self,
        address: Address,
        author: str,
        key: bytes,
        since: HybridTimestamp | None,
        *,
        mark_key: str | None = None,
    ) -> tuple[int, bool]:
        """Pull `author`'s posts stamped after `since` from `address`.

        Page by page: each page is checked, stored, and (with `mark_key`,
        when the source is the author) moves the watermark up to its last
        post accepted, before the next is asked for; so a pull holds one
        page at a time. A post stamped too far in the future is refused and
        ends the pull there (the mark stays before it).

        Returns:
            How many posts were new, and whether the source answered to the
            end (not when it failed or sent a bad page; what came before
            that is kept).
        """
        context = self._context
        new = taken = 0
        while taken < _MAX_CATCH_UP:
            try:
                page = await self._page(address, author, key, since)
            except (NetworkError, RemoteError) as exc:
                log.info("could not pull %s's posts from %s: %s", author, address, exc)
                return new, False
            timely = self._inbox.timely(page.posts)
            new += len(await self._inbox.accept(timely))
            if timely and mark_key is not None:
                mark = timely[-1].timestamp.packed().to_bytes(8)
                await context.store.put_state(mark_key, mark)
            taken += len(page.posts)
            if len(timely) < len(page.posts):
                context.ratelog.info(
                    "pulled-future",
                    "refused %d posts of %s stamped too far in the future",
                    len(page.posts) - len(timely),
                    author,
                )
                break
            if not page.more or not page.posts:
                break
            since = page.posts[-1].timestamp
        return new, True

    async def _page(
        self, address: Address, author: str, key: bytes, since: HybridTimestamp | None
    ) -> PostBatch:
        """One page of `author`'s posts after `since` from `address`, checked:
        each is the author's, signed with `key`, stamped after `since`, and
        none is older than the one before it.

        Raises:
            NetworkError: `address` did not answer.
            RemoteError: It broke the protocol or sent a bad post.
        """
        request = GetPosts(author=author, since=since, limit=PAGE)
        reply = await self._context.request(address, request)
        if not isinstance(reply, PostBatch):
            name = type(reply).__name__
            raise ProtocolError(f"{address} answered GetPosts with {name}")
        previous: HybridTimestamp | None = None
        for post in reply.posts:
            if (
                post.author != author
                or (since is not None and post.timestamp <= since)
                or (previous is not None and post.timestamp < previous)
            ):
                raise ProtocolError(f"{address} sent a post not asked for")
            key = await self._context.verify(post, key)
            previous = post.timestamp
        return reply

    async def serve(self, request: GetPosts) -> Message:
        """Answer a `GetPosts`: a page of the author's posts this peer holds,
        as many as fit in one frame (the asker comes back for the rest)."""
        context = self._context
        limit = min(request.limit, PAGE)
        posts: list[Post] = await context.store.posts_by(
            request.author, since=request.since, limit=limit
        )
        # Long texts in wide characters do not fit by the hundred.
        limits = context.config.limits
        room = min(limits.max_page_size, limits.max_frame_size) - _FRAME_ENVELOPE
        for count, post in enumerate(posts):
            room -= len(context.serializer.encode(post))
            if room < 0:
                return PostBatch(posts=tuple(posts[:count]), more=True)
        return PostBatch(posts=tuple(posts), more=len(posts) == limit)
