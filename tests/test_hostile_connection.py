"""The TCP layer under attack: what one connection can make a peer hold, how
many connections and connects it takes, and what it makes the peer log."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
import time
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hostile.tcp import HangingPort, RawClient, SilentServer, transports_to

import p2ptimeline as pt
from p2ptimeline._p2p.connection import Handler
from p2ptimeline._p2p.pool import ConnectionPool
from p2ptimeline._p2p.server import PeerServer
from p2ptimeline._p2p.wire import (
    Ack,
    Frame,
    GetPosts,
    Message,
    PostBatch,
    Refusal,
    encode_frame,
)
from p2ptimeline.testing import eventually, local_network, make_posts

MiB = 1 << 20
SERIALIZER = pt.CborSerializer()
LIMITS = pt.Limits(frame_timeout=0.5)
CONFIG = pt.PeerConfig(seal_cost=10, ksize=8, pull_interval=3600.0, limits=LIMITS)
ASK = GetPosts(author="victim", since=None, limit=500)
# About 115 KB encoded: 100 posts of 1,000 characters.
PAGE = PostBatch(posts=tuple(make_posts("victim", 100, prefix="x" * 980)), more=True)


@pytest.fixture
async def library() -> AsyncIterator[pt.Peer]:
    """A started peer holding 3,000 posts of about 1,000 characters by its user."""
    async with local_network(config=CONFIG) as net:
        (peer,) = await net.add_users("victim")
        session = peer._context.session
        assert session is not None
        identity = session.identity
        await peer._context.store.add(
            make_posts("victim", 3000, identity=identity, prefix="x" * 980)
        )
        yield peer


@contextlib.asynccontextmanager
async def serving(
    handler: Handler, limits: pt.Limits = LIMITS
) -> AsyncIterator[tuple[str, int]]:
    """A `PeerServer` answering with `handler`, closed at the end; yields
    its address."""
    server = PeerServer(handler, SERIALIZER, limits)
    address = await server.start("127.0.0.1", 0)
    try:
        yield address
    finally:
        await server.close()


async def pages(message: Message, remote: tuple[str, int]) -> Message:
    """A handler answering every request with a page of about 115 KB."""
    return PAGE


async def acks(message: Message, remote: tuple[str, int]) -> Message:
    """A handler answering every request with an Ack."""
    return Ack()


async def flood_without_reading(
    address: tuple[str, int], requests: int, *, within: float = 5.0
) -> tuple[RawClient, asyncio.Transport, int]:
    """Pipeline `requests` GetPosts on a connection that never reads, and
    watch the peer's end of it until the peer closes it (or `within` passes).

    Returns the client, the peer's transport, and the most bytes the peer
    held in that transport's write buffer meanwhile.
    """
    client = await RawClient.connect(address, receive_buffer=4096)
    for _ in range(requests):
        client.request(ASK)
    await eventually(client.peer_side)
    transport = client.peer_side()
    assert transport is not None
    peak = 0

    def watch() -> bool:
        nonlocal peak
        peak = max(peak, transport.get_write_buffer_size())
        return transport.is_closing()

    with contextlib.suppress(TimeoutError):
        await eventually(watch, within=within, every=0.005)
    return client, transport, peak


def most_sent_unread() -> int:
    """Most bytes the kernel keeps in one socket's send buffer (Linux)."""
    return int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])


async def get_posts(address: tuple[str, int], *, limit: int = 10) -> PostBatch:
    """An honest GetPosts on a fresh connection; returns the reply."""
    client = await RawClient.connect(address)
    try:
        client.request(GetPosts(author="victim", since=None, limit=limit))
        (reply,) = await client.frames(1)
        assert isinstance(reply.message, PostBatch)
        return reply.message
    finally:
        client.close()


# Point 3: replies to a connection that never reads


async def test_a_client_that_never_reads_makes_the_peer_hold_under_a_mib(
    library: pt.Peer,
) -> None:
    """Hundreds of pipelined GetPosts of big pages on a connection that never
    reads: the peer holds under 1 MiB of replies for it, closes it, and still
    serves an honest client."""
    attacker, transport, peak = await flood_without_reading(library.address, 300)
    try:
        assert peak < MiB
        assert transport.is_closing()
        assert len((await get_posts(library.address)).posts) == 10
    finally:
        attacker.close()


async def test_what_a_non_reader_makes_us_hold_is_bounded_in_bytes() -> None:
    """All the memory a flood of requests on a connection that never reads
    makes the server allocate (replies being made, waiting and buffered)
    stays under 1.5 MiB, not one reply per request."""
    async with serving(pages) as address:
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            attacker, _, _ = await flood_without_reading(address, 300)
            peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
        attacker.close()
    assert peak < 1.5 * MiB


