"""`Peer`: the timeline service for one user, composed of the other parts."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Literal, Self, TypeVar

import attrs

from .._clock import ClockSync
from .._dht.registry import DhtRegistry
from .._errors import (
    AuthError,
    InvalidRecord,
    InvalidSignature,
    NetworkError,
    NotLoggedIn,
    PeerUnreachable,
    ProtocolError,
    RegistryUnavailable,
    RemoteError,
    StoreError,
    UnknownUser,
    UsageError,
)
from .._hlc import HybridLogicalClock
from .._identity import DEFAULT_SEAL_COST, Identity, check_password
from .._memory_store import MemoryStore
from .._models import (
    MAX_POST_CHARS,
    MAX_USERNAME_CHARS,
    FollowEntry,
    HybridTimestamp,
    Post,
    Presence,
    check_username,
)
from .._ratelog import RateLimitedLog
from .._serializer import CborSerializer, Serializer
from .._sqlite_store import SqliteStore
from .._store import LocalStore, StoredIdentity
from .connection import ConnectionPool, Limits, PeerServer
from .directory import Follower, FollowerDirectory
from .tree import REHOME_PER_FANOUT, DisseminationTree, Relay
from .wire import (
    MAX_TREE_SIZE,
    Ack,
    FollowNotice,
    FrameTooLarge,
    GetPosts,
    Message,
    PostBatch,
    PostPush,
    PresenceNotice,
    Refusal,
    TreeMember,
    check_host,
)

__all__ = ["Notification", "Peer", "PeerConfig"]

log = logging.getLogger("p2ptimeline.peer")

T = TypeVar("T")
X = TypeVar("X")

_PAGE = 500  # posts per GetPosts reply, at most
_FRAME_ENVELOPE = 1024  # bytes of a PostBatch frame besides its posts, at most
_MAX_CATCH_UP = 100_000  # posts pulled of one author at most, per sync
_NODE_ID_STATE = "dht/node-id"  # the DHT node id, kept across restarts
_PULL_SOURCES = 8  # followers tried as sources of an offline author's posts
_PULL_MERGE = 3  # followers whose answers are merged when the author is offline
_CONCURRENCY = 16
_FORWARD_MEMORY = 10_000  # ids of posts remembered as forwarded
_MAX_TIMELINE = 2**31 - 1  # a larger `timeline` limit is taken as this


@attrs.frozen(kw_only=True)
class PeerConfig:
    """Tunable behaviour of a `Peer`; the defaults suit a real network."""

    fanout: int = 2
    """Arity k of dissemination trees: the author sends each post to k peers."""
    retention: float | None = 7 * 24 * 3600.0
    """Seconds a post is kept (None: forever). The seed used 5 minutes."""
    keep_own_posts: bool = True
    """Keep the user's own posts whatever their age."""
    retention_interval: float = 300.0
    """Seconds between runs of the retention policy while logged in."""
    pull_interval: float = 30.0
    """Seconds between pulls of missed posts from followees while logged in."""
    push_tries: int = 3
    """Tries to hand a post to a child in the tree before re-homing its subtree."""
    push_backoff: float = 0.1
    """Seconds before the second try; doubled before each further one."""
    max_rehomed: int = attrs.field(default=64, validator=attrs.validators.ge(0))
    """Most members a peer pushes a post to in place of unreachable ones, per
    push it forwards: `REHOME_PER_FANOUT` (8) times the tree's fanout, and
    never more than this. The rest of an unreachable member's subtree catches
    up by pulling. (An author re-homes any of its own followers.) See
    `Relay`."""
    max_relays: int = attrs.field(default=64, validator=attrs.validators.ge(0))
    """Most received pushes forwarded at once; a push beyond is stored but not
    forwarded (its subtree catches up by pulling)."""
    max_future_ms: int = 5 * 60 * 1000
    """Posts stamped further than this in the future are refused."""
    incoming_buffer: int = 1000
    """Posts buffered per `incoming()` iterator; the oldest are dropped beyond."""
    seal_cost: int = DEFAULT_SEAL_COST
    """Cost of sealing the private key: log2 of the Argon2id memory in KiB, from
    10 (1 MiB, for tests) to 18 (256 MiB); the default, 16, is 64 MiB (see
    `Identity.seal`). Every login, and every offline guess, pays it once."""
    ksize: int = 20
    """Kademlia's k for the registry."""
    alpha: int = 3
    """Kademlia's alpha for the registry."""
    rpc_timeout: float = 2.0
    """Seconds to wait for a DHT node."""
    lease: float = 30.0
    """Seconds a presence lease lasts."""
    ntp_interval: float = 600.0
    """Seconds between NTP syncs."""
    limits: Limits = attrs.field(factory=Limits)
    """Limits of the peer protocol (frame size, timeouts, connections)."""


@attrs.frozen(kw_only=True)
class Notification:
    """Someone followed or unfollowed the logged-in user."""

    kind: Literal["follow", "unfollow"]
    """What happened."""
    user: str
    """Who did it."""
    timestamp: HybridTimestamp
    """When, on their clock."""


@attrs.define
class _Session:
    username: str
    identity: Identity
    following: set[str]
    directory: FollowerDirectory
    notifications: list[Notification]
    tasks: set[asyncio.Future[object]] = attrs.field(factory=set)


