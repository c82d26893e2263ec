"""What the jobs of a peer share: its parts, the logged-in user, and the
small steps every job takes (ask a peer, read a key, verify a post).

A `Peer` is a facade over four jobs (`session`, `pull`, `dissemination`,
`inbox`); each holds the one `PeerContext` of its peer, never the peer
itself, so a job cannot reach into another's state.
"""

from __future__ import annotations

import logging
from typing import Literal, Self

import attrs

from .._clock import ClockSync
from .._dht.registry import DhtRegistry
from .._errors import (
    InvalidSignature,
    NotLoggedIn,
    PeerUnreachable,
    RegistryUnavailable,
    UnknownUser,
    UsageError,
)
from .._hlc import HybridLogicalClock
from .._identity import Identity
from .._models import FollowEntry, HybridTimestamp, Post, Presence
from .._ratelog import RateLimitedLog
from .._serializer import Serializer
from .._store import LocalStore
from .._tasks import Tasks
from .config import PeerConfig
from .directory import FollowerDirectory
from .transport import Address, Transport
from .wire import Message

__all__ = ["Notification", "PeerContext", "Session"]

log = logging.getLogger("p2ptimeline.peer")


@attrs.frozen(kw_only=True)
class Notification:
    """Someone followed or unfollowed the logged-in user."""

    kind: Literal["follow", "unfollow"]
    """What happened."""
    user: str
    """Who did it."""
    timestamp: HybridTimestamp
    """When, on their clock."""

    @classmethod
    def of(cls, kind: Literal["follow", "unfollow"], entry: FollowEntry) -> Self:
        """The notification of `entry`'s follower doing `kind`."""
        return cls(kind=kind, user=entry.follower, timestamp=entry.timestamp)


@attrs.define
class Session:
    """The logged-in user and what the peer keeps for them while logged in."""

    username: str
    identity: Identity
    following: set[str]
    directory: FollowerDirectory
    notifications: list[Notification]
    tasks: Tasks = attrs.field(factory=lambda: Tasks(log))


@attrs.define(eq=False)
class PeerContext:
    """The parts of one peer, as its jobs see them.

    `registry`, `transport` and `address` exist while the peer is started;
    `session` while a user is logged in.
    """

    config: PeerConfig
    store: LocalStore
    clock: ClockSync
    hlc: HybridLogicalClock
    serializer: Serializer
    tasks: Tasks = attrs.field(factory=lambda: Tasks(log))
    ratelog: RateLimitedLog = attrs.field(factory=lambda: RateLimitedLog(log))
    started: tuple[DhtRegistry, Transport, Address] | None = None
    stopped: bool = False
    session: Session | None = None

    @property
    def registry(self) -> DhtRegistry:
        """The peer's registry node.

        Raises:
            UsageError: The peer is not started.
        """
        if self.started is None:
            raise UsageError(f"the peer is {self.state}")
        return self.started[0]

    @property
    def address(self) -> Address:
        """Where other peers reach this one (its advertised host and port)."""
        if self.started is None:
            raise UsageError(f"the peer is {self.state}")
        return self.started[2]

    def require_session(self) -> Session:
        """The logged-in user's session.

        Raises:
            NotLoggedIn: Nobody is logged in.
            UsageError: The peer is not started, or stopped.
        """
        if self.session is None:
            if self.started is None:
                raise UsageError(f"the peer is {self.state}")
            raise NotLoggedIn("no user is logged in on this peer")
        return self.session

    @property
    def state(self) -> str:
        """ "not started", "started" or "stopped"."""
        if self.stopped:
            return "stopped"
        return "started" if self.started else "not started"

    async def request(self, address: Address, message: Message) -> Message:
        """Send `message` to the peer at `address` through the transport."""
        if self.started is None:
            raise PeerUnreachable("the peer is stopped")
        return await self.started[1].request(address, message)

    async def public_key(self, username: str) -> bytes:
        """The key of `username`, from the registry (which caches it).

        Raises:
            UnknownUser: No such user.
            RegistryUnavailable: No DHT node could be reached.
        """
        key = await self.registry.get_public_key(username)
        if key is None:
            raise UnknownUser(f"no user {username!r}")
        return key

    async def verify(self, post: Post, key: bytes | None = None) -> bytes:
        """Check `post` with its author's key (`key`, or the registry's); the
        key that verified it.

        A key read from the registry can be wrong (a read outvoted by lying
        nodes): if the post does not verify, the author's name is read again
        from all the closest nodes (at most once a minute per name), and the
        key found there, if another, is tried.

        Raises:
            InvalidRecord: It does not verify (`InvalidSignature`), or its
                id does not match its content.
            UnknownUser: The author is not registered.
            RegistryUnavailable: No DHT node could be reached.
        """
        key = key or await self.public_key(post.author)
        try:
            post.verify(key)
        except InvalidSignature:
            fresh = await self.registry.recheck_user(post.author)
            if fresh is None or fresh == key:
                raise
            post.verify(fresh)
            return fresh
        return key

    async def online_address(self, username: str) -> Address | None:
        """Where `username` is online now, if it is."""
        presence = await self.registry.get_presence(await self.public_key(username))
        if presence is None or not presence.is_online(self.clock.now_ms()):
            return None
        return presence.address

    async def own_presence(self, session: Session) -> Presence | None:
        """The logged-in user's presence as the registry holds it, if readable."""
        try:
            return await self.registry.get_presence(session.identity.public_key)
        except RegistryUnavailable:
            return None
