"""`DhtRegistry`: the signed, versioned user registry on a Kademlia DHT."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Sequence
from typing import Self

import attrs

from ._dht_node import DhtNode, Replica
from ._dht_protocol import RecordStorage
from ._errors import (
    AuthError,
    RegistryUnavailable,
    UnknownUser,
    UsageError,
    UsernameTaken,
)
from ._follow_sets import FollowSets
from ._hlc import HybridLogicalClock
from ._identity import Identity
from ._models import FollowEntry, Presence, UsernameClaim, check_username
from ._records import (
    Outcome,
    RegistryValue,
    SetRelation,
    claim_key,
    presence_key,
    shard_capacity,
)
from ._serializer import CborSerializer, Serializer

__all__ = ["DhtRegistry", "UserRecord"]

log = logging.getLogger("p2ptimeline.registry")

_MAX_CONCURRENT_CLAIM_READS = 32
_REBOOTSTRAP_INTERVAL = 1.0
_CONTACT_CHECK_INTERVAL = 10.0  # one silent contact pinged per check
_CLAIM_CACHE_SIZE = 100_000


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

    Args:
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
    """

    def __init__(
        self,
        ksize: int = 20,
        alpha: int = 3,
        *,
        read_quorum: int | None = None,
        rpc_timeout: float = 2.0,
        lease: float = 30.0,
        clock: Callable[[], float] = time.time,
        serializer: Serializer | None = None,
        node_id: bytes | None = None,
    ) -> None:
        if ksize < 1 or alpha < 1:
            raise UsageError("ksize and alpha must be positive")
        if node_id is not None and len(node_id) != 20:
            raise UsageError("a node id is 20 bytes")
        self._node_id = node_id
        self.ksize = ksize
        self.alpha = alpha
        self.read_quorum = min(ksize, read_quorum or max(alpha, ksize // 4))
        self.rpc_timeout = rpc_timeout
        self.lease = lease
        self._clock = clock
        self._serializer = serializer or CborSerializer()
        self._capacity = shard_capacity(self._serializer)
        self._hlc = HybridLogicalClock(self._now_ms)
        self._node: DhtNode | None = None
        self._sets: FollowSets | None = None
        self._bootstrap: list[tuple[str, int]] = []
        self._maintenance: asyncio.Task[None] | None = None
        self._leases: dict[bytes, asyncio.Task[None]] = {}
        self._seqs: dict[bytes, int] = {}
        self._claims: collections.OrderedDict[str, UsernameClaim] = (
            collections.OrderedDict()
        )
        self._claim_reads = asyncio.Semaphore(_MAX_CONCURRENT_CLAIM_READS)

    # Lifecycle

    async def start(
        self, host: str, port: int, bootstrap: Sequence[tuple[str, int]] = ()
    ) -> None:
        """Listen on UDP `host`:`port` (0 picks a free port) and join the network.

        Args:
            host: Interface to listen on.
            port: UDP port; `address` tells the one chosen for 0.
            bootstrap: ``(host, port)`` of nodes already in the network. If
                none answers, the registry keeps trying in the background.

        Raises:
            RegistryUnavailable: The port cannot be bound.
            UsageError: The registry is already started.
        """
        if self._node is not None:
            raise UsageError("the registry is already started")
        node = DhtNode(
            ksize=self.ksize,
            alpha=self.alpha,
            serializer=self._serializer,
            storage=RecordStorage(self._serializer, self._capacity),
            rpc_timeout=self.rpc_timeout,
            read_quorum=self.read_quorum,
            node_id=self._node_id,
        )
        try:
            await node.listen(port, interface=host)
        except OSError as exc:
            raise RegistryUnavailable(f"cannot listen on {host}:{port}: {exc}") from exc
        self._node = node
        self._sets = FollowSets(node, self._capacity)
        self._bootstrap = node.bootstrap_addresses = list(bootstrap)
        if self._bootstrap:
            await node.bootstrap(self._bootstrap)
            if not node.has_neighbors():
                log.warning("no bootstrap node answered; will keep trying")
        self._maintenance = asyncio.create_task(self._maintain(node))

    async def stop(self) -> None:
        """Leave the network: close the socket and stop every task. Idempotent.

        Presence leases are not withdrawn: call `set_presence(..., online=False)`
        first for a clean logout. Stopping without it is what a crash looks
        like to the network: the user reads as offline once the lease lapses.
        """
        node, self._node = self._node, None
        self._sets = None
        tasks = [t for t in (self._maintenance, *self._leases.values()) if t]
        self._maintenance = None
        self._leases.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if node is not None:
            await node.close()

    async def __aenter__(self) -> Self:
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
        node = self._started()
        key = claim_key(username)
        seq = 0
        while True:
            claim = UsernameClaim.create(identity, username, sealed_key, seq=seq)
            replies = await node.write(key, RegistryValue(claim=claim), patient=True)
            outcomes = [reply for _, reply in replies if reply is not None]
            if any(outcome is Outcome.TAKEN for outcome, _ in outcomes):
                # Held by another key, or claimed by someone else at this
                # very moment: the claim most of the closest nodes hold wins.
                # The loser withdraws the replicas it got, so that readers
                # asking only a few of the closest nodes agree on the winner.
                winner = await self._read_claim(username, everywhere=True)
                if winner is None or winner.public_key != identity.public_key:
                    if any(outcome is Outcome.STORED for outcome, _ in outcomes):
                        await self._withdraw(claim, identity)
                    raise UsernameTaken(f"{username!r} is taken")
            held = [s for outcome, s in outcomes if outcome is Outcome.STALE]
            if not held or max(held) < seq:
                break
            seq = max(held) + 1  # our own earlier claim: replace it
        self._remember(claim)
        return claim

    async def get_user(self, username: str) -> UserRecord | None:
        """The user's claim and presence, read fresh from the network.

        Returns:
            None if no one claimed `username`.

        Raises:
            UsageError: The name is invalid.
            RegistryUnavailable: No DHT node could be reached.
        """
        _check_name(username)
        claim = await self._read_claim(username)
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
        claim = await self._cached_claim(username)
        return None if claim is None else claim.public_key

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
        await self._owned_claim(username, identity)
        key = presence_key(identity.public_key)
        renewal = self._leases.pop(key, None)
        if renewal is not None:
            renewal.cancel()
        record = await self._publish_presence(identity, address, online)
        if online:
            self._leases[key] = asyncio.create_task(
                self._renew(identity, address), name=f"lease of {username}"
            )
        return record

    async def _publish_presence(
        self, identity: Identity, address: tuple[str, int], online: bool
    ) -> Presence:
        key = presence_key(identity.public_key)
        now = self._now_ms()
        seq = max(now, self._seqs.get(key, -1) + 1)
        while True:
            record = Presence.create(
                identity,
                host=address[0],
                port=address[1],
                online=online,
                expires_ms=now + int(self.lease * 1000) if online else now,
                seq=seq,
            )
            self._seqs[key] = seq
            replies = await self._started().write(key, RegistryValue(presence=record))
            held = [
                reply[1]
                for _, reply in replies
                if reply and reply[0] is Outcome.STALE and isinstance(reply[1], int)
            ]
            if not held or max(held) < seq:
                return record
            # A newer record from another peer of this user: go past it.
            seq = max(held) + 1

    async def _renew(self, identity: Identity, address: tuple[str, int]) -> None:
        while True:
            await asyncio.sleep(self.lease / 3)
            try:
                await self._publish_presence(identity, address, online=True)
            except RegistryUnavailable as exc:
                log.warning("could not renew the presence lease: %s", exc)

    # Follow sets

    async def follow(
        self, follower: str, followee: str, identity: Identity
    ) -> FollowEntry:
        """Record that `follower` follows `followee`; `identity` is the follower's.

        Raises:
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
        await self._owned_claim(follower, identity)
        target = await self._cached_claim(followee)
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
        self, username: str, relation: SetRelation, *, verify_names: bool = True
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
        claim = await self._cached_claim(username)
        if claim is None:
            raise UnknownUser(f"no user {username!r}")
        entries = await self._started_sets().read(relation, claim.public_key)
        if relation == "followers" and verify_names:
            entries = await self._with_true_names(entries)
        return entries

    async def _with_true_names(
        self, entries: tuple[FollowEntry, ...]
    ) -> tuple[FollowEntry, ...]:
        """Keep the entries whose follower name is really the signer's."""

        async def genuine(entry: FollowEntry) -> bool:
            try:
                claim = await self._cached_claim(entry.follower)
            except RegistryUnavailable:
                return False
            if claim is None or claim.public_key != entry.follower_key:
                log.info("dropped a follow entry forging the name %r", entry.follower)
                return False
            return True

        verdicts = await asyncio.gather(*(genuine(e) for e in entries))
        return tuple(e for e, ok in zip(entries, verdicts, strict=True) if ok)

    # Claims and presence

    async def _withdraw(self, claim: UsernameClaim, identity: Identity) -> None:
        """Give up the replicas of `claim` that a race for its name lost."""
        withdrawal = UsernameClaim.create(
            identity, claim.username, b"", claim.seq + 1, withdrawn=True
        )
        key = claim_key(claim.username)
        try:
            await self._started().write(key, RegistryValue(claim=withdrawal))
        except RegistryUnavailable as exc:  # readers still outvote those replicas
            log.warning(
                "could not withdraw a lost claim of %r: %s", claim.username, exc
            )

    async def _read_claim(
        self, username: str, *, everywhere: bool = False
    ) -> UsernameClaim | None:
        """The live claim of `username` held by most of the closest nodes.

        With `everywhere`, all `ksize` closest nodes are asked and only their
        answers count, so that two claimers of one name, each reading once
        both writes landed, count the same votes and agree on who won.
        Otherwise the read stops at the read quorum, unless it finds only
        withdrawn claims (a lost race's leftovers, where the winner's claim
        is on its way).
        """
        key = claim_key(username)
        node = self._started()
        replicas = await node.read(key, node.ksize if everywhere else self.read_quorum)
        held = [(r.close, r.value.claim) for r in replicas if r.value and r.value.claim]
        if everywhere and any(close for close, _ in held):
            held = [(close, claim) for close, claim in held if close]
        claims = [claim for _, claim in held]
        newest: dict[bytes, UsernameClaim] = {}
        for claim in sorted(claims, key=lambda c: c.seq):
            newest[claim.public_key] = claim
        # One vote per replica of a claim that its key has not withdrawn.
        votes = collections.Counter(
            c.public_key
            for c in claims
            if not c.withdrawn and not newest[c.public_key].withdrawn
        )
        if not votes:
            if claims and not everywhere:
                return await self._read_claim(username, everywhere=True)
            return None
        top = max(votes.values())
        winner = newest[min(k for k, n in votes.items() if n == top)]
        self._started().repair_if_stale(key, RegistryValue(claim=winner), replicas)
        self._remember(winner)
        return winner

    async def _cached_claim(self, username: str) -> UsernameClaim | None:
        """The claim of `username`, from the cache if seen before.

        The key of a name never changes once claimed, so a cached claim is as
        good as a fresh one for telling who owns a name.
        """
        claim = self._claims.get(username)
        if claim is not None:
            self._claims.move_to_end(username)
            return claim
        async with self._claim_reads:
            return await self._read_claim(username)

    def _remember(self, claim: UsernameClaim) -> None:
        self._claims[claim.username] = claim
        self._claims.move_to_end(claim.username)
        while len(self._claims) > _CLAIM_CACHE_SIZE:
            self._claims.popitem(last=False)

    async def _owned_claim(self, username: str, identity: Identity) -> UsernameClaim:
        _check_name(username)
        claim = await self._cached_claim(username)
        if claim is None:
            raise UnknownUser(f"no user {username!r}")
        if claim.public_key != identity.public_key:
            raise AuthError(f"this identity does not own {username!r}")
        return claim

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

    def _started_sets(self) -> FollowSets:
        if self._sets is None:
            raise UsageError("the registry is not started")
        return self._sets

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    async def _maintain(self, node: DhtNode) -> None:
        """Rejoin when cut off; drop contacts that left; refresh buckets and
        republish hourly."""
        last_refresh = last_check = time.monotonic()
        while True:
            await asyncio.sleep(_REBOOTSTRAP_INTERVAL)
            try:
                if self._bootstrap and not node.has_neighbors():
                    await node.bootstrap(self._bootstrap)
                if time.monotonic() - last_check > _CONTACT_CHECK_INTERVAL:
                    last_check = time.monotonic()
                    await node.check_contacts()
                if time.monotonic() - last_refresh > 3600:
                    last_refresh = time.monotonic()
                    await node._refresh_table()
            except Exception:  # keep maintaining whatever one round hit
                log.exception("DHT maintenance failed")


def _check_name(username: str) -> None:
    if not check_username(username):
        raise UsageError(f"invalid username {username!r}")