class Peer:
    """A peer of the timeline network: one user's gateway to it.

    A peer runs a DHT node (UDP) and a peer-protocol server (TCP) on the same
    port, and a local store. Register or log in a user, then follow, post,
    and read the timeline; posts from followees arrive by themselves.

    Args:
        host: Interface to listen on; also the address other peers reach,
            unless `advertised_host` is given.
        port: UDP and TCP port; 0 picks one free for both (see `port`).
        bootstrap: ``(host, port)`` of DHT nodes already in the network.
        advertised_host: The address other peers reach this one at, when
            it is not `host`: needed when listening on every interface
            (``"0.0.0.0"`` or ``"::"``), and behind a port-preserving
            forward. Published in the user's presence record.
        data_dir: Directory for the store (`SqliteStore`); the peer keeps
            identities and posts there across restarts. Without it and
            without `store`, everything is kept in memory.
        store: A `LocalStore` to use instead of the default one.
        clock: The `ClockSync` to use (default: `ClockSync()`, public NTP).
        serializer: Encoding of DHT values and frames; all peers of a
            network must use the same one.
        config: Tunable behaviour.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        bootstrap: Sequence[tuple[str, int]] = (),
        *,
        advertised_host: str | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        store: LocalStore | None = None,
        clock: ClockSync | None = None,
        serializer: Serializer | None = None,
        config: PeerConfig | None = None,
    ) -> None:
        if advertised_host is None and _is_wildcard(host):
            raise UsageError(
                f"listening on every interface ({host!r}) needs an advertised "
                "host: the address other peers reach this one at"
            )
        if not check_host(advertised_host or host):
            raise UsageError(
                f"{advertised_host or host!r} is not an address or host name"
            )
        self.config = config or PeerConfig()
        self._host = host
        self._advertised_host = advertised_host or host
        self._requested_port = port
        self._bootstrap = list(bootstrap)
        if store is None:
            if data_dir is None:
                store = MemoryStore()
            else:
                # Private: it holds the sealed keys and what the user reads.
                Path(data_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
                store = SqliteStore(Path(data_dir) / "peer.db")
        self._store = store
        self._clock = clock or ClockSync()
        self._hlc = HybridLogicalClock(self._clock.now_ms)
        self._serializer = serializer or CborSerializer()
        self._tree = DisseminationTree(self.config.fanout)
        self._registry: DhtRegistry | None = None
        self._server: PeerServer | None = None
        self._pool: ConnectionPool | None = None
        self._port: int | None = None
        self._session: _Session | None = None
        self._tasks: set[asyncio.Future[object]] = set()
        self._subscribers: set[asyncio.Queue[Post | None]] = set()
        self._forwarded: collections.OrderedDict[bytes, None] = (
            collections.OrderedDict()
        )
        self._relays: set[asyncio.Future[object]] = set()
        self._ratelog = RateLimitedLog(log)

    # Lifecycle

    async def start(self) -> None:
        """Open the store, listen on UDP and TCP, and join the network.

        Raises:
            NetworkError: The port cannot be bound.
            StoreError: The store cannot be opened.
            UsageError: The peer is already started.
        """
        if self._registry is not None:
            raise UsageError("the peer is already started")
        await self._store.open()
        try:
            await self._listen()
        except BaseException:
            await self._store.close()
            raise
        self._clock.start(self.config.ntp_interval)
        log.info("peer listening on %s:%d", self._host, self._port)

    async def _listen(self) -> None:
        limits = self.config.limits
        node_id = await self._store.get_state(_NODE_ID_STATE)
        if node_id is None or len(node_id) != 20:
            node_id = os.urandom(20)
            await self._store.put_state(_NODE_ID_STATE, node_id)
        for _ in range(10):
            registry = DhtRegistry(
                self.config.ksize,
                self.config.alpha,
                rpc_timeout=self.config.rpc_timeout,
                lease=self.config.lease,
                clock=self._clock.now,
                serializer=self._serializer,
                node_id=node_id,
            )
            await registry.start(self._host, self._requested_port, self._bootstrap)
            port = registry.address[1]
            server = PeerServer(self._handle, self._serializer, limits)
            try:
                await server.start(self._host, port)
            except OSError as exc:
                await registry.stop()
                if self._requested_port:
                    raise NetworkError(
                        f"cannot listen on TCP port {port}: {exc}"
                    ) from exc
                continue  # the UDP port's TCP twin is taken: try another
            self._registry, self._server, self._port = registry, server, port
            self._pool = ConnectionPool(self._serializer, limits)
            return
        raise NetworkError("found no port free for both UDP and TCP")

    async def stop(self) -> None:
        """Log out (if logged in) and release every socket, task and file.

        Idempotent. A graceful stop marks the user offline at once; a crash
        (the process killed) is seen once its presence lease lapses. Whatever
        the logout meets (an unreachable registry, an error, cancellation),
        everything is released; a failed logout is logged, not raised.
        """
        try:
            if self._session is not None:
                await self._say_goodbye()
        finally:
            await self._release()

    async def _say_goodbye(self) -> None:
        try:
            async with asyncio.timeout(self.config.rpc_timeout * 2):
                await self.logout()
        except (NetworkError, TimeoutError) as exc:  # the lease lapses instead
            log.info("could not publish the logout: %r", exc)
        except (RemoteError, StoreError) as exc:
            log.warning("could not log out cleanly: %r", exc)
        except Exception:
            log.exception("could not log out cleanly")

    async def _release(self) -> None:
        """Free everything without a goodbye: what `stop()` does after logging
        out, and all a crash leaves behind (see `testing.crash`).

        Every step runs whatever the steps before it raised.
        """
        async with contextlib.AsyncExitStack() as steps:  # run last pushed first
            steps.push_async_callback(self._store.close)
            steps.push_async_callback(self._clock.stop)
            steps.callback(self._forget_sockets)
            if self._registry is not None:
                steps.push_async_callback(self._registry.stop)
            if self._pool is not None:
                steps.push_async_callback(self._pool.close)
            if self._server is not None:
                steps.push_async_callback(self._server.close)
            steps.callback(self._end_subscriptions)
            steps.push_async_callback(_cancel, self._tasks)
            steps.push_async_callback(self._end_session)

    def _forget_sockets(self) -> None:
        self._server = self._pool = self._registry = None
        self._port = None

    def _end_subscriptions(self) -> None:
        for queue in self._subscribers:
            _offer(queue, None)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        """The UDP and TCP port the peer listens on.

        Raises:
            UsageError: The peer is not started.
        """
        if self._port is None:
            raise UsageError("the peer is not started")
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` where other peers reach this one (the advertised
        host, if one was given)."""
        return (self._advertised_host, self.port)

    @property
    def username(self) -> str | None:
        """The logged-in user, if any."""
        return self._session.username if self._session else None

    @property
    def registry(self) -> DhtRegistry:
        """The peer's DHT registry node.

        Raises:
            UsageError: The peer is not started.
        """
        if self._registry is None:
            raise UsageError("the peer is not started")
        return self._registry

    # Accounts

    async def register(
        self, username: str, password: str, *, publish_key: bool = True
    ) -> None:
        """Create a user: a new identity, a claim of the name, then log in.

        Args:
            username: The name to claim: 1 to 32 characters of lowercase
                ASCII letters, digits, ``_``, ``.`` and ``-``, not starting
                with ``.`` or ``-``.
            password: Seals the private key. Refused: an empty password, one
                shorter than 8 characters, one made of the username, a
                well-known one, a run or repetition of characters.
            publish_key: Publish the sealed key in the name's claim, so that
                the user can log in on any peer. False keeps it in this
                peer's store only: nobody can read it from the DHT and guess
                the password offline, and the user can log in only on a peer
                whose store holds it.

        Raises:
            UsernameTaken: The name is taken.
            UsageError: The name or the password is refused (the message says
                why), or a user is logged in here.
            RegistryUnavailable: No DHT node could be reached.
        """
        self._check_logged_out()
        _check_name(username)
        check_password(password, username)
        identity = Identity.generate()
        sealed = await asyncio.to_thread(
            identity.seal, password, cost=self.config.seal_cost
        )
        published = sealed if publish_key else b""
        await self.registry.claim_username(username, identity, published)
        await self._store.save_identity(
            StoredIdentity(
                username=username, public_key=identity.public_key, sealed_key=sealed
            )
        )
        await self._begin_session(username, identity)

    async def login(self, username: str, password: str) -> None:
        """Log in, on any peer: the sealed identity comes from the DHT if need be.

        The sealed key published in the name's claim is the one opened; a
        user who registered with ``publish_key=False`` publishes none, and
        logs in with the one kept in this peer's store. Logging in publishes
        the user's presence, collects the follows and unfollows that happened
        while away (`notifications`), applies the retention policy and pulls
        the posts missed from followees.

        Raises:
            UnknownUser: No such user.
            AuthError: Wrong password, or no sealed key to open: the user
                publishes none and this peer's store holds none.
            UsageError: A user is already logged in here, or `username` is
                not a valid username (the message says why).
            RegistryUnavailable: No DHT node could be reached.
        """
        self._check_logged_out()
        _check_name(username)
        record = await self.registry.get_user(username)
        if record is None:
            raise UnknownUser(f"no user {username!r}")
        blob = record.sealed_key
        if not blob:
            stored = await self._store.load_identity(username)
            if stored is None or stored.public_key != record.public_key:
                raise AuthError(
                    f"{username!r} does not publish a sealed key: log in on a "
                    "peer that holds it (where the user registered)"
                )
            blob = stored.sealed_key
        try:
            identity = await asyncio.to_thread(Identity.unseal, blob, password)
        except RemoteError as exc:
            raise AuthError(f"the sealed key cannot be opened: {exc}") from exc
        if identity.public_key != record.public_key:
            raise AuthError("the sealed key does not match the registered key")
        if record.sealed_key:
            await self._store.save_identity(
                StoredIdentity(
                    username=username,
                    public_key=record.public_key,
                    sealed_key=record.sealed_key,
                )
            )
        await self._begin_session(username, identity)

    async def change_password(self, old: str, new: str) -> None:
        """Seal the logged-in user's key under a new password.

        The new sealed key replaces the old one in this peer's store and, if
        the user publishes it, in the name's claim (a claim with a higher
        `seq`), so that logins on any peer take the new password. The key
        itself stays the same: a copy of the old sealed key, taken from the
        DHT or a peer's store before the change, still opens with the old
        password. Change the password to stop a password known to others
        from working from now on; it does not undo a leak of the key.

        Raises:
            NotLoggedIn: Nobody is logged in.
            AuthError: `old` is not the user's password.
            UsageError: `new` is refused (the message says why).
            UnknownUser: The registry lost the user's claim; nothing changed.
            RegistryUnavailable: No DHT node could be reached; nothing changed.
        """
        session = self._require_session()
        username, identity = session.username, session.identity
        check_password(new, username)
        stored = await self._store.load_identity(username)
        if stored is None or stored.public_key != identity.public_key:
            raise AuthError(f"this peer's store holds no sealed key of {username!r}")
        try:
            await asyncio.to_thread(Identity.unseal, stored.sealed_key, old)
        except AuthError as exc:
            raise AuthError("the current password is wrong") from exc
        except RemoteError as exc:
            raise AuthError(f"the sealed key cannot be opened: {exc}") from exc
        record = await self.registry.get_user(username)
        if record is None:
            raise UnknownUser(f"the registry lost the claim of {username!r}")
        sealed = await asyncio.to_thread(identity.seal, new, cost=self.config.seal_cost)
        if record.sealed_key:  # published: publish the new one instead
            await self.registry.claim_username(username, identity, sealed)
        await self._store.save_identity(
            StoredIdentity(
                username=username, public_key=identity.public_key, sealed_key=sealed
            )
        )

    async def logout(self) -> None:
        """Publish that the user is offline and end the session.

        Raises:
            NotLoggedIn: Nobody is logged in.
        """
        session = self._require_session()
        await self._end_session()
        await self._store.save_relation(
            session.username, "followers", session.directory.names()
        )
        try:
            await self.registry.set_presence(
                session.username, session.identity, self.address, online=False
            )
        except RegistryUnavailable as exc:
            log.warning("could not publish the logout: %s", exc)

    async def _begin_session(self, username: str, identity: Identity) -> None:
        registry = self.registry
        following, entries = await asyncio.gather(
            registry.get_following(username),
            registry.get_follow_entries(username, "followers"),
        )
        session = _Session(
            username=username,
            identity=identity,
            following=set(following),
            directory=FollowerDirectory(),
            notifications=[],
        )
        known = await self._store.load_relation(username, "followers")
        for entry in sorted(entries, key=lambda e: e.timestamp):
            session.directory.apply(entry)
            if entry.following and entry.follower not in known:
                session.notifications.append(_notice("follow", entry))
            elif not entry.following and entry.follower in known:
                session.notifications.append(_notice("unfollow", entry))
        await self._store.save_relation(username, "following", following)
        await self._store.save_relation(
            username, "followers", session.directory.names()
        )
        self._session = session
        try:
            await registry.set_presence(username, identity, self.address, online=True)
        except BaseException:
            await self._end_session()
            raise
        await self._apply_retention()
        self._session_task(session, self._announce(session))
        self._session_task(session, self._every(self.config.pull_interval, self.sync))
        self._session_task(
            session, self._every(self.config.pull_interval, self._reread_followers)
        )
        self._session_task(
            session, self._every(self.config.retention_interval, self._apply_retention)
        )
        await self.sync()

    async def _end_session(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await _cancel(session.tasks)

    # Following

    async def follow(self, username: str) -> None:
        """Follow `username`: their posts reach this user from now on.

        The followee learns it at once if online, else at its next login.

        Raises:
            UnknownUser: No such user.
            NotLoggedIn: Nobody is logged in.
            UsageError: Following oneself, or `username` is not a valid
                username (the message says why).
            RegistryUnavailable: No DHT node could be reached.
        """
        session = self._require_session()
        _check_name(username)
        if username == session.username:
            raise UsageError("a user cannot follow themselves")
        entry = await self.registry.follow(session.username, username, session.identity)
        session.following.add(username)
        await self._store.save_relation(
            session.username, "following", session.following
        )
        await self._notify_followee(session, FollowNotice(entry=entry, presence=None))
        self._session_task(session, self._pull(username))

    async def unfollow(self, username: str) -> None:
        """Stop following `username`. See `follow`."""
        session = self._require_session()
        _check_name(username)
        entry = await self.registry.unfollow(
            session.username, username, session.identity
        )
        session.following.discard(username)
        await self._store.save_relation(
            session.username, "following", session.following
        )
        await self._notify_followee(session, FollowNotice(entry=entry, presence=None))

    async def _notify_followee(self, session: _Session, notice: FollowNotice) -> None:
        """Tell the followee now, if it is online (it learns at login otherwise)."""
        followee = notice.entry.followee
        presence = await self._own_presence(session)
        notice = FollowNotice(entry=notice.entry, presence=presence)
        try:
            address = await self._online_address(followee)
            if address is not None:
                await self._request(address, notice)
        except (NetworkError, RemoteError) as exc:
            log.info("could not tell %s about the follow: %s", followee, exc)

    async def followers(self, username: str) -> list[str]:
        """The users following `username`, sorted.

        Raises:
            UnknownUser: No such user.
            RegistryUnavailable: No DHT node could be reached.
        """
        return sorted(await self.registry.get_followers(username))

    async def following(self, username: str) -> list[str]:
        """The users `username` follows, sorted. See `followers`."""
        return sorted(await self.registry.get_following(username))

    async def suggestions(self, limit: int = 10) -> list[str]:
        """Whom to follow: friends of friends, most followed by one's followees first.

        Never the user or someone the user already follows.

        Raises:
            NotLoggedIn: Nobody is logged in.
        """
        session = self._require_session()
        counts: collections.Counter[str] = collections.Counter()
        excluded = session.following | {session.username}

        async def tally(followee: str) -> None:
            try:
                names = await self.registry.get_following(followee)
            except (UnknownUser, RegistryUnavailable) as exc:
                log.info("no suggestions from %s: %s", followee, exc)
                return
            counts.update(names - excluded)

        await _bounded(tally, sorted(session.following))
        ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        return [name for name, _ in ranked[: max(limit, 0)]]

    async def notifications(self) -> list[Notification]:
        """Follows and unfollows of this user: those that happened while away
        (found at login) and those since, oldest first.

        Raises:
            NotLoggedIn: Nobody is logged in.
        """
        return list(self._require_session().notifications)

    # Posts

    async def post(self, text: str) -> Post:
        """Publish a post to the user's followers; returns it once stored here.

        Args:
            text: The post: at most `MAX_POST_CHARS` (1,000) characters, and
                not empty or only whitespace.

        Raises:
            NotLoggedIn: Nobody is logged in.
            UsageError: The text is empty (or only whitespace) or too long.
        """
        session = self._require_session()
        if isinstance(text, str) and not text.strip():
            empty = "only whitespace" if text else "empty"
            raise UsageError(f"a post needs some text: this one is {empty}")
        if isinstance(text, str) and len(text) > MAX_POST_CHARS:
            raise UsageError(
                f"a post is at most {MAX_POST_CHARS:,} characters; "
                f"this one has {len(text):,}"
            )
        try:
            post = Post.create(
                session.identity, session.username, text, self._hlc.now()
            )
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        await self._store.add([post])
        self._remember_forwarded(post.id)  # a push of it back goes no further
        self._spawn(self._disseminate(session, post))
        return post

    async def timeline(self, limit: int = 50, before: Post | None = None) -> list[Post]:
        """The user's and their followees' posts, newest first.

        Args:
            limit: At most this many posts: 0 gives none; a limit above
                2**31 - 1 is taken as 2**31 - 1 (all a store holds, in
                practice).
            before: Continue after this post (the last one of a previous page).

        Raises:
            NotLoggedIn: Nobody is logged in.
            UsageError: `limit` is negative.
        """
        session = self._require_session()
        if limit < 0:
            raise UsageError(f"a timeline limit is 0 or more, not {limit}")
        authors = session.following | {session.username}
        limit = min(limit, _MAX_TIMELINE)
        return await self._store.timeline(authors, limit=limit, before=before)

    def incoming(self) -> AsyncIterator[Post]:
        """Posts as they arrive from followees (pushed or pulled), until `stop()`.

        The iterator gets every post that arrives after this call, even
        before iteration starts::

            stream = peer.incoming()
            async for post in stream:
                ...

        Each iterator buffers up to `PeerConfig.incoming_buffer` posts;
        beyond that the oldest are dropped (with a warning).
        """
        queue: asyncio.Queue[Post | None] = asyncio.Queue(self.config.incoming_buffer)
        self._subscribers.add(queue)
        return self._drain(queue)

    async def _drain(self, queue: asyncio.Queue[Post | None]) -> AsyncIterator[Post]:
        try:
            while (post := await queue.get()) is not None:
                yield post
        finally:
            self._subscribers.discard(queue)

    async def sync(self) -> int:
        """Pull the posts missed from every followee now; returns how many were new.

        Each followee's posts come from the followee if it is online, else
        from some of its online followers. Runs at login and periodically.

        Raises:
            NotLoggedIn: Nobody is logged in.
        """
        session = self._require_session()
        counts = await _bounded(self._pull, sorted(session.following))
        return sum(counts)

    async def _pull(self, author: str) -> int:
        """Fetch the posts of `author` this peer may have missed.

        It asks for everything after the author's *watermark*: the time up
        to which this peer is known to hold all the author's posts. (The
        newest post held is no such mark: pushes can arrive with gaps when
        a forwarder dies.) Only a pull from the author, who holds them all,
        moves the mark, and only up to the last post accepted; followers,
        who hold what they received, are asked when the author is offline,
        and a few of their answers are merged. Posts are stored a page at a
        time, as they arrive. A source that fails or sends bad posts is
        skipped (what it sent before stays).
        """
        me = self._require_session().username
        mark_key = f"watermark/{me}/{author}"
        mark = await self._store.get_state(mark_key)
        since = HybridTimestamp.unpack(int.from_bytes(mark)) if mark else None
        try:
            key = await self._public_key(author)
            presence = await self.registry.get_presence(key)
        except (NetworkError, RemoteError, UnknownUser) as exc:
            log.info("could not pull %s's posts: %s", author, exc)
            return 0
        new = 0
        if presence is not None and presence.is_online(self._clock.now_ms()):
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
        if not holders:  # the author and its followers offline: normal
            log.info("no online source of %s's posts to catch up from", author)
        answered = 0
        for address in holders:
            got, complete = await self._pull_from(address, author, key, since)
            new += got
            answered += complete
            if answered >= _PULL_MERGE:
                break
        return new

    async def _holders(self, author: str) -> list[tuple[str, int]]:
        """Addresses of up to `_PULL_SOURCES` online followers of `author`
        (other than this peer's user), picked at random to spread the load.

        Only the followers' keys are needed (their entries' signatures prove
        them), so the entries' names are not looked up.
        """
        entries = await self.registry.get_follow_entries(
            author, "followers", verify_names=False
        )
        me = self.username
        keys = [e.follower_key for e in entries if e.following and e.follower != me]
        keys = random.sample(keys, min(len(keys), 64))
        found: list[tuple[str, int]] = []
        for start in range(0, len(keys), _PULL_SOURCES):
            batch = keys[start : start + _PULL_SOURCES]
            now = self._clock.now_ms()
            found += [
                record.address
                for record in await _bounded(self.registry.get_presence, batch)
                if record is not None
                and record.is_online(now)
                and record.address != self.address
            ]
            if len(found) >= _PULL_SOURCES:
                break
        return found[:_PULL_SOURCES]

    async def _pull_from(
        self,
        address: tuple[str, int],
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
        new = taken = 0
        while taken < _MAX_CATCH_UP:
            try:
                page = await self._page(address, author, key, since)
            except (NetworkError, RemoteError) as exc:
                log.info("could not pull %s's posts from %s: %s", author, address, exc)
                return new, False
            timely = self._timely(page.posts)
            new += len(await self._accept(timely))
            if timely and mark_key is not None:
                mark = timely[-1].timestamp.packed().to_bytes(8)
                await self._store.put_state(mark_key, mark)
            taken += len(page.posts)
            if len(timely) < len(page.posts):
                self._ratelog.info(
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
        self,
        address: tuple[str, int],
        author: str,
        key: bytes,
        since: HybridTimestamp | None,
    ) -> PostBatch:
        """One page of `author`'s posts after `since` from `address`, checked:
        each is the author's, signed with `key`, stamped after `since`, and
        none is older than the one before it.

        Raises:
            NetworkError: `address` did not answer.
            RemoteError: It broke the protocol or sent a bad post.
        """
        reply = await self._request(
            address, GetPosts(author=author, since=since, limit=_PAGE)
        )
        if not isinstance(reply, PostBatch):
            name = type(reply).__name__
            raise ProtocolError(f"{address} answered GetPosts with {name}")
        previous = None
        for post in reply.posts:
            if (
                post.author != author
                or (since is not None and post.timestamp <= since)
                or (previous is not None and post.timestamp < previous)
            ):
                raise ProtocolError(f"{address} sent a post not asked for")
            key = await self._verify(post, key)
            previous = post.timestamp
        return reply

    def _timely(self, posts: Sequence[Post]) -> Sequence[Post]:
        """`posts` (oldest first) up to the first one stamped more than
        `max_future_ms` ahead of now."""
        horizon = self._clock.now_ms() + self.config.max_future_ms
        for count, post in enumerate(posts):
            if post.timestamp.physical_ms > horizon:
                return posts[:count]
        return posts

    async def _accept(self, posts: Iterable[Post]) -> list[Post]:
        """Store verified posts; hand the new ones to `incoming()` iterators.

        Posts stamped more than `max_future_ms` ahead are refused.
        """
        horizon = self._clock.now_ms() + self.config.max_future_ms
        timely = []
        for post in posts:
            if post.timestamp.physical_ms > horizon:
                self._ratelog.info(
                    "future", "refused a post from the future by %s", post.author
                )
            else:
                timely.append(post)
        new = await self._store.add(timely)
        for post in new:
            with contextlib.suppress(InvalidRecord):
                self._hlc.observe(post.timestamp)
            for queue in self._subscribers:
                _offer(queue, post)
        return new

    # Dissemination

    async def _disseminate(self, session: _Session, post: Post) -> None:
        members = await self._online_followers(session)
        host, port = self.address
        me = TreeMember(name=session.username, host=host, port=port)
        tree = self._tree.arrange(me, members, post_id=post.id, key=_name)
        # The author's tree is its own followers, each in it once: it re-homes
        # any of them (and marks them unreachable for its next posts).
        relay: Relay[TreeMember] = Relay(
            self._tree, spare=len(members), max_size=MAX_TREE_SIZE
        )
        await self._relay(post, relay, tree, session)

    async def _online_followers(self, session: _Session) -> list[TreeMember]:
        """The followers to send a post to, refreshing stale presence first."""
        directory = session.directory
        now = self._clock.now_ms()
        stale = directory.stale(now, recheck_ms=int(self.config.lease * 1000 / 3))

        async def refresh(follower: Follower) -> None:
            with contextlib.suppress(RegistryUnavailable):
                presence = await self.registry.get_presence(follower.public_key)
                if presence is not None:
                    directory.update_presence(follower.name, presence)
            follower.checked_ms = now

        await _bounded(refresh, stale)
        members = []
        for follower in directory.online(self._clock.now_ms()):
            presence = follower.presence
            assert presence is not None  # online() has a presence
            if not check_host(presence.host):
                self._ratelog.info(
                    "bad-host",
                    "left %s out of a push: its presence names no usable host",
                    follower.name,
                )
                continue
            members.append(
                TreeMember(name=follower.name, host=presence.host, port=presence.port)
            )
        return members

    def _relay_for(self, shape: DisseminationTree) -> Relay[TreeMember]:
        """A `Relay` with this peer's bounds, for a received tree of `shape`."""
        spare = min(REHOME_PER_FANOUT * shape.fanout, self.config.max_rehomed)
        return Relay(shape, spare=spare, max_size=MAX_TREE_SIZE)

    async def _relay(
        self,
        post: Post,
        relay: Relay[TreeMember],
        tree: list[TreeMember],
        session: _Session | None = None,
    ) -> None:
        """Push `post` down `tree`, whose root is this peer, as `relay` says.

        Failed followers of the logged-in user (`session`) are marked
        unreachable.
        """
        await self._push_all(post, relay, relay.start(tree), session)
        if relay.dropped:
            self._ratelog.info(
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
        session: _Session | None,
    ) -> None:
        await asyncio.gather(*(self._push(post, relay, t, session) for t in subtrees))

    async def _push(
        self,
        post: Post,
        relay: Relay[TreeMember],
        tree: list[TreeMember],
        session: _Session | None,
    ) -> None:
        """Hand `post` to `tree[0]`, with its subtree to forward; if it cannot be
        reached after `push_tries`, or its push does not fit in a frame, send
        what `relay` says instead."""
        child = tree[0]
        delay = self.config.push_backoff
        for attempt in range(self.config.push_tries):
            if attempt:
                await asyncio.sleep(delay)
                delay *= 2
            try:
                push = PostPush(post=post, fanout=relay.shape.fanout, tree=tuple(tree))
                await self._request((child.host, child.port), push)
                return
            except FrameTooLarge as exc:
                split = relay.too_large(tree)
                if not split:  # Limits.max_frame_size below a post's size
                    log.warning("cannot push to %s: %s", child.name, exc)
                await self._push_all(post, relay, split, session)
                return
            except (NetworkError, RemoteError) as exc:
                self._ratelog.info(
                    "push-failed",
                    "push to %s failed (try %d): %s",
                    child.name,
                    attempt + 1,
                    exc,
                )
        if session is not None:
            session.directory.mark_unreachable(child.name)
        await self._push_all(post, relay, relay.unreachable(tree), session)

    # Requests from other peers

    async def _handle(self, message: Message, remote: tuple[str, int]) -> Message:
        try:
            return await self._dispatch(message)
        except (UnknownUser, NetworkError) as exc:
            # A name or record the request relies on cannot be checked now.
            log.info("refused a request from %s: %s", remote, exc)
            return Refusal(reason=str(exc)[:200])

    async def _dispatch(self, message: Message) -> Message:
        if isinstance(message, PostPush):
            return await self._on_push(message)
        if isinstance(message, GetPosts):
            return await self._on_get(message)
        if isinstance(message, FollowNotice):
            return await self._on_follow_notice(message)
        if isinstance(message, PresenceNotice):
            return await self._on_presence_notice(message)
        return Refusal(reason=f"unexpected {type(message).__name__}")

    async def _on_push(self, push: PostPush) -> Message:
        post = push.post
        await self._verify(post)
        session = self._session
        if session is not None and post.author in session.following:
            await self._accept([post])
        # Forward even when not storing (the subtree relies on this peer), but
        # each post once: a replayed push, or one of the same post with
        # another tree, goes no further.
        if len(push.tree) == 1 or not self._remember_forwarded(post.id):
            return Ack()  # a leaf, or forwarded already
        if len(self._relays) >= self.config.max_relays:
            self._ratelog.warning(
                "relays",
                "did not forward a post by %s: %d forwards under way already "
                "(its receivers catch up by pulling)",
                post.author,
                len(self._relays),
            )
            return Ack()
        # The tree's arity is the author's (`PostPush.fanout`), not ours.
        shape = DisseminationTree(push.fanout)
        relay = self._spawn(self._relay(post, self._relay_for(shape), list(push.tree)))
        self._relays.add(relay)
        relay.add_done_callback(self._relays.discard)
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

    async def _on_get(self, request: GetPosts) -> Message:
        limit = min(request.limit, _PAGE)
        posts = await self._store.posts_by(
            request.author, since=request.since, limit=limit
        )
        # As many of them as fit in one frame (long texts in wide characters
        # do not fit by the hundred); the asker comes back for the rest.
        limits = self.config.limits
        room = min(limits.max_page_size, limits.max_frame_size) - _FRAME_ENVELOPE
        for count, post in enumerate(posts):
            room -= len(self._serializer.encode(post))
            if room < 0:
                return PostBatch(posts=tuple(posts[:count]), more=True)
        return PostBatch(posts=tuple(posts), more=len(posts) == limit)

    async def _on_follow_notice(self, notice: FollowNotice) -> Message:
        session = self._session
        entry = notice.entry
        if session is None or entry.followee != session.username:
            raise ProtocolError("this peer's user is not the followee")
        if entry.followee_key != session.identity.public_key:
            raise InvalidRecord("follow entry for another key")
        entry.verify()
        if await self._public_key(entry.follower) != entry.follower_key:
            raise InvalidRecord(f"entry not signed by {entry.follower}")
        await self._take_follow_entries(session, [entry])
        if entry.following and notice.presence is not None:
            notice.presence.verify()
            session.directory.update_presence(entry.follower, notice.presence)
        return Ack()

    async def _reread_followers(self) -> None:
        """Take in follows and unfollows whose notice never arrived (it is
        sent once; the registry holds every entry)."""
        session = self._require_session()
        entries = await self.registry.get_follow_entries(session.username, "followers")
        await self._take_follow_entries(session, entries)

    async def _take_follow_entries(
        self, session: _Session, entries: Iterable[FollowEntry]
    ) -> None:
        """Apply verified follow entries of the user's followers, oldest
        first; note each change, and save the followers if any changed."""
        changed = False
        for entry in sorted(entries, key=lambda e: e.timestamp):
            change = session.directory.apply(entry)
            if change is not None:
                session.notifications.append(_notice(change, entry))
                changed = True
        if changed:
            await self._store.save_relation(
                session.username, "followers", session.directory.names()
            )

    async def _on_presence_notice(self, notice: PresenceNotice) -> Message:
        session = self._session
        if session is None:
            return Ack()
        presence = notice.presence
        presence.verify()
        if await self._public_key(notice.username) != presence.public_key:
            raise InvalidRecord(f"presence not signed by {notice.username}")
        session.directory.update_presence(notice.username, presence)
        return Ack()

    async def _announce(self, session: _Session) -> None:
        """Tell online followees where this user is now, so posts flow at once."""
        presence = await self._own_presence(session)
        if presence is None:
            return
        notice = PresenceNotice(username=session.username, presence=presence)

        async def tell(followee: str) -> None:
            try:
                address = await self._online_address(followee)
                if address is not None:
                    await self._request(address, notice)
            except (NetworkError, RemoteError, UnknownUser) as exc:
                log.debug("could not announce to %s: %s", followee, exc)

        await _bounded(tell, sorted(session.following))

    # Helpers

    async def _own_presence(self, session: _Session) -> Presence | None:
        key = session.identity.public_key
        with contextlib.suppress(RegistryUnavailable):
            return await self.registry.get_presence(key)
        return None

    async def _online_address(self, username: str) -> tuple[str, int] | None:
        presence = await self.registry.get_presence(await self._public_key(username))
        if presence is None or not presence.is_online(self._clock.now_ms()):
            return None
        return presence.address

    async def _verify(self, post: Post, key: bytes | None = None) -> bytes:
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
        key = key or await self._public_key(post.author)
        try:
            post.verify(key)
        except InvalidSignature:
            fresh = await self.registry.recheck_user(post.author)
            if fresh is None or fresh == key:
                raise
            post.verify(fresh)
            return fresh
        return key

    async def _public_key(self, username: str) -> bytes:
        """The key of `username`, from the registry (which caches it).

        Raises:
            UnknownUser: No such user.
            RegistryUnavailable: No DHT node could be reached.
        """
        key = await self.registry.get_public_key(username)
        if key is None:
            raise UnknownUser(f"no user {username!r}")
        return key

    async def _request(self, address: tuple[str, int], message: Message) -> Message:
        if self._pool is None:
            raise PeerUnreachable("the peer is stopped")
        return await self._pool.request(address, message)

    async def _apply_retention(self) -> None:
        session = self._session
        if self.config.retention is None or session is None:
            return
        cutoff = self._clock.now_ms() - int(self.config.retention * 1000)
        keep = {session.username} if self.config.keep_own_posts else set()
        deleted = await self._store.prune(older_than_ms=cutoff, keep_authors=keep)
        if deleted:
            log.info("retention removed %d posts", deleted)

    async def _every(
        self, interval: float, job: Callable[[], Awaitable[object]]
    ) -> None:
        """Run `job` every `interval` seconds until cancelled, whatever it raises.

        Failures are logged, at most once per kind and job every few seconds.
        """
        name = getattr(job, "__name__", "job")
        while True:
            await asyncio.sleep(interval)
            try:
                await job()
            except (NetworkError, RemoteError) as exc:
                self._ratelog.info(f"every {name}", "periodic %s failed: %s", name, exc)
            except StoreError as exc:
                self._ratelog.warning(
                    f"every {name} store", "periodic %s failed: %s", name, exc
                )
            except Exception:
                self._ratelog.exception(
                    f"every {name} bug", "periodic %s failed; it will run again", name
                )

    def _require_session(self) -> _Session:
        if self._session is None:
            raise NotLoggedIn("no user is logged in on this peer")
        return self._session

    def _check_logged_out(self) -> None:
        if self._session is not None:
            raise UsageError(f"{self._session.username} is logged in: log out first")

    def _spawn(self, coro: Awaitable[object]) -> asyncio.Future[object]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(_forget(self._tasks))
        return task

    def _session_task(self, session: _Session, coro: Awaitable[object]) -> None:
        task = asyncio.ensure_future(coro)
        session.tasks.add(task)
        task.add_done_callback(_forget(session.tasks))


def _check_name(username: str) -> None:
    """Refuse `username` with a `UsageError` that says the rule, unless valid."""
    if check_username(username):
        return
    shown = repr(username)
    if len(shown) > 40:
        shown = f"{shown[:36]}..."
    if isinstance(username, str) and check_username(username.lower()):
        shown += " (usernames are lowercase)"
    raise UsageError(
        f"invalid username {shown}: a username is 1 to "
        f"{MAX_USERNAME_CHARS} characters of a-z, 0-9, '_', '.' and '-', "
        "not starting with '.' or '-'"
    )


def _name(member: TreeMember) -> str:
    return member.name


def _notice(kind: Literal["follow", "unfollow"], entry: FollowEntry) -> Notification:
    return Notification(kind=kind, user=entry.follower, timestamp=entry.timestamp)


def _offer(queue: asyncio.Queue[Post | None], item: Post | None) -> None:
    """Put without waiting; drop the oldest item when the queue is full."""
    if queue.full():
        with contextlib.suppress(asyncio.QueueEmpty):
            queue.get_nowait()
            log.warning("incoming() is not keeping up: dropped a post")
    queue.put_nowait(item)


def _forget(
    tasks: set[asyncio.Future[object]],
) -> Callable[[asyncio.Future[object]], None]:
    def done(task: asyncio.Future[object]) -> None:
        tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    return done


async def _cancel(tasks: set[asyncio.Future[object]]) -> None:
    """Cancel `tasks` and wait until they are all done."""
    pending = list(tasks)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


async def _bounded(
    job: Callable[[X], Awaitable[T]], items: Iterable[X], limit: int = _CONCURRENCY
) -> list[T]:
    """`job(item)` for every item, at most `limit` at a time; results in order.

    Each coroutine is created only when its turn comes, so none is left
    un-awaited if this is cancelled.
    """
    slots = asyncio.Semaphore(limit)

    async def run(item: X) -> T:
        async with slots:
            return await job(item)

    return await asyncio.gather(*(run(item) for item in items))


def _is_wildcard(host: str) -> bool:
    """Whether `host` means every interface (not an address to reach)."""
    try:
        return host == "" or ipaddress.ip_address(host).is_unspecified
    except ValueError:  # a host name
        return False
