"""`DhtRegistry`: the signed, versioned user registry on a Kademlia DHT."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Self

import attrs

from .._errors import (
    ListenError,
    RegistryUnavailable,
    UnknownUser,
    UsageError,
)
from .._hlc import HybridLogicalClock
from .._identity import Identity
from .._models import FollowEntry, Presence, Relation, UsernameClaim, check_username
from .._ratelog import RateLimitedLog
from .._serializer import CborSerializer, Serializer
from .._tasks import Tasks, every
from .claims import MAX_WRITE_ROUNDS, Claims
from .follow_sets import FollowSets
from .names import NameCache
from .node import DhtNode, Replica
from .records import (
    RegistryValue,
    presence_key,
    shard_capacity,
)
from .storage import DEFAULT_MAX_BYTES, RecordStorage
from .wire import newer_seq

__all__ = ["DhtRegistry", "UserRecord"]

log = logging.getLogger("p2ptimeline.registry")

_REBOOTSTRAP_INTERVAL = 1.0
_CONTACT_CHECK_INTERVAL = 10.0  # one silent contact pinged per check
_REFRESH_INTERVAL = 3600.0  # seconds between bucket refreshes and republishing
_CLAIM_CACHE_SIZE = 100_000
_CLAIM_TTL = 3600.0  # seconds a name's key is taken from the cache
_ABSENT_TTL = 600.0  # seconds a name read as unregistered stays so
_RECHECK_AFTER = 60.0  # seconds between forced re-reads of one name


@attrs.frozen(kw_only=True)
class UserRecord:
    """What the registry knows about a user."""

    username: str
    """The user's name."""
    public_key: bytes
    """The user's Ed25519 public key (bound to the name by its first claim)."""
    sealed_key: bytes = attrs.field(repr=False)
    """The user's private key, sealed with their password."""
    presence: Presence | None
    """The user's latest presence record, if any was ever published."""
    online: bool
    """Whether the user's peer held a live lease when this was read."""

    @property
    def address(self) -> tuple[str, int] | None:
        """``(host, port)`` of the user's peer, if it ever announced one."""
        return self.presence.address if self.presence else None


