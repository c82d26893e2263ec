"""Dissemination: pushing a post down its tree, and forwarding others' pushes.

The author arranges its online followers into a k-ary tree (`tree.py` says
how) and hands the post to its k children, each with its subtree to forward.
A child that cannot be reached after `PeerConfig.push_tries`, or a subtree
that does not fit in a frame, is dealt with as the pure `Relay` decides:
its subtree is re-homed under the sender, within a budget. Every peer
forwards each post once, at most `PeerConfig.max_relays` at a time.
"""

from __future__ import annotations

import asyncio
import collections
import logging

from .._errors import NetworkError, Refused, RegistryUnavailable, RemoteError
from .._models import Post
from .._tasks import Tasks, bounded
from .context import PeerContext, Session
from .directory import Follower
from .inbox import Inbox
from .tree import REHOME_PER_FANOUT, DisseminationTree, Relay
from .wire import (
    MAX_TREE_SIZE,
    Ack,
    FrameTooLarge,
    Message,
    PostPush,
    TreeMember,
    check_host,
)

__all__ = ["Disseminator"]

log = logging.getLogger("p2ptimeline.peer")

_FORWARD_MEMORY = 10_000  # ids of posts remembered as forwarded


class Disseminator:
    """Sends the user's posts down their trees and forwards received pushes."""

    def __init__(self, context: PeerContext, inbox: Inbox) -> None:
        self._context = context
        self._inbox = inbox
        self._tree = DisseminationTree(context.config.fanout)
        self._forwarded: collections.OrderedDict[bytes, None] = (
            collections.OrderedDict()
        )
        self._relays = Tasks(log)

    async def close(self) -> None:
        """Stop every forward under way."""
        await self._relays.close()

    async def publish(self, session: Session, post: Post) -> None:
        """Push the user's own `post` to their online followers."""
        self._remember_forwarded(post.id)  # a push of it back goes no further
        members = await self._online_followers(session)
        host, port = self._context.address
        me = TreeMember(name=session.username, host=host, port=port)
        tree = self._tree.arrange(me, members, post_id=post.id, key=_name)
        # The author's tree is its own followers, each in it once: it re-homes
        # any of them (and marks them unreachable for its next posts).
        relay: Relay[TreeMember] = Relay(
            self._tree, spare=len(members), max_size=MAX_TREE_SIZE
        )
        await self._relay(post, relay, tree, session)

    async def on_push(self, push: PostPush) -> Message:
        """Take a pushed post: store it if the user follows its author, and
        forward it down the subtree that came with it."""
        context = self._context
        post = push.post
        await context.verify(post)
        session = context.session
        if session is not None and post.author in session.following:
            await self._inbox.accept([post])
        # Forward even when not storing (the subtree relies on this peer), but
        # each post once: a replayed push, or one of the same post with
        # another tree, goes no further.
        if len(push.tree) == 1 or not self._remember_forwarded(post.id):
            return Ack()  # a leaf, or forwarded already
        if len(self._relays) >= context.config.max_relays:
            context.ratelog.warning(
                "relays",
                "did not forward a post by %s: %d forwards under way already "
                "(its receivers catch up by pulling)",
                post.author,
                len(self._relays),
            )
            return Ack()
        # The tree's arity is the author's (`PostPush.fanout`), not ours.
        shape = DisseminationTree(push.fanout)
        spare = min(REHOME_PER_FANOUT * shape.fanout, context.config.max_rehomed)
        relay = Relay[TreeMember](shape, spare=spare, max_size=MAX_TREE_SIZE)
        self._relays.spawn(self._relay(post, relay, list(push.tree)))
        return Ack()

    def _remember_forwarded(self, post_id: bytes) -> bool:
        """Note that the post `post_id` is forwarded; False if it was already."""
        if post_id in self._forwarded:
            self._forwarded.move_to_end(post_id)
            return False
        self._forwarded[post_id] = None
        if len(self._forwarded) > _FORWARD_MEMORY:
            self._forwarded.popitem(last=False)
        return True

    async def _online_followers(self, session: Session) -> list[TreeMember]:
        """The followers to send a post to, refreshing stale presence first."""
        context = self._context
        directory = session.directory
        now = context.clock.now_ms()
        stale = directory.stale(now, recheck_ms=int(context.config.lease * 1000 / 3))

        async def refresh(follower: Follower) -> None:
            try:
                presence = await context.registry.get_presence(follower.public_key)
            except RegistryUnavailable:
                presence = None
            if presence is not None:
                directory.update_presence(follower.name, presence)
            follower.checked_ms = now

        await bounded(refresh, stale)
        members = []
        for follower in directory.online(context.clock.now_ms()):
            presence = follower.presence
            assert presence is not None  # online() has a presence
            if not check_host(presence.host):
                context.ratelog.info(
                    "bad-host",
                    "left %s out of a push: its presence names no usable host",
                    follower.name,
                )
                continue
            members.append(
                TreeMember(name=follower.name, host=presence.host, port=presence.port)
            )
        return members

    async def _relay(
        self,
        post: Post,
        relay: Relay[TreeMember],
        tree: list[TreeMember],
        session: Session | None = None,
    ) -> None:
        """Push `post` down `tree`, whose root is this peer, as `relay` says.

        Failed followers of the logged-in user (`session`) are marked
        unreachable.
        """
        await self._push_all(post, relay, relay.start(tree), session)
        if relay.dropped:
            self._context.ratelog.info(
                "rehome-budget",
                "left %d members of a tree of %s's post to catch up by pulling: "
                "too many were unreachable",
                relay.dropped,
                post.author,
            )

    async def _push_all(
        self,
        post: Post,
        relay: Relay[TreeMember],
        subtrees: list[list[TreeMember]],
        session: Session | None,
    ) -> None:
        await asyncio.gather(*(self._push(post, relay, t, session) for t in subtrees))

    async def _push(
        self,
        post: Post,
        relay: Relay[TreeMember],
        tree: list[TreeMember],
        session: Session | None,
    ) -> None:
        """Hand `post` to `tree[0]`, with its subtree to forward; if it cannot be
        reached after `push_tries`, refuses the push, or the push does not fit
        in a frame, send what `relay` says instead. Only a child that cannot be
        reached is marked unreachable (for the author's next posts)."""
        config = self._context.config
        child = tree[0]
        delay = config.push_backoff
        for attempt in range(config.push_tries):
            if attempt:
                await asyncio.sleep(delay)
                delay *= 2
            try:
                push = PostPush(post=post, fanout=relay.shape.fanout, tree=tuple(tree))
                await self._context.request((child.host, child.port), push)
                return
            except FrameTooLarge as exc:
                split = relay.too_large(tree)
                if not split:  # Limits.max_frame_size below a post's size
                    log.warning("cannot push to %s: %s", child.name, exc)
                await self._push_all(post, relay, split, session)
                return
            except Refused as exc:  # reachable, but will not take it: no retry
                self._context.ratelog.info(
                    "push-refused", "%s refused a push: %s", child.name, exc.reason
                )
                break
            except (NetworkError, RemoteError) as exc:
                self._context.ratelog.info(
                    "push-failed",
                    "push to %s failed (try %d): %s",
                    child.name,
                    attempt + 1,
                    exc,
                )
        else:
            if session is not None:
                session.directory.mark_unreachable(child.name)
        await self._push_all(post, relay, relay.unreachable(tree), session)


def _name(member: TreeMember) -> str:
    return member.name