async def test_a_connection_that_does_not_read_gets_no_new_requests_served() -> None:
    """Once a connection's unread replies fill its budget, its next requests
    are not even read: the handler runs a handful of times, not per request."""
    calls = 0

    async def counting(message: Message, remote: tuple[str, int]) -> Message:
        nonlocal calls
        calls += 1
        return PAGE

    async with serving(counting) as address:
        attacker, _, _ = await flood_without_reading(address, 2000)
        attacker.close()
    # Replies leave for the kernel's send buffer (up to tcp_wmem's maximum)
    # and the connection's budget (768 KiB), then no request is read.
    kernel = most_sent_unread()
    page = len(encode_frame(SERIALIZER, Frame.of(PAGE, reply_to=1)))
    assert 0 < calls <= (kernel + 768 * 1024) // page + 1 < 100


async def test_requests_held_unanswered_are_bounded_in_bytes() -> None:
    """Large requests whose handler is slow to return: the server stops
    reading once the requests it holds take its budget, so it holds a few
    of them, not four times max_pending."""
    release = asyncio.Event()
    calls = 0

    async def stuck(message: Message, remote: tuple[str, int]) -> Message:
        nonlocal calls
        calls += 1
        await release.wait()
        return Ack()

    async with serving(stuck, pt.Limits()) as address:
        client = await RawClient.connect(address)
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            with contextlib.suppress(TimeoutError):
                for _ in range(200):
                    client.request(PAGE)
                    async with asyncio.timeout(1):  # the peer stopped reading
                        await client.writer.drain()
            await eventually(client.peer_side)
            transport = client.peer_side()
            assert transport is not None
            with contextlib.suppress(TimeoutError):
                await eventually(lambda: not transport.is_reading(), within=3)
            peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
            release.set()
            client.close()
    size = len(encode_frame(SERIALIZER, Frame.of(PAGE, request_id=1)))
    assert 0 < calls <= 768 * 1024 // size + 2
    assert peak < 4 * MiB


async def test_a_slow_reader_gets_every_reply() -> None:
    """A client that reads its replies slowly is not cut off: the peer waits
    for it, and every request is answered."""
    async with serving(pages) as address:
        client = await RawClient.connect(address, receive_buffer=4096)
        try:
            for _ in range(20):
                client.request(ASK)
            replies: list[Frame] = []
            async with asyncio.timeout(20):
                while len(replies) < 20:
                    data = await client.reader.read(65536)
                    assert data, "the peer closed the connection"
                    replies += client._decoder.feed(data)
                    await asyncio.sleep(0.01)  # a slow reader (not synchronisation)
            assert {r.reply_to for r in replies} == set(range(1, 21))
            assert all(r.message == PAGE for r in replies)
        finally:
            client.close()


async def test_requests_to_a_receiver_that_never_reads_do_not_pile_up() -> None:
    """Many concurrent large requests to a peer that never reads: the pool
    writes one only once the last has been taken, so what it buffers stays
    under 1 MiB; the requests fail as unreachable in time, and the
    connection is dropped once the peer has taken nothing for frame_timeout."""
    pool = ConnectionPool(SERIALIZER, pt.Limits(request_timeout=1.0, frame_timeout=0.5))
    try:
        async with SilentServer() as sink:
            requests = [
                asyncio.create_task(pool.request(sink.address, PAGE)) for _ in range(80)
            ]
            await eventually(lambda: transports_to(sink.address))
            (transport,) = transports_to(sink.address)
            peak = 0

            def watch() -> bool:
                nonlocal peak
                peak = max(peak, transport.get_write_buffer_size())
                return all(r.done() for r in requests)

            await eventually(watch, within=5, every=0.005)
            results = await asyncio.gather(*requests, return_exceptions=True)
            await eventually(transport.is_closing, within=3)
    finally:
        async with asyncio.timeout(3):
            await pool.close()
    assert peak < MiB
    assert all(isinstance(r, pt.PeerUnreachable) for r in results)


async def test_closing_the_server_frees_a_connection_that_does_not_read() -> None:
    """close() returns at once and frees the socket even while a client that
    stopped reading has replies buffered."""
    server = PeerServer(pages, SERIALIZER, pt.Limits())
    address = await server.start("127.0.0.1", 0)
    attacker = await RawClient.connect(address, receive_buffer=4096)
    try:
        for _ in range(50):
            attacker.request(ASK)
        await eventually(attacker.peer_side)
        transport = attacker.peer_side()
        assert transport is not None
        await eventually(lambda: transport.get_write_buffer_size() > 0)
        async with asyncio.timeout(3):
            await server.close()
        assert transport.is_closing()
    finally:
        attacker.close()


