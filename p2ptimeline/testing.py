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
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

import ntplib

from ._identity import Identity
from ._models import HybridTimestamp, Post
from ._p2p.peer import Peer
from ._store import LocalStore, StoredIdentity

__all__ = [
    "STORE_CHECKS",
    "NtpServer",
    "StoreCheck",
    "crash",
    "eventually",
    "make_posts",
]

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
