"""The peer's API as a newcomer meets it: defaults, messages, refusals,
the transport seam, and what `follow` brings."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
from conftest import FAST, PeerFactory

import p2ptimeline as pt
from p2ptimeline._p2p.wire import Message, PostPush, Refusal
from p2ptimeline.testing import eventually

PASSWORD = "correct horse"


async def test_followers_and_following_default_to_the_logged_in_user(
    peers: PeerFactory,
) -> None:
    """`followers()` and `following()` without a name are the user's own."""
    alice, bob = await peers(2)
    await alice.register("alice", PASSWORD)
    await bob.register("bob", PASSWORD)
    await bob.follow("alice")
    assert await bob.following() == ["alice"]
    assert await alice.followers() == ["bob"]
    assert await alice.following() == []
    await alice.logout()
    with pytest.raises(pt.NotLoggedIn):
        await alice.followers()
    assert await alice.followers("alice") == ["bob"]  # a name needs no login


async def test_unfollow_of_oneself_or_of_a_stranger_says_why(
    peers: PeerFactory,
) -> None:
    """`unfollow` of oneself, or of someone not followed, is a UsageError
    that says so, and changes nothing in the registry."""
    alice, bob = await peers(2)
    await alice.register("alice", PASSWORD)
    await bob.register("bob", PASSWORD)
    with pytest.raises(pt.UsageError, match="cannot unfollow themselves"):
        await bob.unfollow("bob")
    with pytest.raises(pt.UsageError, match="bob does not follow alice"):
        await bob.unfollow("alice")
    assert await alice.followers() == []
    assert await alice.notifications() == []


async def test_a_stopped_peer_says_it_is_stopped(peers: PeerFactory) -> None:
    """After `stop()`, the API says the peer is stopped (not "not logged in"),
    and a stopped peer does not start again."""
    (peer,) = await peers(1)
    await peer.register("alice", PASSWORD)
    await peer.stop()
    for call in (peer.post("hello"), peer.timeline(), peer.follow("bob")):
        with pytest.raises(pt.UsageError, match="the peer is stopped") as refused:
            await call
        assert not isinstance(refused.value, pt.NotLoggedIn)
    with pytest.raises(pt.UsageError, match="stopped"):
        _ = peer.address
    with pytest.raises(pt.UsageError, match="already stopped"):
        await peer.start()
    fresh = pt.Peer(config=FAST, clock=pt.ClockSync(servers=[]))
    with pytest.raises(pt.UsageError, match="not started"):
        await fresh.post("hello")


async def test_follow_brings_the_followees_recent_posts(peers: PeerFactory) -> None:
    """Right after `follow` returns, the followee's earlier posts are in the
    timeline: no `sync` needed."""
    alice, bob = await peers(2)
    await alice.register("alice", PASSWORD)
    posts = [await alice.post(f"before bob came {i}") for i in range(3)]
    await bob.register("bob", PASSWORD)
    await bob.follow("alice")
    assert [p.id for p in await bob.timeline()] == [p.id for p in reversed(posts)]


async def test_follow_does_not_wait_past_its_deadline_for_posts(
    peers: PeerFactory,
) -> None:
    """A followee whose catch-up hangs does not hold `follow` beyond
    `follow_catch_up`; the posts arrive after it returned."""
    released = asyncio.Event()

    class Slow(pt.Transport):
        async def answer(self, message: Message, remote: tuple[str, int]) -> Message:
            if type(message).__name__ == "GetPosts":
                await released.wait()
            return await super().answer(message, remote)

    (alice,) = await peers(1, transport=Slow)
    (bob,) = await peers(1, config=attrs.evolve(FAST, follow_catch_up=0.2))
    await alice.register("alice", PASSWORD)
    post = await alice.post("slow to come")
    await bob.register("bob", PASSWORD)
    await bob.follow("alice")
    assert await bob.timeline() == []  # follow returned without it
    released.set()

    async def arrived() -> bool:
        return [p.id for p in await bob.timeline()] == [post.id]

    await eventually(arrived)