async def test_quiet_connections_are_closed_after_idle_timeout() -> None:
    """A connection that sends nothing is closed after idle_timeout, and so
    is one that was served and then fell quiet."""
    async with serving(acks, pt.Limits(idle_timeout=0.3)) as address:
        idle = await RawClient.connect(address)
        assert await idle.closed_by_peer(within=3)
        idle.close()
        served = await RawClient.connect(address)
        served.request(ASK)
        assert [f.message for f in await served.frames(1)] == [Ack()]
        assert await served.closed_by_peer(within=3)
        served.close()


# Point 11: connects and connections


async def test_a_connect_abandoned_by_its_requests_leaves_no_unretrieved_error() -> (
    None
):
    """Requests that time out while their connect hangs leave no "exception
    was never retrieved" behind once the connect ends."""
    loop = asyncio.get_running_loop()
    reported: list[dict[str, object]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: reported.append(context))
    try:
        with HangingPort() as port:
            pool = ConnectionPool(
                SERIALIZER, pt.Limits(connect_timeout=0.4, request_timeout=0.1)
            )
            for i in range(5):
                with pytest.raises(pt.PeerUnreachable):
                    await pool.request(port.address(f"127.0.0.{i + 2}"), Ack())
            await eventually(lambda: port.connecting() == 0 and not pool._opening)
            gc.collect()
            await pool.close()
    finally:
        loop.set_exception_handler(previous)
    assert [context["message"] for context in reported] == []


async def test_connects_in_flight_are_bounded() -> None:
    """Requests to 200 addresses whose connects hang: at most 64 connects
    (the default max_connecting) are in flight at once, and every request
    fails as unreachable within its timeout."""
    with HangingPort() as port:
        pool = ConnectionPool(SERIALIZER, pt.Limits(request_timeout=1.0))
        requests = [
            asyncio.create_task(pool.request(port.address(f"127.0.1.{i + 2}"), Ack()))
            for i in range(200)
        ]
        peak = 0

        def watch() -> bool:
            nonlocal peak
            peak = max(peak, port.connecting())
            return all(r.done() for r in requests)

        await eventually(watch, within=5, every=0.02)
        results = await asyncio.gather(*requests, return_exceptions=True)
        await pool.close()
    assert 0 < peak <= 64
    assert all(isinstance(r, pt.PeerUnreachable) for r in results)


async def test_an_address_whose_connect_just_failed_fails_at_once() -> None:
    """Right after a connect to an address failed, a request to it fails at
    once instead of connecting (and waiting) again."""
    with HangingPort() as port:
        pool = ConnectionPool(
            SERIALIZER, pt.Limits(connect_timeout=0.5, request_timeout=5.0)
        )
        with pytest.raises(pt.PeerUnreachable):
            await pool.request(port.address(), Ack())
        started = time.monotonic()
        with pytest.raises(pt.PeerUnreachable):
            await pool.request(port.address(), Ack())
        assert time.monotonic() - started < 0.25
        await pool.close()


async def test_an_address_that_failed_is_tried_again_after_the_backoff() -> None:
    """connect_backoff after a failed connect, the address is tried again:
    a peer that was down moments ago is reached once it is back."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = probe.getsockname()[:2]  # free once closed: connects refused
    pool = ConnectionPool(SERIALIZER, pt.Limits(connect_backoff=0.3))
    with pytest.raises(pt.PeerUnreachable):
        await pool.request(address, Ack())
    server = PeerServer(acks, SERIALIZER, LIMITS)
    await server.start(*address)
    try:
        with pytest.raises(pt.PeerUnreachable):
            await pool.request(address, Ack())  # within the backoff

        async def reached() -> bool:
            with contextlib.suppress(pt.PeerUnreachable):
                return await pool.request(address, Ack()) == Ack()
            return False

        await eventually(reached, within=3, every=0.05)
    finally:
        await pool.close()
        await server.close()


async def test_closing_the_pool_stops_its_connects() -> None:
    """close() stops the connects in flight at once, and the requests waiting
    on them fail as unreachable."""
    with HangingPort() as port:
        pool = ConnectionPool(
            SERIALIZER, pt.Limits(connect_timeout=3.0, request_timeout=5.0)
        )
        requests = [
            asyncio.create_task(pool.request(port.address(f"127.0.0.{i + 2}"), Ack()))
            for i in range(5)
        ]
        await eventually(lambda: port.connecting() == 5)
        await pool.close()
        assert port.connecting() == 0
        results = await asyncio.gather(*requests, return_exceptions=True)
    assert all(isinstance(r, pt.PeerUnreachable) for r in results)


async def test_a_full_server_evicts_connections_that_never_completed_a_request() -> (
    None
):
    """With every slot held by connections that only send keep-alives, each
    newcomer is served: the server closes one of those, and keeps the idle
    connection that completed a request."""
    keep_alive = Frame.of(Ack(), reply_to=77)  # a reply to nothing: ignored
    async with serving(acks, pt.Limits(max_connections=4)) as address:
        served = await RawClient.connect(address, local_host="127.0.0.2")
        served.request(ASK)
        assert [f.message for f in await served.frames(1)] == [Ack()]
        squatters = []
        for i in range(3, 6):
            squatter = await RawClient.connect(address, local_host=f"127.0.0.{i}")
            squatter.send_bytes(encode_frame(SERIALIZER, keep_alive))
            squatters.append(squatter)
        await eventually(lambda: all(s.peer_side() for s in squatters))
        newcomers = []
        for i in range(6, 9):
            newcomer = await RawClient.connect(address, local_host=f"127.0.0.{i}")
            newcomers.append(newcomer)
            newcomer.request(ASK)
            assert [f.message for f in await newcomer.frames(1)] == [Ack()]
        for squatter in squatters:
            assert await squatter.closed_by_peer(within=2)
        served.request(ASK)
        assert [f.message for f in await served.frames(1)] == [Ack()]
        for client in [served, *squatters, *newcomers]:
            client.close()


# Point 10: what remote input makes us log


async def test_a_handler_refusing_remote_input_logs_no_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A handler raising RemoteError, UsageError or ValueError gets a Refusal
    sent and an INFO line logged, never a traceback."""
    errors = [pt.ProtocolError("bad frame"), pt.UsageError("no"), ValueError("bad")]

    async def refusing(message: Message, remote: tuple[str, int]) -> Message:
        raise errors.pop(0)

    caplog.set_level(logging.INFO, logger="p2ptimeline")
    async with serving(refusing) as address:
        client = await RawClient.connect(address)
        for _ in range(3):
            client.request(ASK)
        replies = await client.frames(3)
        client.close()
    assert all(isinstance(r.message, Refusal) for r in replies)
    assert caplog.records
    assert [r for r in caplog.records if r.exc_info] == []


