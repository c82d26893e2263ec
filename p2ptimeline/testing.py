"""Tools for testing p2ptimeline and the apps built on it.

* `STORE_CHECKS`: the conformance suite of the `LocalStore` contract. Run
  each check against a fresh, open store of your own implementation::

      @pytest.mark.parametrize("check", STORE_CHECKS, ids=lambda c: c.__name__)
      async def test_my_store(check):
          async with MyStore() as store:
              await check(store)

* `NtpServer`: a tiny NTP responder with a chosen clock skew, so code that
  uses `ClockSync` can be tested without the internet.
* `make_posts`: signed posts for tests.
* `eventually`: poll a condition with a deadline, for states that no event
  announces.
* `crash`: stop a `Peer` the way a killed process does: no goodbye.
* `local_network`: bootstrap nodes and peers on one machine, all stopped
  when the `async with` block ends; `LOCAL_CONFIG` is its `PeerConfig`::

      async with local_network() as net:
          alice, bob = await net.add_users("alice", "bob")
          await bob.follow("alice")
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar, cast

import ntplib

from ._clock import ClockSync
from ._dht.registry import DhtRegistry
from ._errors import UsageError
from ._identity import Identity
from ._models import HybridTimestamp, Post
from ._p2p.peer import Peer, PeerConfig
from ._serializer import Serializer
from ._store import LocalStore, StoredIdentity

__all__ = [
    "LOCAL_CONFIG",
    "STORE_CHECKS",
    "LocalNetwork",
    "NtpServer",
    "StoreCheck",
    "crash",
    "eventually",
    "local_network",
    "make_posts",
]

_T = TypeVar("_T")

StoreCheck = Callable[[LocalStore], Awaitable[None]]
"""One conformance check: given a fresh, open store, raises if it misbehaves."""

STORE_CHECKS: list[StoreCheck] = []
"""Every `LocalStore` conformance check, in a stable order."""


def _check(fn: StoreCheck) -> StoreCheck:
    STORE_CHECKS.append(fn)
    return fn


async def eventually(
    condition: Callable[[], object], *, within: float = 10.0, every: float = 0.01
) -> None:
    """Wait until `condition()` is true, polling every `every` seconds.

    `condition` may be a plain or an async function.

    Raises:
        TimeoutError: It was still false after `within` seconds.
    """
    async with asyncio.timeout(within):
        while True:
            result = condition()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return
            # Polling is the point here: the condition has no event to wait on.
            await asyncio.sleep(every)


async def crash(peer: Peer) -> None:
    """Stop `peer` abruptly, as if its process were killed.

    Its sockets close without a logout, so the network only learns it is gone
    when its presence lease lapses or a connection to it fails.
    """
    await peer._release()


def make_posts(
    author: str,
    count: int,
    *,
    identity: Identity | None = None,
    start_ms: int = 1_700_000_000_000,
    step_ms: int = 1000,
    prefix: str = "post",
) -> list[Post]:
    """`count` signed posts by `author`, `step_ms` apart from `start_ms`."""
    identity = identity or Identity.generate()
    return [
        Post.create(
            identity,
            author,
            f"{prefix} {i} by {author}",
            HybridTimestamp(physical_ms=start_ms + i * step_ms),
        )
        for i in range(count)
    ]


@_check
async def check_add_returns_only_new_posts(store: LocalStore) -> None:
    """add() stores each post once and reports only the new ones."""
    posts = make_posts("alice", 3)
    assert await store.add(posts[:2]) == posts[:2]
    assert await store.add(posts) == posts[2:]
    assert await store.add(posts) == []
    assert await store.count() == 3


@_check
async def check_get_by_id(store: LocalStore) -> None:
    """get() returns the stored post equal to what was added, or None."""
    (post,) = make_posts("alice", 1)
    assert await store.get(post.id) is None
    await store.add([post])
    assert await store.get(post.id) == post


@_check
async def check_posts_by_since_and_limit(store: LocalStore) -> None:
    """posts_by() lists one author oldest first, after `since`, up to `limit`."""
    alice, bob = make_posts("alice", 5), make_posts("bob", 2)
    await store.add(bob + alice[::-1])
    assert await store.posts_by("alice") == alice
    assert await store.posts_by("alice", since=alice[1].timestamp) == alice[2:]
    assert (
        await store.posts_by("alice", since=alice[1].timestamp, limit=2) == alice[2:4]
    )
    assert await store.posts_by("alice", since=alice[-1].timestamp) == []
    assert await store.posts_by("carol") == []


@_check
async def check_timeline_newest_first_over_authors(store: LocalStore) -> None:
    """timeline() merges the given authors newest first and ignores the rest."""
    alice = make_posts("alice", 4, start_ms=1000, step_ms=10)
    bob = make_posts("bob", 4, start_ms=1005, step_ms=10)
    carol = make_posts("carol", 4, start_ms=1001, step_ms=10)
    await store.add(alice + bob + carol)
    expected = sorted(alice + bob, key=lambda p: p.sort_key, reverse=True)
    assert await store.timeline({"alice", "bob"}, limit=100) == expected
    assert await store.timeline(["alice", "bob"], limit=3) == expected[:3]
    assert await store.timeline([], limit=10) == []
    assert await store.timeline({"alice"}, limit=0) == []


@_check
async def check_timeline_pages_with_before_cursor(store: LocalStore) -> None:
    """Pages fetched with `before` chain into the whole timeline, without gaps."""
    posts = make_posts("alice", 7) + make_posts("bob", 6, start_ms=1_700_000_000_500)
    await store.add(posts)
    pages: list[Post] = []
    page = await store.timeline({"alice", "bob"}, limit=4)
    while page:
        pages += page
        page = await store.timeline({"alice", "bob"}, limit=4, before=page[-1])
    assert pages == sorted(posts, key=lambda p: p.sort_key, reverse=True)


@_check
async def check_timeline_over_many_authors(store: LocalStore) -> None:
    """A timeline over hundreds of authors, some absent, is still exact."""
    identity = Identity.generate()
    posts = [
        post
        for i in range(300)
        for post in make_posts(f"u{i}", 2, identity=identity, start_ms=i * 7 % 500)
    ]
    await store.add(posts)
    wanted = {f"u{i}" for i in range(0, 300, 2)} | {"nobody"}
    mine = [p for p in posts if p.author in wanted]
    expected = sorted(mine, key=lambda p: p.sort_key, reverse=True)
    first = await store.timeline(wanted, limit=100)
    rest = await store.timeline(wanted, limit=1000, before=first[-1])
    assert first + rest == expected


@_check
async def check_equal_timestamps_order_by_id(store: LocalStore) -> None:
    """Posts with the same timestamp order by id, and paging does not skip any."""
    same = [make_posts(name, 1, start_ms=5000)[0] for name in ("a", "b", "c", "d")]
    await store.add(same)
    by_id = sorted(same, key=lambda p: p.id, reverse=True)
    assert await store.timeline({"a", "b", "c", "d"}) == by_id
    page = await store.timeline({"a", "b", "c", "d"}, limit=2)
    rest = await store.timeline({"a", "b", "c", "d"}, limit=10, before=page[-1])
    assert page + rest == by_id


@_check
async def check_latest_per_author(store: LocalStore) -> None:
    """latest() gives each author's newest timestamp, omitting authors with none."""
    alice, bob = make_posts("alice", 3), make_posts("bob", 2, start_ms=9_000)
    await store.add(alice + bob)
    latest = await store.latest(["alice", "bob", "carol"])
    assert latest == {"alice": alice[-1].timestamp, "bob": bob[-1].timestamp}