async def test_a_refused_push_is_not_retried_nor_taken_for_unreachable(
    peers: PeerFactory,
) -> None:
    """A follower that refuses a push is asked once, is not marked
    unreachable, and its subtree still gets the post (from the author)."""
    refusals: list[str] = []

    class Refusing(pt.Transport):
        async def answer(self, message: Message, remote: tuple[str, int]) -> Message:
            if isinstance(message, PostPush):
                refusals.append(message.post.id.hex())
                return Refusal(reason="cannot check that name now")
            return await super().answer(message, remote)

    config = attrs.evolve(FAST, fanout=1)  # a chain: the refuser has a subtree
    (star,) = await peers(1, config=config)
    fans = await peers(4, config=config)
    (refuser,) = await peers(1, config=config, transport=Refusing)
    await star.register("star", PASSWORD)
    for i, fan in enumerate([*fans, refuser]):
        await fan.register(f"fan{i}", PASSWORD)
        await fan.follow("star")
    post = await star.post("take it or leave it")

    async def delivered() -> bool:
        timelines = [await fan.timeline() for fan in fans]
        return all(t and t[0].id == post.id for t in timelines)

    await eventually(delivered)
    assert refusals.count(post.id.hex()) <= 1  # never tried again
    session = star._context.session
    assert session is not None
    follower = session.directory.get("fan4")
    assert follower is not None
    assert not follower.unreachable_seq


@contextlib.contextmanager
def tcp_port_with_free_udp_twin() -> Iterator[tuple[socket.socket, int]]:
    """A bound TCP socket whose port is free for UDP (others' tests and
    benchmarks use UDP ports too): the peer then fails on TCP only."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
        tcp = socket.socket()
        try:
            tcp.bind(("127.0.0.1", port))
        except OSError:
            tcp.close()
            continue
        with tcp:
            yield tcp, port
        return
    raise AssertionError("no port free for both UDP and TCP")


async def test_a_taken_port_is_a_listen_error_naming_it(peers: PeerFactory) -> None:
    """A peer asked for a TCP port already taken raises `ListenError` (a
    `NetworkError`) with the address, not RegistryUnavailable."""
    with tcp_port_with_free_udp_twin() as (taken, port):
        taken.listen()
        peer = pt.Peer("127.0.0.1", port, config=FAST, clock=pt.ClockSync(servers=[]))
        with pytest.raises(pt.ListenError) as failed:
            await peer.start()
    assert failed.value.address == ("127.0.0.1", port)
    expected = f"cannot listen on TCP 127.0.0.1:{port}: address already in use"
    assert str(failed.value) == expected
    assert not isinstance(failed.value, pt.RegistryUnavailable)
    await peer.stop()


async def test_no_source_is_said_once_per_author(
    peers: PeerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A followee with no online source is logged once, not at every pull."""
    alice, bob = await peers(2)
    await alice.register("alice", PASSWORD)
    await bob.register("bob", PASSWORD)
    await bob.follow("alice")
    await alice.logout()
    caplog.set_level(logging.INFO, logger="p2ptimeline")
    for _ in range(3):
        await bob.sync()
    lines = [r for r in caplog.records if "no online source of alice" in r.message]
    assert len(lines) == 1


PURE = [
    "_models.py",
    "_hlc.py",
    "_p2p/wire.py",
    "_p2p/tree.py",
    "_p2p/directory.py",
    "_dht/records.py",
]


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_import_neither_asyncio_nor_socket(module: str) -> None:
    """The pure logic modules (and what they import of the package) use no
    asyncio and no socket: they can be tested and reused without I/O."""
    package = Path(pt.__file__).parent
    seen: set[Path] = set()
    todo = [package / module]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            elif isinstance(node, ast.ImportFrom):  # relative: follow it
                base = path.parent
                for _ in range(node.level - 1):
                    base = base.parent
                target = base.joinpath(*(node.module or "").split("."))
                for candidate in (target.with_suffix(".py"), target / "__init__.py"):
                    if candidate.exists():
                        todo.append(candidate)
                continue
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top not in {"asyncio", "socket"}, f"{path} imports {name}"
