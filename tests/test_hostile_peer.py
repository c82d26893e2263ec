"""A hostile peer against a live one: pushes, bad frames, bad posts, failures.

Each test drives a real peer on 127.0.0.1 with what a hostile participant
can send (see `hostile.push`) or with a failure it meets (a registry that
raises, a store that fails), and checks what the peer then costs or keeps.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from pathlib import Path
from typing import Any

import attrs
import pytest
from hostile.push import (
    ConnectCounter,
    Member,
    closed_port,
    plain,
    raw_frame,
    raw_push,
    unreachable_members,
)
from hostile.tcp import RawClient

import p2ptimeline as pt
from p2ptimeline._dht.records import claim_key
from p2ptimeline._p2p.wire import Ack, GetPosts, PostBatch
from p2ptimeline.testing import eventually, local_network, make_posts

PASSWORD = "correct horse"
CONFIG = pt.PeerConfig(seal_cost=10, ksize=8, pull_interval=3600.0, push_backoff=0.01)
PeerFactory = Callable[..., Awaitable[pt.Peer]]


@pytest.fixture
async def peer() -> AsyncIterator[PeerFactory]:
    """A factory of started peers on a local network; all stopped at the
    end. ``await peer(name)`` also registers `name`."""
    async with local_network(config=CONFIG) as net:

        async def start(name: str | None = None, **options: Any) -> pt.Peer:
            new = await net.add_peer(**options)
            if name is not None:
                await new.register(name, PASSWORD)
            return new

        yield start


def identity(peer: pt.Peer) -> pt.Identity:
    """The logged-in user's identity (the attacker signs its own posts)."""
    session = peer._context.session
    assert session is not None
    return session.identity


async def holds(peer: pt.Peer, post: pt.Post) -> bool:
    """Whether `post` is in `peer`'s timeline."""
    return any(p.id == post.id for p in await peer.timeline(limit=1000))


async def push_and_ack(victim: pt.Peer, *frames: bytes) -> None:
    """Send push frames to `victim` on one connection; each must be acked."""
    client = await RawClient.connect(victim.address)
    try:
        for frame in frames:
            client.send_bytes(frame)
        replies = await client.frames(len(frames))
        assert [type(r.message) for r in replies] == [Ack] * len(frames)
    finally:
        client.close()


async def still_serves(victim: pt.Peer, author: str, count: int) -> None:
    """A correct GetPosts to `victim` gets `count` posts of `author`."""
    client = await RawClient.connect(victim.address)
    try:
        client.request(GetPosts(author=author, since=None, limit=100))
        (reply,) = await client.frames(1)
        assert isinstance(reply.message, PostBatch)
        assert len(reply.message.posts) == count
    finally:
        client.close()


def quiet(victim: pt.Peer) -> bool:
    """Whether `victim` has finished forwarding (no forward under way)."""
    return not victim._disseminator._relays


# Point 6: push fan-out amplification


@pytest.mark.parametrize("fanout", [2, 64])
async def test_a_push_listing_thousands_of_unreachable_members_costs_few_connects(
    peer: PeerFactory, monkeypatch: pytest.MonkeyPatch, fanout: int
) -> None:
    """A genuine post pushed with 3,000 unreachable members in its tree makes
    the receiver try its children and a bounded number of re-homed members
    (fanout + min(8 * fanout, 64), 3 tries each), not the whole tree."""
    mallory = await peer("mallory")
    victim = await peer()  # follows nobody, forwards all the same
    post = await mallory.post("mine, genuinely")
    port = closed_port()
    counter = ConnectCounter([port])
    counter.watch(monkeypatch)
    me: Member = ("victim", "127.0.0.1", victim.port)
    tree = [me, *unreachable_members(3000, port)]
    bound = (fanout + min(8 * fanout, 64)) * 3
    started = time.process_time()
    await push_and_ack(victim, raw_push(post, tree, fanout=fanout))
    await eventually(lambda: counter.attempts > bound or quiet(victim), within=20)
    assert 1 <= counter.attempts <= bound
    assert time.process_time() - started < 5
    await still_serves(victim, "mallory", 0)