@_check
async def check_prune_by_age_keeping_authors(store: LocalStore) -> None:
    """prune() deletes posts older than the cutoff, except those of kept authors."""
    alice = make_posts("alice", 4, start_ms=1000, step_ms=1000)
    bob = make_posts("bob", 4, start_ms=1000, step_ms=1000)
    await store.add(alice + bob)
    assert await store.prune(older_than_ms=3000, keep_authors={"alice"}) == 2
    assert await store.posts_by("alice") == alice
    assert await store.posts_by("bob") == bob[2:]
    assert await store.prune(older_than_ms=10_000) == 6
    assert await store.count() == 0
    assert await store.latest(["alice", "bob"]) == {}


@_check
async def check_identity_round_trip(store: LocalStore) -> None:
    """A saved identity loads back; saving again replaces it."""
    first = StoredIdentity(username="alice", public_key=b"k" * 32, sealed_key=b"s1")
    second = StoredIdentity(username="alice", public_key=b"k" * 32, sealed_key=b"s2")
    assert await store.load_identity("alice") is None
    await store.save_identity(first)
    assert await store.load_identity("alice") == first
    await store.save_identity(second)
    assert await store.load_identity("alice") == second


@_check
async def check_relations_cache(store: LocalStore) -> None:
    """Follow sets are cached per user and relation, replaced as a whole."""
    assert await store.load_relation("alice", "following") == frozenset()
    await store.save_relation("alice", "following", ["bob", "carol"])
    await store.save_relation("alice", "followers", {"dave"})
    assert await store.load_relation("alice", "following") == {"bob", "carol"}
    assert await store.load_relation("alice", "followers") == {"dave"}
    await store.save_relation("alice", "following", ["carol"])
    assert await store.load_relation("alice", "following") == {"carol"}
    assert await store.load_relation("bob", "following") == frozenset()