async def test_unexpected_handler_errors_log_one_traceback_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A hundred requests whose handler fails unexpectedly are each refused,
    and the log holds one traceback, not a hundred."""

    async def failing(message: Message, remote: tuple[str, int]) -> Message:
        raise RuntimeError("boom")

    caplog.set_level(logging.INFO, logger="p2ptimeline")
    async with serving(failing) as address:
        client = await RawClient.connect(address)
        for _ in range(100):
            client.request(ASK)
        replies = await client.frames(100)
        client.close()
    assert [r.message for r in replies] == [Refusal(reason="internal error")] * 100
    assert len([r for r in caplog.records if r.exc_info]) == 1


async def test_a_flood_of_bad_connections_logs_a_few_lines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two hundred connections sending garbage are each closed, with a few
    log lines in all rather than one each."""
    caplog.set_level(logging.DEBUG, logger="p2ptimeline")
    async with serving(acks) as address:
        for _ in range(200):
            client = await RawClient.connect(address)
            client.send_bytes(b"\xff" * 8)  # a length prefix far beyond the limit
            assert await client.closed_by_peer(within=2)
            client.close()
        honest = await RawClient.connect(address)
        honest.request(ASK)
        assert [f.message for f in await honest.frames(1)] == [Ack()]
        honest.close()
    lines = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert len(lines) <= 3


async def test_a_huge_bad_frame_makes_one_short_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A frame of almost 1 MiB whose one field name is the whole frame (so
    that the decoder's error quotes it) closes the connection with a log
    line of a few hundred characters, not a megabyte."""
    import cbor2

    caplog.set_level(logging.DEBUG, logger="p2ptimeline")
    async with serving(acks) as address:
        body = cbor2.dumps({"x" * 1_000_000: 1})
        client = await RawClient.connect(address)
        client.send_bytes(len(body).to_bytes(4, "big") + body)
        assert await client.closed_by_peer(within=5)
        client.close()
    assert caplog.records
    assert max(len(r.getMessage()) for r in caplog.records) < 500


def test_rate_limited_log_counts_what_it_suppresses(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One message per key per interval; the next one emitted tells how many
    were dropped meanwhile."""
    from p2ptimeline._ratelog import RateLimitedLog

    now = 0.0
    ratelog = RateLimitedLog(logging.getLogger("test.ratelog"), 10.0, clock=lambda: now)
    caplog.set_level(logging.INFO, logger="test.ratelog")
    for i in range(5):
        ratelog.info("dropped", "dropped %d", i)
    ratelog.info("closed", "closed")
    now = 10.0
    ratelog.info("dropped", "dropped %d", 5)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        ratelog.exception("failed", "failed")
    assert [r.getMessage() for r in caplog.records] == [
        "dropped 0",
        "closed",
        "dropped 5 (4 more like it suppressed)",
        "failed",
    ]
    assert caplog.records[-1].exc_info is not None