async def test_a_tree_larger_than_a_push_may_carry_is_refused(
    peer: PeerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A push whose tree has more than 4,096 members is refused as malformed:
    the receiver connects to none of them."""
    mallory = await peer("mallory")
    victim = await peer()
    post = await mallory.post("mine, genuinely")
    port = closed_port()
    counter = ConnectCounter([port])
    counter.watch(monkeypatch)
    me: Member = ("victim", "127.0.0.1", victim.port)
    tree = [me, *unreachable_members(5000, port)]
    client = await RawClient.connect(victim.address)
    client.send_bytes(raw_push(post, tree))
    assert await client.closed_by_peer(within=5)
    client.close()
    await still_serves(victim, "mallory", 0)
    assert counter.attempts == 0


async def test_a_post_is_forwarded_once_whatever_tree_a_replay_carries(
    peer: PeerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same post pushed again with other trees is not forwarded again:
    only the first tree's members are ever contacted."""
    mallory = await peer("mallory")
    victim = await peer()
    post = await mallory.post("once is enough")
    port = closed_port()
    counter = ConnectCounter([port])
    counter.watch(monkeypatch)
    me: Member = ("victim", "127.0.0.1", victim.port)
    trees = [[me, *unreachable_members(2, port, first=2 * i)] for i in range(5)]
    await push_and_ack(victim, raw_push(post, trees[0]))
    await eventually(lambda: quiet(victim))
    first = {(host, p) for _, host, p in trees[0][1:]}
    assert counter.addresses == first
    await push_and_ack(
        victim, *(raw_push(post, t, request_id=i) for i, t in enumerate(trees, 1))
    )
    await eventually(lambda: quiet(victim))
    assert counter.addresses == first


@attrs.define
class Sink:
    """A TCP server at every 127.x address that reads and never answers."""

    server: asyncio.Server
    pushed: int = 0
    """Connections that sent something (each a child pushed to)."""
    writers: list[asyncio.StreamWriter] = attrs.field(factory=list)

    async def close(self) -> None:
        """Stop listening and close every connection accepted."""
        self.server.close()
        for writer in self.writers:
            writer.close()
        await asyncio.gather(*(w.wait_closed() for w in self.writers))
        await self.server.wait_closed()

    @property
    def port(self) -> int:
        port: int = self.server.sockets[0].getsockname()[1]
        return port


async def test_forwards_at_once_are_bounded_and_the_rest_are_dropped(
    peer: PeerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Pushes of 100 posts whose children never answer: the receiver forwards
    at most 64 of them at once (2 children each) and drops the others with a
    log line; it still answers."""
    caplog.set_level(logging.INFO, logger="p2ptimeline")
    mallory = await peer("mallory")
    victim = await peer()
    posts = [await mallory.post(f"post {i}") for i in range(100)]

    async def swallow(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        sink.writers.append(writer)
        if await reader.read(65536):  # a push came: count the child once
            sink.pushed += 1
        while await reader.read(65536):
            pass

    sink = Sink(await asyncio.start_server(swallow, "0.0.0.0", 0))
    me: Member = ("victim", "127.0.0.1", victim.port)
    frames = [
        raw_push(post, [me, *unreachable_members(2, sink.port, first=2 * i)])
        for i, post in enumerate(posts)
    ]
    try:
        await push_and_ack(victim, *frames)
        await eventually(lambda: sink.pushed >= 2 * 64)
        await still_serves(victim, "mallory", 0)  # the victim's loop went round
        await still_serves(victim, "mallory", 0)
        assert sink.pushed == 2 * 64
        assert any("did not forward" in r.getMessage() for r in caplog.records)
    finally:
        await sink.close()


# Point 10: no traceback for any remote input


def bad_frames(post: pt.Post, presence: pt.Presence) -> dict[str, bytes]:
    """Frames with one field out of bounds each, by what is wrong."""
    me = {"name": "victim", "host": "127.0.0.1", "port": 1}
    push = {"post": plain(post), "fanout": 2, "tree": [me]}
    return {
        "presence notice username": raw_frame(
            1, presence={"username": "Not A Name!", "presence": plain(presence)}
        ),
        "presence notice long username": raw_frame(
            1, presence={"username": "x" * 5000, "presence": plain(presence)}
        ),
        "get posts author": raw_frame(
            1, get={"author": "../../../etc", "since": None, "limit": 10}
        ),
        "get posts empty author": raw_frame(
            1, get={"author": "", "since": None, "limit": 10}
        ),
        "tree member host": raw_frame(
            1, push={**push, "tree": [{**me, "host": "bad host\nERROR forged"}]}
        ),
        "tree member empty host": raw_frame(
            1, push={**push, "tree": [{**me, "host": ""}]}
        ),
        "tree member name": raw_frame(
            1, push={**push, "tree": [{**me, "name": "Nobody Here"}]}
        ),
        "tree member port": raw_frame(
            1, push={**push, "tree": [{**me, "port": 70000}]}
        ),
        "empty tree": raw_frame(1, push={**push, "tree": []}),
        "fanout": raw_frame(1, push={**push, "fanout": 0}),
        "refusal as a request": raw_frame(1, refusal={"reason": "x\n" * 50}),
        "batch as a request": raw_frame(1, batch={"posts": [], "more": False}),
        "version": raw_frame(1, version=99, ack={}),
    }


async def test_bad_fields_in_frames_never_log_a_traceback(
    peer: PeerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Frames with a bad username, author, host, port, count or version are
    refused without a traceback in the log, and the peer keeps serving."""
    caplog.set_level(logging.DEBUG)
    mallory = await peer("mallory")
    victim = await peer("victim")
    post = await mallory.post("hello")
    presence = await mallory.registry.get_presence(identity(mallory).public_key)
    assert presence is not None
    taken = []
    for what, frame in bad_frames(post, presence).items():
        client = await RawClient.connect(victim.address)
        client.send_bytes(frame)
        replies = await client.frames(1, within=5)  # none if the peer hangs up
        taken += [what for r in replies if isinstance(r.message, Ack)]
        client.close()
    await still_serves(victim, "victim", 0)
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert tracebacks == [], [r.getMessage() for r in tracebacks]
    assert taken == []


# Point 11: pulls, periodic jobs, files


async def test_a_post_from_the_future_does_not_stop_later_pulls(
    peer: PeerFactory,
) -> None:
    """A post stamped far ahead is refused, and the watermark stays before
    it: the author's later posts are still pulled."""
    store = pt.MemoryStore()
    star = await peer("star", store=store)
    fan = await peer("fan")
    await fan.follow("star")
    ahead = int(time.time() * 1000) + 3600_000
    future = pt.Post.create(
        identity(star), "star", "pinned", pt.HybridTimestamp(physical_ms=ahead)
    )
    await store.add([future])  # held by the author, never pushed
    await fan.sync()
    assert not await holds(fan, future)
    stamp = pt.HybridTimestamp(physical_ms=int(time.time() * 1000))
    now = pt.Post.create(identity(star), "star", "on time", stamp)
    await store.add([now])  # older than the refused post
    await fan.sync()
    assert await holds(fan, now)
    assert not await holds(fan, future)


async def test_a_pull_keeps_the_pages_before_a_bad_one(peer: PeerFactory) -> None:
    """Pulled posts are stored page by page: a bad post in the second page
    loses that page, not the 500 posts of the first."""
    store = pt.MemoryStore()
    star = await peer("star", store=store)
    start = int(time.time() * 1000) - 3600_000
    posts = make_posts("star", 700, identity=identity(star), start_ms=start, step_ms=10)
    posts[600] = attrs.evolve(posts[600], text="tampered")
    await store.add(posts)
    fan = await peer("fan")
    await fan.follow("star")  # pulls in the background
    await fan.sync()
    held = {p.id for p in await fan.timeline(limit=1000)}
    assert held == {p.id for p in posts[:500]}


class FailingStore(pt.MemoryStore):
    """A store whose `prune` fails once `failing` is set, counting calls."""

    def __init__(self) -> None:
        super().__init__()
        self.failing = False
        self.prunes = 0

    async def prune(
        self, *, older_than_ms: int, keep_authors: Collection[str] = ()
    ) -> int:
        self.prunes += 1
        if self.failing:
            raise pt.StoreError("disk on fire")
        return await super().prune(
            older_than_ms=older_than_ms, keep_authors=keep_authors
        )


async def test_a_periodic_job_keeps_running_after_an_unexpected_error(
    peer: PeerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """The retention job runs on after its store raises StoreError, and the
    failures are logged once, not at every run."""
    caplog.set_level(logging.INFO, logger="p2ptimeline")
    store = FailingStore()
    config = attrs.evolve(CONFIG, retention_interval=0.02)
    await peer("alice", store=store, config=config)
    store.failing = True
    runs = store.prunes
    await eventually(lambda: store.prunes >= runs + 5)
    failures = [r for r in caplog.records if "disk on fire" in r.getMessage()]
    assert len(failures) == 1


async def test_the_data_directory_and_database_are_private(
    peer: PeerFactory, tmp_path: Path
) -> None:
    """A peer creates its data directory 0700 and its database files 0600."""
    data = tmp_path / "data"
    alice = await peer("alice", data_dir=data)
    await alice.post("private")
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    files = sorted(data.iterdir())
    assert data / "peer.db" in files
    for file in files:
        assert stat.S_IMODE(file.stat().st_mode) == 0o600, file.name


# Point 1 (part): stop() whatever logout meets


async def test_stop_frees_the_ports_when_logout_raises(
    peer: PeerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A logout that raises (here ValueError) does not keep stop() from
    closing the TCP and UDP sockets; stop() does not raise."""
    alice = await peer("alice")
    port = alice.port

    async def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("seq out of range")

    monkeypatch.setattr(alice.registry, "set_presence", broken)
    try:
        await alice.stop()
    finally:
        assert_closed(port)
    assert alice.username is None


async def test_a_cancelled_stop_still_frees_the_ports(
    peer: PeerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """stop() cancelled while its logout hangs still closes the sockets, and
    the cancellation goes through."""
    alice = await peer("alice")
    port = alice.port
    hanging = asyncio.Event()

    async def hang(*args: object, **kwargs: object) -> None:
        hanging.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(alice.registry, "set_presence", hang)
    stopping = asyncio.create_task(alice.stop())
    await hanging.wait()
    stopping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopping
    assert_closed(port)


def assert_closed(port: int) -> None:
    """Nothing listens on 127.0.0.1:`port` any more, TCP or UDP."""
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", port))


# Point 7 (part): names and keys


async def test_finding_holders_of_posts_looks_up_no_follower_name(
    peer: PeerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the author offline, a pull finds other followers by their keys: a
    followers set stuffed with entries under unregistered names costs no name
    lookup, and the post still comes from an honest follower."""
    star = await peer("star")
    holder = await peer("holder")
    fan = await peer("fan")
    await holder.follow("star")
    await fan.follow("star")
    await fan.logout()
    post = await star.post("while fan is away")
    await eventually(lambda: holds(holder, post))
    star_key = identity(star).public_key
    ghosts = [f"ghost{i}" for i in range(30)]
    entries = [
        pt.FollowEntry.create(
            pt.Identity.generate(),
            follower=name,
            followee="star",
            followee_key=star_key,
            following=True,
            timestamp=pt.HybridTimestamp(physical_ms=int(time.time() * 1000)),
        )
        for name in ghosts
    ]
    await star.registry._started_sets().add("followers", star_key, entries)
    await star.logout()
    node = fan.registry._started()
    ghost_keys = {claim_key(name) for name in ghosts}
    lookups: list[bytes] = []
    read = node.read

    async def counting(key: bytes, *args: object, **kwargs: object) -> object:
        if key in ghost_keys:
            lookups.append(key)
        return await read(key, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(node, "read", counting)
    await fan.login("fan", PASSWORD)
    assert await holds(fan, post)
    assert lookups == []


async def test_a_corrected_key_is_used_at_once(
    peer: PeerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The peer asks the registry for an author's key each time (the registry
    keeps the one cache): once the registry's answer is corrected, the
    author's pushes are accepted."""
    star = await peer("star")
    fan = await peer("fan")
    wrong = pt.Identity.generate().public_key
    real = fan.registry.get_public_key

    async def hijacked(name: str) -> bytes | None:
        return wrong if name == "star" else await real(name)

    monkeypatch.setattr(fan.registry, "get_public_key", hijacked)
    await fan.follow("star")  # the notice goes nowhere: star's key is wrong
    await fan.sync()
    await star.logout()
    await star.login("star", PASSWORD)  # reads its followers: fan among them
    monkeypatch.setattr(fan.registry, "get_public_key", real)
    post = await star.post("accepted: the key is right")
    await eventually(lambda: holds(fan, post), within=5)


async def test_a_post_failing_a_wrongly_cached_key_makes_the_peer_read_it_again(
    peer: PeerFactory,
) -> None:
    """When the registry's cache binds an author to a wrong key (a read that
    lying nodes outvoted), the author's genuine push fails to verify with it;
    the peer then reads the name again from all the closest nodes, takes the
    right key, and accepts the post."""
    star = await peer("star")
    fan = await peer("fan")
    await fan.follow("star")
    mallory = pt.Identity.generate()
    wrong = pt.UsernameClaim.create(mallory, "star", b"", seq=1)
    fan.registry._names.put("star", wrong, time.monotonic())  # as a bad read left it
    post = await star.post("mine, signed with my key")
    await eventually(lambda: holds(fan, post), within=10)
    assert await fan.registry.get_public_key("star") == star_key(star)


def star_key(peer: pt.Peer) -> bytes:
    """The public key of the user logged in on `peer`."""
    session = peer._context.session
    assert session is not None
    return session.identity.public_key
