"""`Peer`: the timeline service for one user; a facade over the peer's jobs.

The jobs live beside it: `session` (accounts, login and logout, following,
notices), `pull` (catch-up, and serving it), `dissemination` (pushing and
forwarding posts) and `inbox` (accepting posts, `incoming()`). They share a
`PeerContext`. This module holds the configuration, the lifecycle, the
public API and the table that dispatches requests from other peers.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Self

from .._clock import ClockSync
from .._dht.registry import DhtRegistry
from .._errors import (
    ListenError,
    NetworkError,
    RemoteError,
    StoreError,
    UnknownUser,
    UsageError,
)
from .._hlc import HybridLogicalClock
from .._memory_store import MemoryStore
from .._models import MAX_POST_CHARS, Post
from .._serializer import CborSerializer, Serializer
from .._sqlite_store import SqliteStore
from .._store import LocalStore
from .config import PeerConfig
from .context import Notification, PeerContext
from .dissemination import Disseminator
from .inbox import Inbox
from .pool import ConnectionPool
from .pull import Puller
from .server import PeerServer
from .session import Sessions, check_name
from .transport import Address, PoolTransport, Transport, TransportWrapper
from .wire import (
    FollowNotice,
    GetPosts,
    Message,
    PostPush,
    PresenceNotice,
    Refusal,
    check_host,
)

__all__ = ["Notification", "Peer", "PeerConfig"]

log = logging.getLogger("p2ptimeline.peer")

_NODE_ID_STATE = "dht/node-id"  # the DHT node id, kept across restarts
_MAX_TIMELINE = 2**31 - 1  # a larger `timeline` limit is taken as this
_PORT_TRIES = 10  # ports tried for a free UDP and TCP pair, when picking


class Peer:
    """A peer of the timeline network: one user's gateway to it.

    A peer runs a DHT node (UDP) and a peer-protocol server (TCP) on the same
    port, and a local store. Register or log in a user, then follow, post,
    and read the timeline; posts from followees arrive by themselves.
    `async with Peer(...)` starts and stops it.

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
        transport: Wraps the peer's transport (see `Transport`): to observe,
            delay or drop its messages, in tests and tools.

    Raises:
        UsageError: `host` is a wildcard and no `advertised_host` is given,
            or the advertised address is not an address or host name.
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
        transport: TransportWrapper | None = None,
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
        clock = clock or ClockSync()
        self._context = context = PeerContext(
            config=self.config,
            store=store,
            clock=clock,
            hlc=HybridLogicalClock(clock.now_ms),
            serializer=serializer or CborSerializer(),
        )
        self._wrap = transport
        self._server: PeerServer | None = None
        self._pool: ConnectionPool | None = None
        self._inbox = Inbox(context)
        self._puller = Puller(context, self._inbox)
        self._disseminator = Disseminator(context, self._inbox)
        self._sessions = Sessions(context, self._puller)
        self._handlers: dict[type[Any], Callable[[Any], Awaitable[Message]]] = {
            PostPush: self._disseminator.on_push,
            GetPosts: self._puller.serve,
            FollowNotice: self._sessions.on_follow_notice,
            PresenceNotice: self._sessions.on_presence_notice,
        }

    # Lifecycle

    async def start(self) -> None:
        """Open the store, listen on UDP and TCP, and join the network.

        Raises:
            ListenError: The port cannot be bound.
            StoreError: The store cannot be opened.
            UsageError: The peer is already started, or was stopped (a
                stopped peer does not start again: make a new one).
        """
        if self._context.started is not None or self._context.stopped:
            state = "started" if self._context.started else "stopped"
            raise UsageError(f"the peer is already {state}")
        store = self._context.store
        await store.open()
        try:
            await self._listen()
        except BaseException:
            await store.close()
            raise
        self._context.clock.start(self.config.ntp_interval)
        log.info("peer listening on %s:%d", self._host, self.port)

    async def _listen(self) -> None:
        context, config = self._context, self.config
        node_id = await context.store.get_state(_NODE_ID_STATE)
        if node_id is None or len(node_id) != 20:
            node_id = os.urandom(20)
            await context.store.put_state(_NODE_ID_STATE, node_id)
        for _ in range(_PORT_TRIES):
            registry = DhtRegistry(
                self._host,
                self._requested_port,
                self._bootstrap,
                ksize=config.ksize,
                alpha=config.alpha,
                rpc_timeout=config.rpc_timeout,
                lease=config.lease,
                clock=context.clock.now,
                serializer=context.serializer,
                node_id=node_id,
                hlc=context.hlc,
            )
            await registry.start()
            port = registry.address[1]
            server = PeerServer(self._answer, context.serializer, config.limits)
            try:
                await server.start(self._host, port)
            except OSError as exc:
                await registry.stop()
                if self._requested_port:
                    reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
                    raise ListenError(
                        f"cannot listen on TCP {self._host}:{port}: {reason}",
                        (self._host, port),
                    ) from exc
                continue  # the UDP port's TCP twin is taken: try another
            self._server, self._pool = (
                server,
                ConnectionPool(context.serializer, config.limits),
            )
            own: Transport = PoolTransport(self._pool, self._dispatch)
            transport = self._wrap(own) if self._wrap else own
            context.started = (registry, transport, (self._advertised_host, port))
            return
        raise ListenError(
            f"found no port free for both UDP and TCP on {self._host}",
            (self._host, 0),
        )

    async def stop(self) -> None:
        """Log out (if logged in) and release every socket, task and file.

        Idempotent. A graceful stop marks the user offline at once; a crash
        (the process killed) is seen once its presence lease lapses. Whatever
        the logout meets (an unreachable registry, an error, cancellation),
        everything is released; a failed logout is logged, not raised.
        """
        try:
            if self._context.session is not None:
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
        context = self._context
        registry = context.started[0] if context.started else None
        context.started = None
        context.stopped = True
        async with contextlib.AsyncExitStack() as steps:  # run last pushed first
            steps.push_async_callback(context.store.close)
            steps.push_async_callback(context.clock.stop)
            if registry is not None:
                steps.push_async_callback(registry.stop)
            if self._pool is not None:
                steps.push_async_callback(self._pool.close)
            if self._server is not None:
                steps.push_async_callback(self._server.close)
            steps.callback(self._inbox.close)
            steps.push_async_callback(context.tasks.close)
            steps.push_async_callback(self._disseminator.close)
            steps.push_async_callback(self._sessions.end)
        self._server = self._pool = None

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
        return self._context.address[1]

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` where other peers reach this one (the advertised
        host, if one was given).

        Raises:
            UsageError: The peer is not started.
        """
        return self._context.address

    @property
    def username(self) -> str | None:
        """The logged-in user, if any."""
        session = self._context.session
        return session.username if session else None

    @property
    def registry(self) -> DhtRegistry:
        """The peer's DHT registry node.

        Raises:
            UsageError: The peer is not started.
        """
        return self._context.registry

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
                why), a user is logged in here, or the peer is not started.
            RegistryUnavailable: No DHT node could be reached.
        """
        await self._sessions.register(username, password, publish_key)

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
            UsageError: A user is already logged in here, `username` is not
                a valid username (the message says why), or the peer is not
                started.
            RegistryUnavailable: No DHT node could be reached.
        """
        await self._sessions.login(username, password)

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
        await self._sessions.change_password(old, new)

    async def logout(self) -> None:
        """Publish that the user is offline and end the session.

        Raises:
            NotLoggedIn: Nobody is logged in.
        """
        await self._sessions.logout()

    # Following

    async def follow(self, username: str) -> None:
        """Follow `username`: their posts reach this user from now on.

        The followee learns it at once if online, else at its next login.
        Their recent posts (within this peer's retention) are fetched at
        once: `follow` waits for them up to `PeerConfig.follow_catch_up`
        seconds; any still on their way then arrive in the background (and
        through `incoming()`).

        Raises:
            UnknownUser: No such user.
            NotLoggedIn: Nobody is logged in.
            UsageError: Following oneself, or `username` is not a valid
                username (the message says why).
            RegistryUnavailable: No DHT node could be reached.
        """
        await self._sessions.follow(username)

    async def unfollow(self, username: str) -> None:
        """Stop following `username`. See `follow`.

        Raises:
            NotLoggedIn: Nobody is logged in.
            UsageError: The user does not follow `username` (or it is the
                user), or `username` is not a valid username.
            RegistryUnavailable: No DHT node could be reached.
        """
        await self._sessions.unfollow(username)

    async def followers(self, username: str | None = None) -> list[str]:
        """The users following `username` (default: the logged-in user), sorted.

        Raises:
            UnknownUser: No such user.
            NotLoggedIn: No `username` given and nobody is logged in.
            UsageError: `username` is not a valid username.
            RegistryUnavailable: No DHT node could be reached.
        """
        return sorted(await self.registry.get_followers(self._whom(username)))

    async def following(self, username: str | None = None) -> list[str]:
        """The users `username` (default: the logged-in user) follows, sorted.
        See `followers`."""
        return sorted(await self.registry.get_following(self._whom(username)))

    def _whom(self, username: str | None) -> str:
        if username is None:
            return self._context.require_session().username
        check_name(username)
        return username

    async def suggestions(self, limit: int = 10) -> list[str]:
        """Whom to follow: friends of friends, most followed by one's followees first.

        Never the user or someone the user already follows.

        Raises:
            NotLoggedIn: Nobody is logged in.
        """
        return await self._sessions.suggestions(limit)

    async def notifications(self) -> list[Notification]:
        """Follows and unfollows of this user: those that happened while away
        (found at login) and those since, oldest first.

        Raises:
            NotLoggedIn: Nobody is logged in.
        """
        return list(self._context.require_session().notifications)

    # Posts

    async def post(self, text: str) -> Post:
        """Publish a post to the user's followers; returns it once stored here.

        Args:
            text: The post: at most `MAX_POST_CHARS` (1,000) characters, and
                not empty or only whitespace.

        Raises:
            NotLoggedIn: Nobody is logged in.
            UsageError: The text is empty (or only whitespace) or too long,
                or the peer is stopped.
        """
        context = self._context
        session = context.require_session()
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
                session.identity, session.username, text, context.hlc.now()
            )
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        await context.store.add([post])
        context.tasks.spawn(self._disseminator.publish(session, post))
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
        session = self._context.require_session()
        if limit < 0:
            raise UsageError(f"a timeline limit is 0 or more, not {limit}")
        authors = session.following | {session.username}
        limit = min(limit, _MAX_TIMELINE)
        return await self._context.store.timeline(authors, limit=limit, before=before)

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
        return self._inbox.subscribe()

    async def sync(self) -> int:
        """Pull the posts missed from every followee now; returns how many were new.

        Each followee's posts come from the followee if it is online, else
        from some of its online followers. Runs at login and periodically.

        Raises:
            NotLoggedIn: Nobody is logged in.
        """
        return await self._sessions.sync()

    # Requests from other peers

    async def _dispatch(self, message: Message, remote: Address) -> Message:
        handler = self._handlers.get(type(message))
        if handler is None:
            return Refusal(reason=f"unexpected {type(message).__name__}")
        try:
            return await handler(message)
        except (UnknownUser, NetworkError) as exc:
            # A name or record the request relies on cannot be checked now.
            log.info("refused a request from %s: %s", remote, exc)
            return Refusal(reason=str(exc)[:200])

    async def _answer(self, message: Message, remote: Address) -> Message:
        """What the server calls: the transport's answer to a request."""
        started = self._context.started
        if started is None:
            return Refusal(reason="the peer is stopping")
        return await started[1].answer(message, remote)


def _is_wildcard(host: str) -> bool:
    """Whether `host` means every interface (not an address to reach)."""
    try:
        return host == "" or ipaddress.ip_address(host).is_unspecified
    except ValueError:  # a host name
        return False