class DhtRegistry:
    """The user registry: one node of a Kademlia DHT holding signed records.

    A bare `DhtRegistry` is what a bootstrap node runs; a `Peer` runs one
    for its user. Every record is signed by the key it belongs to and checked
    by the nodes that store it and again by every reader. Reads ask several
    of the nodes closest to a key, keep the newest valid answer and repair
    stale replicas. Follow sets are merged per member, so concurrent follows
    never lose an update, and they shard themselves to any size.

    Like `Peer`, it is configured when constructed, started by ``async with``
    (or `start()`) and stopped on leaving it (or by `stop()`)::

        async with DhtRegistry("127.0.0.1", 0, [("127.0.0.1", 8468)]) as node:
            print("listening on", node.address)

    Args:
        host: Interface to listen on (UDP).
        port: UDP port; 0 picks a free one (`address` tells which).
        bootstrap: ``(host, port)`` of nodes already in the network; none for
            the first node of a network.
        ksize: Kademlia's k: replicas per key, and bucket size.
        alpha: Kademlia's alpha: parallel requests per lookup step.
        read_quorum: A read of a claim or presence stops once this many of
            the closest nodes answered (default: `ksize` // 4, at least
            `alpha`). Follow sets are always read from all `ksize`.
        rpc_timeout: Seconds to wait for a node to answer one request.
        lease: Seconds a presence lease lasts; it is renewed every third of it.
        clock: The current time in seconds since the epoch (for example
            `ClockSync.now`); the local clock by default.
        serializer: Encoding of the records; all nodes of a network must use
            the same one.
        node_id: This node's 20-byte DHT id (random by default). A node that
            restarts with the id it had replaces its old address in the
            routing tables of the nodes it meets, instead of leaving them a
            dead contact each time.
        max_storage: Most bytes of other users' records this node keeps
            (see `docs/security.md`: one sender may fill a sixteenth).
        rejoin_interval: Seconds between greetings of the bootstrap nodes,
            so that one that restarted (and knows nobody) learns of this
            node, and the nodes joining through it find the network.
        hlc: The hybrid logical clock that stamps this user's follow
            entries: a peer passes the one that stamps its posts, so that a
            user has one clock (by default a new one on `clock`).

    Raises:
        UsageError: `ksize`, `alpha`, `port` or `node_id` is invalid.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        bootstrap: Sequence[tuple[str, int]] = (),
        *,
        ksize: int = 20,
        alpha: int = 3,
        read_quorum: int | None = None,
        rpc_timeout: float = 2.0,
        lease: float = 30.0,
        clock: Callable[[], float] = time.time,
        serializer: Serializer | None = None,
        node_id: bytes | None = None,
        max_storage: int = DEFAULT_MAX_BYTES,
        rejoin_interval: float = 120.0,
        hlc: HybridLogicalClock | None = None,
    ) -> None:
        if ksize < 1 or alpha < 1:
            raise UsageError("ksize and alpha must be positive")
        _check_port(port)
        if node_id is not None and len(node_id) != 20:
            raise UsageError("a node id is 20 bytes")
        self._host = host
        self._port = port
        self._bootstrap = list(bootstrap)
        self._node_id = node_id
        self._max_storage = max_storage
        self.rejoin_interval = rejoin_interval
        self.ksize = ksize
        self.alpha = alpha
        self.read_quorum = min(ksize, read_quorum or max(alpha, ksize // 4))
        self.rpc_timeout = rpc_timeout
        self.lease = lease
        self._clock = clock
        self._serializer = serializer or CborSerializer()
        self._capacity = shard_capacity(self._serializer)
        self._hlc = hlc or HybridLogicalClock(self._now_ms)
        self._node: DhtNode | None = None
        self._sets: FollowSets | None = None
        self._name_claims: Claims | None = None
        self._tasks = Tasks(log)
        self._ratelog = RateLimitedLog(log, 60.0)
        # Presence key -> the task renewing that lease (a renewal replaces it).
        self._leases: dict[bytes, asyncio.Future[None]] = {}
        self._last_refresh = self._last_check = self._last_greeting = 0.0
        self._seqs: dict[bytes, int] = {}
        self._names = NameCache(
            size=_CLAIM_CACHE_SIZE,
            ttl=_CLAIM_TTL,
            absent_ttl=_ABSENT_TTL,
            recheck_after=_RECHECK_AFTER,
        )

    # Lifecycle

    async def start(
        self,
        host: str | None = None,
        port: int | None = None,
        bootstrap: Sequence[tuple[str, int]] | None = None,
    ) -> None:
        """Listen on UDP and join the network through the bootstrap nodes.

        ``async with`` calls this. The arguments, when given, take the place
        of the constructor's `host`, `port` and `bootstrap` (for this run
        and the next ones), as in ``start("127.0.0.1", 0, [boot])``.

        Args:
            host: Interface to listen on.
            port: UDP port (0 picks a free one; `address` tells which).
            bootstrap: ``(host, port)`` of nodes already in the network. If
                none answers, the registry keeps trying in the background.

        Raises:
            ListenError: The address cannot be listened on (the port is
                taken, or the host is not this machine's).
            UsageError: The registry is already started.
        """
        if self._node is not None:
            raise UsageError("the registry is already started")
        if host is not None:
            self._host = host
        if port is not None:
            self._port = _check_port(port)
        if bootstrap is not None:
            self._bootstrap = list(bootstrap)
        node = DhtNode(
            ksize=self.ksize,
            alpha=self.alpha,
            serializer=self._serializer,
            storage=RecordStorage(
                self._serializer,
                self._capacity,
                max_bytes=self._max_storage,
                clock=self._clock,
            ),
            rpc_timeout=self.rpc_timeout,
            read_quorum=self.read_quorum,
            node_id=self._node_id,
            clock=self._clock,
        )
        try:
            await node.listen(self._port, interface=self._host)
        except OSError as exc:
            await node.close()
            host, port = address = (self._host, self._port)
            reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
            raise ListenError(
                f"cannot listen on UDP {host}:{port}: {reason}", address
            ) from exc
        self._node = node
        self._sets = FollowSets(node, self._capacity)
        self._name_claims = Claims(node, self._names, self._next_seq)
        self._tasks = Tasks(log)
        node.bootstrap_addresses = self._bootstrap
        self._last_refresh = self._last_check = self._last_greeting = time.monotonic()
        try:
            if self._bootstrap:
                await node.bootstrap(self._bootstrap)
                if not node.has_neighbors():
                    log.warning("no bootstrap node answered; will keep trying")
            self._tasks.spawn(
                every(_REBOOTSTRAP_INTERVAL, self._maintain, self._ratelog),
                name="DHT maintenance",
            )
        except BaseException:  # cancelled, or worse: leave nothing open
            await self.stop()
            raise

    async def stop(self) -> None:
        """Leave the network: close the socket and stop every task. Idempotent.

        Presence leases are not withdrawn: call `set_presence(..., online=False)`
        first for a clean logout. Stopping without it is what a crash looks
        like to the network: the user reads as offline once the lease lapses.
        The socket is closed even if the caller is cancelled meanwhile.
        """
        node, self._node = self._node, None
        self._sets = None
        self._name_claims = None
        self._leases.clear()
        try:
            await self._tasks.close()
        finally:
            if node is not None:
                await node.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` the node listens on.

        Raises:
            UsageError: The registry is not started.
        """
        host, port = self._started().transport.get_extra_info("sockname")[:2]
        return (host, port)

    @property
    def node_id(self) -> bytes:
        """This node's 20-byte Kademlia id."""
        return bytes(self._started().node.id)

    def neighbors(self) -> list[tuple[str, int]]:
        """Addresses of the nodes in this node's routing table."""
        buckets = self._started().protocol.router.buckets
        return [(n.ip, n.port) for bucket in buckets for n in bucket.get_nodes()]

    # Users

    async def claim_username(
        self, username: str, identity: Identity, sealed_key: bytes
    ) -> UsernameClaim:
        """Bind `username` to `identity`'s key, with the sealed private key.

        Claiming again with the same identity replaces the sealed key (for a
        password change).

        Raises:
            UsernameTaken: Another key holds the name.
            UsageError: The name is invalid.
            RegistryUnavailable: No DHT node could be reached.
        """
        _check_name(username)
        return await self._claims().claim(username, identity, sealed_key)

    async def get_user(self, username: str) -> UserRecord | None:
        """The user's claim and presence, read fresh from the network.

        Returns:
            None if no one claimed `username`.

        Raises:
            UsageError: The name is invalid.
            RegistryUnavailable: No DHT node could be reached.
        """
        _check_name(username)
        claim = await self._claims().read(username)
        if claim is None:
            return None
        presence = await self._read_presence(claim.public_key)
        return UserRecord(
            username=username,
            public_key=claim.public_key,
            sealed_key=claim.sealed_key,
            presence=presence,
            online=presence is not None and presence.is_online(self._now_ms()),
        )

    async def get_public_key(self, username: str) -> bytes | None:
        """The public key bound to `username`, or None if it is not registered.

        A name's key never changes once claimed, so this answers from a
        cache when it can.

        Raises:
            UsageError: The name is invalid.
            RegistryUnavailable: No DHT node could be reached.
        """
        _check_name(username)
        claim = await self._claims().cached(username)
        return None if claim is None else claim.public_key

    async def recheck_user(self, username: str) -> bytes | None:
        """Read the owner of `username` again, from all the closest nodes,
        if it was not re-read in the last minute; the key it is bound to.

        For a caller that holds something signed under the name that does
        not verify with the key it got: that key may have come from a read
        that was wrong, and the cache is corrected.

        Raises:
            UsageError: The name is invalid.
            RegistryUnavailable: No DHT node could be reached.
        """
        _check_name(username)
        return await self._claims().recheck(username)

    async def get_presence(self, public_key: bytes) -> Presence | None:
        """The newest presence record of the user with `public_key`, if any.

        Raises:
            RegistryUnavailable: No DHT node could be reached.
        """
        return await self._read_presence(public_key)

    async def set_presence(
        self,
        username: str,
        identity: Identity,
        address: tuple[str, int],
        online: bool,
    ) -> Presence:
        """Announce where the user's peer listens and whether it is online.

        While online, the registry renews the lease every third of `lease`
        until `set_presence(..., online=False)` or `stop()`.

        Raises:
            AuthError: `identity` does not own `username`.
            UnknownUser: `username` is not registered.
            RegistryUnavailable: No DHT node could be reached.
        """
        await self._claims().owned(username, identity)
        key = presence_key(identity.public_key)
        renewal = self._leases.pop(key, None)
        if renewal is not None:
            renewal.cancel()
        record = await self._publish_presence(identity, address, online)
        if online and not self._tasks.closed:  # (closed: stopped meanwhile)
            renewal = self._leases.pop(key, None)  # set meanwhile by a racing call
            if renewal is not None:
                renewal.cancel()
            self._leases[key] = self._tasks.spawn(
                self._renew(identity, address), name=f"lease of {username}"
            )
        return record

    async def _publish_presence(
        self, identity: Identity, address: tuple[str, int], online: bool
    ) -> Presence:
        key = presence_key(identity.public_key)
        seq = self._next_seq(key)
        for _ in range(MAX_WRITE_ROUNDS):
            now = self._now_ms()
            record = Presence.create(
                identity,
                host=address[0],
                port=address[1],
                online=online,
                expires_ms=now + int(self.lease * 1000) if online else now,
                seq=seq,
            )
            replies = await self._started().write(key, RegistryValue(presence=record))
            newer = newer_seq([r for _, r in replies if r is not None], record)
            if newer is None:
                break
            # A newer record from another peer of this user: go past it.
            seq = self._next_seq(key, past=newer)
        return record

    def _next_seq(self, key: bytes, past: int = -1) -> int:
        """A fresh `seq` for our record under `key`: the clock's milliseconds,
        and past any we used or were shown (proven, so within the bound of
        `MAX_SEQ_AHEAD_MS`)."""
        seq = max(self._now_ms(), self._seqs.get(key, -1) + 1, past + 1)
        self._seqs[key] = seq
        return seq

    async def _renew(self, identity: Identity, address: tuple[str, int]) -> None:
        """Publish the presence again every third of the lease, until
        cancelled, whatever one renewal meets. An outage is said once (a
        warning) and its end once (how many renewals failed)."""
        failures = 0

        async def renew_lease() -> None:
            nonlocal failures
            try:
                await self._publish_presence(identity, address, online=True)
            except RegistryUnavailable as exc:  # the lease lapses if this lasts
                if not failures:
                    log.warning(
                        "could not renew the presence lease: %s (retrying every "
                        "%.0f s; the user reads as offline once the lease lapses)",
                        exc,
                        self.lease / 3,
                    )
                failures += 1
                return
            if failures:
                log.warning("presence lease renewed after %d failures", failures)
                failures = 0

        await every(self.lease / 3, renew_lease, RateLimitedLog(log, self.lease))

    # Follow sets

    async def follow(
        self, follower: str, followee: str, identity: Identity
    ) -> FollowEntry:
        """Record that `follower` follows `followee`; `identity` is the follower's.

        Raises:
            UsageError: A name is invalid.
            UnknownUser: `follower` or `followee` is not registered.
            AuthError: `identity` does not own `follower`.
            RegistryUnavailable: No DHT node could be reached.
        """
        return await self._follow(follower, followee, identity, following=True)

    async def unfollow(
        self, follower: str, followee: str, identity: Identity
    ) -> FollowEntry:
        """Record that `follower` no longer follows `followee`. See `follow`."""
        return await self._follow(follower, followee, identity, following=False)

    async def _follow(
        self, follower: str, followee: str, identity: Identity, *, following: bool
    ) -> FollowEntry:
        await self._claims().owned(follower, identity)
        _check_name(followee)
        target = await self._claims().cached(followee)
        if target is None:
            raise UnknownUser(f"no user {followee!r}")
        sets = self._started_sets()
        # Order this entry after any earlier one for the same pair, even one
        # written from another peer of this user with a slower clock.
        for earlier in await sets.read(
            "following", identity.public_key, member=target.public_key
        ):
            self._hlc.observe(earlier.timestamp, trusted=True)
        entry = FollowEntry.create(
            identity,
            follower=follower,
            followee=followee,
            followee_key=target.public_key,
            following=following,
            timestamp=self._hlc.now(),
        )
        await asyncio.gather(
            sets.add("followers", target.public_key, [entry]),
            sets.add("following", identity.public_key, [entry]),
        )
        return entry

    async def get_followers(self, username: str) -> frozenset[str]:
        """The names of the users following `username`.

        Raises:
            UnknownUser: `username` is not registered.
            RegistryUnavailable: No DHT node could be reached.
        """
        entries = await self.get_follow_entries(username, "followers")
        return frozenset(e.follower for e in entries if e.following)

    async def get_following(self, username: str) -> frozenset[str]:
        """The names of the users `username` follows. See `get_followers`."""
        entries = await self.get_follow_entries(username, "following")
        return frozenset(e.followee for e in entries if e.following)

    async def get_follow_entries(
        self, username: str, relation: Relation, *, verify_names: bool = True
    ) -> tuple[FollowEntry, ...]:
        """The current entry (a follow or an unfollow) of each member of a set.

        Every entry is verified: signed by its follower, and for
        ``"followers"`` by the key that owns the follower's name (unless
        `verify_names` is false: for a caller that uses only the followers'
        keys, which the signatures already prove, and need not pay a name
        lookup per follower). Entries newer than a user's last session are
        the follows and unfollows that happened while the user was away:
        notifications are made of them.

        Raises:
            UnknownUser: `username` is not registered.
            RegistryUnavailable: No DHT node could be reached.
        """
        _check_name(username)
        claim = await self._claims().cached(username)
        if claim is None:
            raise UnknownUser(f"no user {username!r}")
        entries = await self._started_sets().read(relation, claim.public_key)
        if relation == "followers" and verify_names:
            entries = await self._claims().genuine(entries)
        return entries

    # Claims and presence

    async def _read_presence(self, public_key: bytes) -> Presence | None:
        key = presence_key(public_key)
        replicas: list[Replica] = await self._started().read(key, self.read_quorum)
        records = [r.value.presence for r in replicas if r.value and r.value.presence]
        if not records:
            return None
        newest = max(records, key=lambda p: p.seq)
        self._started().repair_if_stale(key, RegistryValue(presence=newest), replicas)
        return newest

    # Plumbing

    def _started(self) -> DhtNode:
        if self._node is None:
            raise UsageError("the registry is not started")
        return self._node

    def _claims(self) -> Claims:
        if self._name_claims is None:
            raise UsageError("the registry is not started")
        return self._name_claims

    def _started_sets(self) -> FollowSets:
        if self._sets is None:
            raise UsageError("the registry is not started")
        return self._sets

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    async def _maintain(self) -> None:
        """One round of upkeep (every second): rejoin when cut off, greet the
        bootstrap nodes now and then, drop contacts that left, refresh
        buckets and republish hourly."""
        node = self._started()
        if self._bootstrap and not node.has_neighbors():
            await node.bootstrap(self._bootstrap)
        elif time.monotonic() - self._last_greeting > self.rejoin_interval:
            # A bootstrap node that restarted knows nobody: without this, the
            # nodes joining through it make a network of their own, apart
            # from this one.
            self._last_greeting = time.monotonic()
            await node.greet(self._bootstrap)
        if time.monotonic() - self._last_check > _CONTACT_CHECK_INTERVAL:
            self._last_check = time.monotonic()
            await node.check_contacts()
        if time.monotonic() - self._last_refresh > _REFRESH_INTERVAL:
            self._last_refresh = time.monotonic()
            await node.refresh()


def _check_name(username: str) -> None:
    if not check_username(username):
        raise UsageError(f"invalid username {username!r}")


def _check_port(port: int) -> int:
    if not 0 <= port <= 65535:
        raise UsageError(f"a port is a number from 0 to 65535, not {port}")
    return port
