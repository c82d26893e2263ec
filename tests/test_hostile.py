"""Hostile input at a live peer's ports: it never breaks, and keeps serving."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator

import attrs
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import p2ptimeline as pt
from p2ptimeline._p2p.wire import (
    Ack,
    Frame,
    FrameDecoder,
    GetPosts,
    PostBatch,
    encode_frame,
)
from p2ptimeline.testing import local_network

SERIALIZER = pt.CborSerializer()
LIMITS = pt.Limits(frame_timeout=0.5, max_connections_per_host=8, max_pending=4)
CONFIG = pt.PeerConfig(seal_cost=10, ksize=8, pull_interval=3600.0, limits=LIMITS)
FUZZ = settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@attrs.define
class Target:
    """A live peer with one post."""

    peer: pt.Peer
    post: pt.Post


@pytest.fixture
async def target() -> AsyncIterator[Target]:
    """A started, logged-in peer holding one post of its own."""
    async with local_network(config=CONFIG) as net:
        (peer,) = await net.add_users("victim")
        post = await peer.post("still here")
        yield Target(peer, post)


async def honest_get(target: Target) -> None:
    """A correct request right after the abuse gets the correct answer."""
    reader, writer = await asyncio.open_connection(*target.peer.address)
    try:
        request = Frame.of(
            GetPosts(author="victim", since=None, limit=10), request_id=1
        )
        writer.write(encode_frame(SERIALIZER, request))
        decoder = FrameDecoder(SERIALIZER)
        async with asyncio.timeout(5):
            while not (frames := decoder.feed(await reader.read(65536))):
                pass
        (reply,) = frames
        assert reply.reply_to == 1
        assert isinstance(reply.message, PostBatch)
        assert reply.message.posts == (target.post,)
    finally:
        writer.close()


async def honest_dht_read(target: Target) -> None:
    """The peer's DHT node still answers: a fresh node reads the victim's record."""
    reader = pt.DhtRegistry("127.0.0.1", 0, [target.peer.address], ksize=8)
    await reader.start()
    try:
        record = await reader.get_user("victim")
        assert record is not None
        assert record.online
    finally:
        await reader.stop()


def dht_requests() -> st.SearchStrategy[bytes]:
    """Datagrams shaped like rpcudp requests, with arbitrary contents."""
    junk = st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**64 - 1)
        | st.binary(max_size=40)
        | st.text(max_size=20),
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=12,
    )
    names = st.sampled_from(["ping", "store", "find_node", "find_value", "stun", "x"])
    bodies = st.tuples(names, st.lists(junk, max_size=5)).map(
        lambda t: msgpack.packb([t[0], t[1]], use_bin_type=True)
    )
    kinds = st.sampled_from([b"\x00", b"\x01", b"\x02"])
    return st.builds(
        lambda k, i, b: k + i + b, kinds, st.binary(min_size=20, max_size=20), bodies
    )


@FUZZ
@given(
    datagrams=st.lists(
        st.one_of(st.binary(max_size=2000), dht_requests()), min_size=50, max_size=200
    )
)
async def test_garbage_at_the_dht_port(target: Target, datagrams: list[bytes]) -> None:
    """Random and request-shaped garbage at the DHT port changes nothing."""
    node = target.peer.registry._started()
    held = len(node.storage)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for datagram in datagrams:
            sock.sendto(datagram, target.peer.address)
    await honest_dht_read(target)
    assert len(node.storage) <= held + 2  # only genuine records were stored
    assert len(node.protocol._outstanding) < 20  # no call left hanging per datagram


def frames_of_garbage() -> st.SearchStrategy[bytes]:
    """Byte streams for the TCP port: junk, framed junk, lies about lengths."""
    framed = st.binary(max_size=300).map(lambda b: struct.pack("!I", len(b)) + b)
    lying = st.integers(0, 2**32 - 1).map(lambda n: struct.pack("!I", n) + b"\xa0")
    valid = st.just(encode_frame(SERIALIZER, Frame.of(Ack(), reply_to=77)))
    return st.lists(
        st.one_of(st.binary(max_size=300), framed, lying, valid), max_size=6
    ).map(b"".join)


@FUZZ
@given(streams=st.lists(frames_of_garbage(), min_size=5, max_size=20))
async def test_garbage_at_the_tcp_port(target: Target, streams: list[bytes]) -> None:
    """Junk, framed junk and lying lengths on many connections change nothing."""
    for stream in streams:
        _, writer = await asyncio.open_connection(*target.peer.address)
        writer.write(stream)
        await writer.drain()
        writer.close()
    await honest_get(target)
    assert await target.peer.timeline() == [target.post]


async def test_slowloris_connections_are_closed(target: Target) -> None:
    """Connections that start a frame and never finish it are closed after
    frame_timeout, and do not keep an honest peer from being served."""
    stalled = []
    for _ in range(6):
        reader, writer = await asyncio.open_connection(*target.peer.address)
        writer.write(b"\x00\x00")  # half a length prefix, then silence
        stalled.append((reader, writer))
    await honest_get(target)
    async with asyncio.timeout(LIMITS.frame_timeout + 5):
        for reader, writer in stalled:
            assert await reader.read() == b""  # the peer hung up
            writer.close()


async def test_a_connection_flood_from_one_host_does_not_starve_others(
    target: Target,
) -> None:
    """Past max_connections_per_host, one host's new connections are closed at
    once; peers from other hosts are still served."""
    flood = []
    for _ in range(LIMITS.max_connections_per_host + 6):
        reader, writer = await asyncio.open_connection(
            *target.peer.address, local_addr=("127.0.0.2", 0)
        )
        flood.append((reader, writer))
    closed = 0
    for reader, _ in flood:
        try:
            async with asyncio.timeout(0.5):
                closed += await reader.read() == b""
        except TimeoutError:
            pass  # accepted and still open
    assert closed >= 6
    await honest_get(target)  # from 127.0.0.1
    for _, writer in flood:
        writer.close()


async def test_a_burst_of_requests_is_bounded(target: Target) -> None:
    """Hundreds of requests at once on one connection get answers or refusals,
    never unbounded queues, and the connection keeps working."""
    reader, writer = await asyncio.open_connection(*target.peer.address)
    burst = 300
    for i in range(1, burst + 1):
        request = Frame.of(
            GetPosts(author="victim", since=None, limit=10), request_id=i
        )
        writer.write(encode_frame(SERIALIZER, request))
    decoder = FrameDecoder(SERIALIZER)
    replies: list[Frame] = []
    async with asyncio.timeout(15):
        while len(replies) < burst:
            replies += decoder.feed(await reader.read(65536))
    batches = [r for r in replies if isinstance(r.message, PostBatch)]
    assert batches
    assert len(batches) < burst  # some were refused
    assert {r.reply_to for r in replies} == set(range(1, burst + 1))
    writer.close()
    await honest_get(target)