@_check
async def check_state_round_trip(store: LocalStore) -> None:
    """Peer state is kept by key and replaced on put."""
    assert await store.get_state("k") is None
    await store.put_state("k", b"one")
    await store.put_state("k", b"two")
    assert await store.get_state("k") == b"two"


@_check
async def check_concurrent_adds(store: LocalStore) -> None:
    """Concurrent add() calls of overlapping posts store each post once."""
    posts = make_posts("alice", 50)
    results = await asyncio.gather(*(store.add(posts[i : i + 20]) for i in range(50)))
    assert sorted(p.id for added in results for p in added) == sorted(
        p.id for p in posts
    )
    assert await store.count() == 50


class NtpServer:
    """An NTP (v3/v4) responder on UDP, reporting the local time plus `skew`.

    Use as an async context manager; `address` is where it listens::

        async with NtpServer(skew=2.5) as ntp:
            clock = ClockSync(servers=[ntp.address])

    Args:
        skew: Seconds to add to the local clock in the answers.
        host: Interface to listen on.
        port: UDP port; 0 picks a free one.

    Attributes:
        answer: Set to False to make the server silent (drop every request).
    """

    def __init__(
        self, *, skew: float = 0.0, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.skew = skew
        self.answer = True
        self._host, self._port = host, port
        self._transport: asyncio.DatagramTransport | None = None
        self.requests = 0
        """How many requests arrived."""

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` the server listens on."""
        if self._transport is None:
            raise RuntimeError("the server is not running")
        host, port = self._transport.get_extra_info("sockname")[:2]
        return (host, port)

    async def __aenter__(self) -> NtpServer:
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.create_datagram_endpoint(
            lambda: _NtpProtocol(self), local_addr=(self._host, self._port)
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def _reply(self, request: bytes) -> bytes | None:
        self.requests += 1
        if not self.answer or len(request) < 48:
            return None
        received = time.time() + self.skew
        query = ntplib.NTPPacket()
        query.from_data(request[:48])
        reply = ntplib.NTPPacket(version=query.version, mode=4)
        reply.stratum = 1
        reply.ref_id = 0x4C4F434C  # "LOCL"
        reply.orig_timestamp = query.tx_timestamp
        reply.ref_timestamp = ntplib.system_to_ntp_time(received)
        reply.recv_timestamp = ntplib.system_to_ntp_time(received)
        reply.tx_timestamp = ntplib.system_to_ntp_time(time.time() + self.skew)
        return bytes(reply.to_data())


class _NtpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: NtpServer) -> None:
        self._server = server
        self._transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        reply = self._server._reply(data)
        if reply is not None:
            self._transport.sendto(reply, addr)


LOCAL_CONFIG = PeerConfig(seal_cost=10, ksize=8, rpc_timeout=0.5)
"""The `PeerConfig` of `local_network`: peers that all run on one machine.

Sealing costs 1 MiB of Argon2id instead of 64 (a login takes milliseconds),
Kademlia buckets hold 8 nodes, and a DHT node that does not answer within
0.5 s is given up on (loopback answers in well under a millisecond). Raise
`rpc_timeout` for hundreds of peers sharing one event loop. Everything else
is the default; derive your own with ``attrs.evolve(LOCAL_CONFIG, ...)``.
"""

_PASSWORD = "correct horse"
"""The password `LocalNetwork.add_users` registers users with by default."""


class LocalNetwork:
    """Bootstrap DHT nodes and peers on one machine, made by `local_network`.

    Every peer it starts joins through all of its bootstrap nodes, uses its
    `config`, a clock that asks no NTP server, and an in-memory store (or
    one the network was told to use). Everything it started is stopped when
    the `async with local_network(...)` block ends, peers stopped or crashed
    meanwhile included.

    Attributes:
        bootstrap: ``(host, port)`` of the bootstrap nodes, for a `Peer` or
            a program started outside the network (`examples/cli.py`).
        bootstrap_nodes: The bootstrap nodes themselves.
        peers: Every peer the network started, in the order they were added
            (those stopped since included).
        config: The `PeerConfig` of the peers and bootstrap nodes.
        password: The password `add_users` registers users with.
    """

    def __init__(
        self,
        *,
        config: PeerConfig,
        host: str,
        data_dir: Path | None,
        store: Callable[[], LocalStore] | None,
        serializer: Serializer | None,
        concurrency: int,
    ) -> None:
        self.config = config
        self.password = _PASSWORD
        self.bootstrap: list[tuple[str, int]] = []
        self.bootstrap_nodes: list[DhtRegistry] = []
        self.peers: list[Peer] = []
        self._host = host
        self._data_dir = data_dir
        self._store = store
        self._serializer = serializer
        self._slots = asyncio.Semaphore(concurrency)
        self._concurrency = concurrency
        self._made: list[Peer] = []  # every peer constructed, started or not
        self._closed = False

    async def add_peer(
        self,
        *,
        config: PeerConfig | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        store: LocalStore | None = None,
        clock: ClockSync | None = None,
        **options: Any,
    ) -> Peer:
        """Start one more peer on the network; nobody is logged in on it.

        Args:
            config: Its configuration (default: the network's).
            data_dir: Where it keeps its `SqliteStore` (default: under the
                network's `data_dir`, if it has one).
            store: Its store (default: the network's, or a `MemoryStore`).
            clock: Its clock (default: the local clock, no NTP).
            options: Other keyword arguments of `Peer` (`transport`, to
                inject faults).

        Raises:
            UsageError: The network is closed.
            NetworkError: The peer found no free port.
            StoreError: Its store cannot be opened.
        """
        self._check_open()
        if data_dir is None and store is None:
            store, data_dir = self._default_store(f"peer{len(self._made)}")
        peer = Peer(
            self._host,
            0,
            self.bootstrap,
            data_dir=data_dir,
            store=store,
            clock=clock or ClockSync(servers=[]),
            serializer=self._serializer,
            config=config or self.config,
            **options,
        )
        await self._start(peer)
        return peer

    async def add_peers(
        self, count: int, *, config: PeerConfig | None = None
    ) -> list[Peer]:
        """Start `count` more peers at once (see `add_peer`); in order.

        If one fails to start, the others still start (they are stopped
        with the network) and the first error is raised.
        """
        return await _all(self.add_peer(config=config) for _ in range(count))

    async def add_users(
        self, *names: str, password: str | None = None, config: PeerConfig | None = None
    ) -> list[Peer]:
        """Start one new peer per name, and register that user on it.

        The peers start and register concurrently. With a network
        `data_dir`, each keeps its store in ``data_dir / name``.

        Args:
            names: The usernames to register, one per peer.
            password: Their password (default: `password`).
            config: The peers' configuration (default: the network's).

        Returns:
            The peers, logged in, in the order of `names`. A peer whose user
            could not register is stopped and left out of `peers`.

        Raises:
            UsernameTaken: A name is taken (a user of this network already,
                or given twice).
            UsageError: A name or the password is refused, or the network
                is closed.
        """

        async def user(name: str) -> Peer:
            store, data_dir = self._default_store(name)
            peer = await self.add_peer(config=config, data_dir=data_dir, store=store)
            try:
                await peer.register(
                    name, self.password if password is None else password
                )
            except BaseException:
                await self._drop(peer)
                raise
            return peer

        return await _all(user(name) for name in names)

    async def aclose(self) -> None:
        """Stop every peer (logging out those logged in), then the bootstrap
        nodes, releasing every socket; idempotent.

        Whatever a step raises, or if the caller is cancelled meanwhile,
        the steps after it still run.
        """
        if self._closed:
            return
        self._closed = True
        async with contextlib.AsyncExitStack() as steps:  # run last pushed first
            for node in self.bootstrap_nodes:
                steps.push_async_callback(node.stop)
            steps.push_async_callback(self._stop_peers)

    async def _start_bootstrap_nodes(self, count: int) -> None:
        """Start `count` bootstrap nodes, each joining the ones before it."""
        config = self.config
        for _ in range(count):
            node = DhtRegistry(
                self._host,
                0,
                self.bootstrap,
                ksize=config.ksize,
                alpha=config.alpha,
                rpc_timeout=config.rpc_timeout,
                lease=config.lease,
                serializer=self._serializer,
            )
            self.bootstrap_nodes.append(node)
            await node.start()
            self.bootstrap.append(node.address)

    def _default_store(self, name: str) -> tuple[LocalStore | None, Path | None]:
        """The store, or the data directory, of a new peer named `name`."""
        if self._store is not None:
            return self._store(), None
        if self._data_dir is not None:
            return None, self._data_dir / name
        return None, None

    async def _start(self, peer: Peer) -> None:
        """Start `peer`, at most `concurrency` at a time; if the start fails
        or is cancelled, stop it (which releases whatever it had bound)."""
        self._made.append(peer)
        self.peers.append(peer)
        try:
            async with self._slots:
                await peer.start()
        except BaseException:
            await self._drop(peer)
            raise

    async def _drop(self, peer: Peer) -> None:
        """Stop `peer` and take it out of `peers`."""
        self.peers.remove(peer)
        await peer.stop()

    async def _stop_peers(self) -> None:
        slots = asyncio.Semaphore(self._concurrency)

        async def stop(peer: Peer) -> None:
            async with slots:
                await peer.stop()

        await _all(stop(peer) for peer in self._made)

    def _check_open(self) -> None:
        if self._closed:
            raise UsageError("the local network is closed")


@contextlib.asynccontextmanager
async def local_network(
    n: int = 0,
    *,
    bootstrap_nodes: int = 1,
    config: PeerConfig = LOCAL_CONFIG,
    data_dir: str | os.PathLike[str] | None = None,
    store: Callable[[], LocalStore] | None = None,
    serializer: Serializer | None = None,
    host: str = "127.0.0.1",
    concurrency: int = 16,
) -> AsyncIterator[LocalNetwork]:
    """A network on one machine: bootstrap nodes and `n` peers, ports chosen
    by the OS, stopped when the block ends.

    For tests and demos of an app built on p2ptimeline::

        async with local_network() as net:
            alice, bob = await net.add_users("alice", "bob")
            await bob.follow("alice")
            post = await alice.post("hello")
            await eventually(lambda: bob.timeline())  # pushed to bob
            assert await bob.timeline() == [post]

    The bootstrap nodes start one after the other, each joining those
    before it; then the peers start, `concurrency` at a time. On leaving
    the block, normally, on an error or on cancellation, every peer the
    network started is stopped (logged out if logged in), then every
    bootstrap node: no socket, task or file is left.

    Args:
        n: Peers to start, nobody logged in on them (`LocalNetwork.peers`).
            More can be added in the block (`LocalNetwork.add_peer`,
            `LocalNetwork.add_users`).
        bootstrap_nodes: Bare DHT nodes the peers join through.
        config: The peers' configuration (the bootstrap nodes take their
            DHT settings from it).
        data_dir: Keep each peer's store in a directory under this one
            (``peer<i>``, or the user's name for `LocalNetwork.add_users`);
            by default peers keep everything in memory.
        store: A factory of each peer's store, to run the network on your
            own `LocalStore` (not with `data_dir`).
        serializer: The encoding of the whole network (default: CBOR).
        host: The loopback address to listen on.
        concurrency: Most peers starting (and stopping) at once.

    Raises:
        UsageError: An argument is out of range, or both `data_dir` and
            `store` are given.
        NetworkError: A port could not be bound.
    """
    if n < 0 or bootstrap_nodes < 1 or concurrency < 1:
        raise UsageError(
            "a local network needs n >= 0 peers, at least one bootstrap node "
            "and a concurrency of at least 1"
        )
    if data_dir is not None and store is not None:
        raise UsageError("give the local network a data_dir or a store, not both")
    network = LocalNetwork(
        config=config,
        host=host,
        data_dir=None if data_dir is None else Path(data_dir),
        store=store,
        serializer=serializer,
        concurrency=concurrency,
    )
    try:
        await network._start_bootstrap_nodes(bootstrap_nodes)
        await network.add_peers(n)
        yield network
    finally:
        await network.aclose()


async def _all(jobs: Iterable[Awaitable[_T]]) -> list[_T]:
    """Await `jobs` together; once all have ended, raise the first error."""
    results = await asyncio.gather(*jobs, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return cast(list[_T], results)
