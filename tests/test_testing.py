"""The testing kit's local network: it starts, works, and leaves nothing behind."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import attrs
import pytest

import p2ptimeline as pt
from p2ptimeline.testing import LOCAL_CONFIG, LocalNetwork, eventually, local_network


def bindable(port: int, *kinds: socket.SocketKind) -> bool:
    """Whether `port` of 127.0.0.1 can be bound again with each of `kinds`."""
    for kind in kinds:
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def ports(net: LocalNetwork) -> tuple[list[int], list[int]]:
    """The UDP ports of the bootstrap nodes, and the ports of the peers."""
    return [port for _, port in net.bootstrap], [peer.port for peer in net.peers]


def all_free(udp: list[int], both: list[int]) -> bool:
    """Whether every port is free again: UDP for `udp`, UDP and TCP for `both`."""
    return all(bindable(p, socket.SOCK_DGRAM) for p in udp) and all(
        bindable(p, socket.SOCK_DGRAM, socket.SOCK_STREAM) for p in both
    )


async def test_n_peers_and_the_bootstrap_nodes_come_up() -> None:
    """local_network(n) starts n peers, each joined through every bootstrap node."""
    async with local_network(3, bootstrap_nodes=2) as net:
        assert len(net.bootstrap) == len(net.bootstrap_nodes) == 2
        assert len(net.peers) == 3
        assert len({peer.port for peer in net.peers}) == 3
        assert [peer.username for peer in net.peers] == [None] * 3
        for peer in net.peers:
            assert peer.config == LOCAL_CONFIG
            assert set(net.bootstrap) <= set(peer.registry.neighbors())
        assert net.bootstrap[0] in net.bootstrap_nodes[1].neighbors()


async def test_users_follow_post_and_receive() -> None:
    """Users added to the network register, follow, post and receive pushes."""
    async with local_network() as net:
        alice, bob, carol = await net.add_users("alice", "bob", "carol")
        assert [p.username for p in (alice, bob, carol)] == ["alice", "bob", "carol"]
        assert net.peers == [alice, bob, carol]
        await bob.follow("alice")
        await carol.follow("alice")
        received = bob.incoming()
        post = await alice.post("hello, local world")
        async with asyncio.timeout(5):
            assert await anext(received) == post
        await eventually(lambda: carol_holds(carol, post), within=5)
        assert await alice.followers() == ["bob", "carol"]


async def carol_holds(peer: pt.Peer, post: pt.Post) -> bool:
    """Whether `post` is in `peer`'s timeline."""
    return post in await peer.timeline()


async def test_a_peer_added_later_joins_and_reads() -> None:
    """A peer added in the block joins the same network and pulls posts there."""
    async with local_network(1) as net:
        (alice,) = await net.add_users("alice")
        post = await alice.post("before the newcomer")
        newcomer = await net.add_peer()
        await newcomer.register("bob", net.password)
        await newcomer.follow("alice")
        await newcomer.sync()
        assert await newcomer.timeline() == [post]
        assert len(net.peers) == 3


async def test_everything_is_released_when_the_body_raises() -> None:
    """An error in the block stops every peer and node: their ports bind again."""
    seen: list[tuple[LocalNetwork, list[int], list[int]]] = []

    async def body() -> None:
        async with local_network(2, bootstrap_nodes=2) as net:
            await net.add_users("alice")
            udp, both = ports(net)
            assert not all_free(udp, both)
            seen.append((net, udp, both))
            raise LookupError("the test failed")

    with pytest.raises(LookupError):
        await body()
    ((net, udp, both),) = seen
    assert all_free(udp, both)
    assert all(peer.username is None for peer in net.peers)


async def test_everything_is_released_when_the_body_is_cancelled() -> None:
    """Cancelling the block stops every peer and node: their ports bind again."""
    inside: asyncio.Future[LocalNetwork] = asyncio.get_running_loop().create_future()

    async def body() -> None:
        async with local_network(2) as net:
            inside.set_result(net)
            await asyncio.Event().wait()

    task = asyncio.create_task(body())
    net = await inside
    udp, both = ports(net)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert all_free(udp, both)


async def test_a_peer_cancelled_while_it_joins_leaves_no_socket() -> None:
    """add_peer cancelled while the peer waits for a silent bootstrap node
    leaves no socket behind once it returns."""
    config = attrs.evolve(LOCAL_CONFIG, rpc_timeout=1.0)
    loop = asyncio.get_running_loop()
    async with local_network(config=config) as net:
        await net.bootstrap_nodes[0].stop()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
            silent.bind(net.bootstrap[0])  # the stopped node's port: no answer
            silent.setblocking(False)
            adding = asyncio.create_task(net.add_peer())
            async with asyncio.timeout(5):
                _, (_, port) = await loop.sock_recvfrom(silent, 2048)
            adding.cancel()  # the peer is bound, and waits for an answer
            with pytest.raises(asyncio.CancelledError):
                await adding
            assert bindable(port, socket.SOCK_DGRAM, socket.SOCK_STREAM)
            assert net.peers == []


async def test_a_closed_network_refuses_new_peers() -> None:
    """After the block, adding a peer is a usage error; closing again is fine."""
    async with local_network() as net:
        pass
    with pytest.raises(pt.UsageError):
        await net.add_peer()
    await net.aclose()


async def test_peers_keep_their_stores_under_data_dir(tmp_path: Path) -> None:
    """With data_dir, numbered peers and users keep SQLite stores under it."""
    async with local_network(1, data_dir=tmp_path) as net:
        await net.add_users("alice")
    assert (tmp_path / "peer0" / "peer.db").exists()
    assert (tmp_path / "alice" / "peer.db").exists()


async def test_peers_use_the_store_factory() -> None:
    """With a store factory, each peer gets a store of its own from it."""
    stores: list[pt.MemoryStore] = []

    def make() -> pt.MemoryStore:
        stores.append(pt.MemoryStore())
        return stores[-1]

    async with local_network(2, store=make) as net:
        (alice,) = await net.add_users("alice")
        post = await alice.post("kept in the third store")
        assert len(stores) == 3
        assert await stores[2].get(post.id) == post


@pytest.mark.parametrize(
    "options",
    [
        {"n": -1},
        {"bootstrap_nodes": 0},
        {"concurrency": 0},
        {"data_dir": "somewhere", "store": pt.MemoryStore},
    ],
)
async def test_bad_arguments_are_refused(options: dict[str, object]) -> None:
    """Out-of-range counts, or both data_dir and store, are usage errors."""
    with pytest.raises(pt.UsageError):
        async with local_network(**options):  # type: ignore[arg-type]
            pass


async def test_a_failed_registration_is_raised_and_its_peer_stopped() -> None:
    """add_users raises the refusal of a taken name and stops that peer; the
    other user is added."""
    async with local_network() as net:
        await net.add_users("alice")
        made = len(net._made)
        with pytest.raises(pt.UsernameTaken):
            await net.add_users("bob", "alice")
        assert [peer.username for peer in net.peers] == ["alice", "bob"]
        (refused,) = (peer for peer in net._made[made:] if peer not in net.peers)
        with pytest.raises(pt.UsageError):
            refused.port  # noqa: B018  (stopped)
