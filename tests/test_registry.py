"""DhtRegistry on real multi-node networks over UDP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import random
import socket
import time
from typing import Any

import attrs
import pytest
from conftest import NetworkFactory
from kademlia.network import Server

import p2ptimeline as pt
from p2ptimeline._dht.records import (
    RegistryValue,
    SetShard,
    claim_key,
    presence_key,
    shard_key,
)
from p2ptimeline._dht.wire import Request
from p2ptimeline.testing import eventually

SEALED = b"sealed-key-placeholder"


async def register(node: pt.DhtRegistry, name: str) -> pt.Identity:
    identity = pt.Identity.generate()
    await node.claim_username(name, identity, SEALED)
    return identity


async def test_read_after_write_from_every_node(network: NetworkFactory) -> None:
    """In a 50-node network, every node reads the claim and presence just written."""
    nodes = await network(50)
    alice = await register(nodes[7], "alice")
    await nodes[7].set_presence("alice", alice, ("127.0.0.1", 9001), online=True)
    records = await asyncio.gather(*(node.get_user("alice") for node in nodes))
    for record in records:
        assert record is not None
        assert record.public_key == alice.public_key
        assert record.address == ("127.0.0.1", 9001)
        assert record.online
    # A new version written elsewhere is what everyone reads next.
    await nodes[31].set_presence("alice", alice, ("127.0.0.1", 9002), online=True)
    records = await asyncio.gather(*(node.get_user("alice") for node in nodes))
    assert {r.address for r in records if r} == {("127.0.0.1", 9002)}


async def test_unknown_user_and_invalid_names(network: NetworkFactory) -> None:
    """Unregistered names read as None; invalid names are a usage error."""
    nodes = await network(5)
    assert await nodes[1].get_user("nobody") is None
    with pytest.raises(pt.UnknownUser):
        await nodes[1].get_followers("nobody")
    with pytest.raises(pt.UsageError):
        await nodes[1].get_user("Not A Name")
    alice = await register(nodes[0], "alice")
    with pytest.raises(pt.UnknownUser):
        await nodes[2].follow("alice", "nobody", alice)


async def test_a_taken_name_cannot_be_claimed(network: NetworkFactory) -> None:
    """A second key claiming a name gets UsernameTaken; the owner may re-seal."""
    nodes = await network(10)
    alice = await register(nodes[1], "alice")
    with pytest.raises(pt.UsernameTaken):
        await register(nodes[5], "alice")
    await nodes[6].claim_username("alice", alice, b"new-sealed-key")
    record = await nodes[9].get_user("alice")
    assert record is not None
    assert record.sealed_key == b"new-sealed-key"


async def test_concurrent_claims_have_one_winner(network: NetworkFactory) -> None:
    """Two keys claiming one name at once: one succeeds, and every reader agrees."""
    nodes = await network(20)
    identities = [pt.Identity.generate() for _ in range(2)]
    results = await asyncio.gather(
        nodes[3].claim_username("bob", identities[0], SEALED),
        nodes[14].claim_username("bob", identities[1], SEALED),
        return_exceptions=True,
    )
    winners = [r for r in results if isinstance(r, pt.UsernameClaim)]
    assert len(winners) == 1, results
    assert all(isinstance(r, pt.UsernameClaim | pt.UsernameTaken) for r in results)
    records = await asyncio.gather(*(node.get_user("bob") for node in nodes))
    assert {r.public_key for r in records if r} == {winners[0].public_key}
    for node in nodes:  # the loser withdrew whatever replicas it got
        held = stored(node, claim_key("bob"))
        assert held is None or held.claim.withdrawn or held.claim == winners[0]  # type: ignore[union-attr]


async def test_a_split_claim_is_settled_for_every_reader(
    network: NetworkFactory,
) -> None:
    """When the closest nodes hold two keys' claims of one name (a race),
    the claimer holding fewer gets UsernameTaken and withdraws, even from the
    very closest nodes, which a read asks first; then every reader sees the
    winner, and reads repair the withdrawn replicas."""
    nodes = await network(12)
    alice, bob = pt.Identity.generate(), pt.Identity.generate()
    key = claim_key("name")
    target = int.from_bytes(key)
    closest = sorted(nodes, key=lambda n: int.from_bytes(n.node_id) ^ target)[:8]
    alices, bobs = [
        RegistryValue(claim=pt.UsernameClaim.create(who, "name", SEALED))
        for who in (alice, bob)
    ]
    serializer = pt.CborSerializer()
    for i, node in enumerate(closest):  # bob's on the 3 closest, alice's on 5
        value = bobs if i < 3 else alices
        node._started().storage.offer(key, serializer.encode(value))
    with pytest.raises(pt.UsernameTaken):
        await nodes[0].claim_username("name", bob, SEALED)
    records = await asyncio.gather(*(node.get_user("name") for node in nodes))
    assert all(r is not None and r.public_key == alice.public_key for r in records)
    await eventually(lambda: all(stored(n, key) == alices for n in closest))


async def test_hundred_concurrent_follows_are_all_kept(network: NetworkFactory) -> None:
    """100 users following one user at the same moment make 100 followers."""
    nodes = await network(20)
    await register(nodes[0], "star")
    fans = [pt.Identity.generate() for _ in range(100)]
    await asyncio.gather(
        *(
            nodes[i % 19 + 1].claim_username(f"fan{i}", fan, SEALED)
            for i, fan in enumerate(fans)
        )
    )
    await asyncio.gather(
        *(nodes[i % 19 + 1].follow(f"fan{i}", "star", f) for i, f in enumerate(fans))
    )
    expected = {f"fan{i}" for i in range(100)}
    for node in random.Random(1).sample(nodes, 4):
        assert await node.get_followers("star") == expected
    for i in (0, 42, 99):
        assert await nodes[(i * 7) % 20].get_following(f"fan{i}") == {"star"}


async def test_unfollow_after_follow_wins(network: NetworkFactory) -> None:
    """An unfollow after a follow wins, even from a peer whose clock is behind."""
    nodes = await network(10)
    await register(nodes[0], "star")
    fan = await register(nodes[1], "fan")
    await nodes[1].follow("fan", "star", fan)
    assert await nodes[5].get_followers("star") == {"fan"}
    # The same user, logged in on a peer whose clock is ten minutes slow.
    slow = pt.DhtRegistry(ksize=8, clock=lambda: time.time() - 600)
    await slow.start("127.0.0.1", 0, bootstrap=[nodes[0].address])
    try:
        await slow.unfollow("fan", "star", fan)
        assert await nodes[6].get_followers("star") == frozenset()
        assert await nodes[7].get_following("fan") == frozenset()
        await nodes[2].follow("fan", "star", fan)
        assert await slow.get_followers("star") == {"fan"}
    finally:
        await slow.stop()


async def test_racing_follow_and_unfollow_agree_everywhere(
    network: NetworkFactory,
) -> None:
    """A follow and an unfollow racing from two peers resolve to the later one."""
    nodes = await network(12)
    await register(nodes[0], "star")
    fans = {f"fan{i}": await register(nodes[i % 11 + 1], f"fan{i}") for i in range(10)}
    results = await asyncio.gather(
        *(
            call
            for i, (name, fan) in enumerate(fans.items())
            for call in (
                nodes[i % 11 + 1].follow(name, "star", fan),
                nodes[(i + 5) % 11 + 1].unfollow(name, "star", fan),
            )
        )
    )
    latest = {}
    for entry in results:
        if entry.follower not in latest or entry.supersedes(latest[entry.follower]):
            latest[entry.follower] = entry
    expected = {name for name, entry in latest.items() if entry.following}
    for node in nodes[:4]:
        assert await node.get_followers("star") == expected


async def test_presence_lease_crash_and_logout(network: NetworkFactory) -> None:
    """A renewed lease stays online; a crash lapses it; a logout ends it at once."""
    nodes = await network(8, lease=1.0)
    alice = await register(nodes[1], "alice")
    bob = await register(nodes[2], "bob")
    await nodes[1].set_presence("alice", alice, ("127.0.0.1", 1111), online=True)
    await nodes[2].set_presence("bob", bob, ("127.0.0.1", 2222), online=True)
    # Renewal keeps alice online well past one lease.
    started = time.monotonic()
    while time.monotonic() - started < 2.5:
        record = await nodes[5].get_user("alice")
        assert record is not None
        assert record.online
        await asyncio.sleep(0.25)  # reads spread over several leases
    # bob logs out: offline at once.
    await nodes[2].set_presence("bob", bob, ("127.0.0.1", 2222), online=False)
    record = await nodes[6].get_user("bob")
    assert record is not None
    assert not record.online
    # alice's peer crashes (its node stops without logging out).
    await nodes[1].stop()

    async def alice_offline() -> bool:
        record = await nodes[5].get_user("alice")
        return record is not None and not record.online

    deadline = time.monotonic() + 5
    while not await alice_offline():
        assert time.monotonic() < deadline, "alice still reads online"
        await asyncio.sleep(0.1)


async def test_set_presence_needs_the_owner(network: NetworkFactory) -> None:
    """Only the name's owner can publish its presence."""
    nodes = await network(5)
    await register(nodes[1], "alice")
    mallory = await register(nodes[2], "mallory")
    with pytest.raises(pt.AuthError):
        await nodes[2].set_presence("alice", mallory, ("127.0.0.1", 6666), True)
    with pytest.raises(pt.AuthError):
        await nodes[2].follow("alice", "mallory", mallory)


async def test_records_survive_thirty_percent_of_nodes_dying(
    network: NetworkFactory,
) -> None:
    """With 30% of the nodes killed, records written before are still readable."""
    nodes = await network(30, rpc_timeout=0.5)
    identities = {}
    for i in range(10):
        identities[f"user{i}"] = await register(nodes[i + 1], f"user{i}")
    for i in range(1, 10):
        await nodes[i + 1].follow(f"user{i}", "user0", identities[f"user{i}"])
    victims = random.Random(3).sample(nodes[1:], 9)
    await asyncio.gather(*(victim.stop() for victim in victims))
    survivors = [n for n in nodes if n not in victims]

    async def check(node: pt.DhtRegistry) -> None:
        for name, identity in identities.items():
            record = await node.get_user(name)
            assert record is not None
            assert record.public_key == identity.public_key
        assert await node.get_followers("user0") == {f"user{i}" for i in range(1, 10)}

    await asyncio.gather(*(check(node) for node in survivors[:6]))


async def test_garbage_datagrams_do_not_stop_a_node(network: NetworkFactory) -> None:
    """Garbage, truncated and huge datagrams are dropped; the node keeps serving."""
    nodes = await network(4)
    alice = await register(nodes[0], "alice")
    target = nodes[1].address
    rng = random.Random(5)
    junk = [
        b"",
        b"\x00",
        b"\x00" + bytes(20),
        b"\x00" + bytes(20) + b"\xc1",  # msgpack's never-used byte
        b"\x00" + bytes(20) + b"\x92\xa5store\x93\x01\x02\x03",  # wrong arg types
        b"\x00" + bytes(20) + b"\x92\xa4nope\x90",  # unknown RPC
        b"\x00" + bytes(20) + b"\x92\xa4ping\x90",  # missing arguments
        b"\x01" + bytes(20) + b"\x90",  # a response nobody asked for
        b"\x07" + bytes(30),  # unknown kind
        b"\x00" + bytes(20) + b"\x91" * 5000,  # deep nesting
        bytes(60000),  # oversized
    ] + [rng.randbytes(rng.randrange(1, 2000)) for _ in range(200)]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for datagram in junk:
            sock.sendto(datagram, target)
    record = await nodes[1].get_user("alice")
    assert record is not None
    assert record.public_key == alice.public_key
    # The node still answers other nodes' requests: a write through it works.
    bob = await register(nodes[1], "bob")
    record = await nodes[3].get_user("bob")
    assert record is not None
    assert record.public_key == bob.public_key


async def test_stop_is_idempotent_and_frees_the_port(network: NetworkFactory) -> None:
    """stop() twice is fine; the UDP port is free again afterwards."""
    node = pt.DhtRegistry()
    await node.start("127.0.0.1", 0)
    host, port = node.address
    await node.stop()
    await node.stop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, port))
    with pytest.raises(pt.UsageError):
        node.address  # noqa: B018


async def test_async_with_starts_and_stops_a_registry() -> None:
    """A registry configured with host, port and bootstrap nodes starts on
    entering ``async with`` and is stopped, its port freed, on leaving it."""
    async with pt.DhtRegistry("127.0.0.1", 0, ksize=8) as boot:
        host, port = boot.address
        async with pt.DhtRegistry("127.0.0.1", 0, [boot.address], ksize=8) as node:
            assert node.neighbors() == [boot.address]
            alice = await register(node, "alice")
            assert await boot.get_public_key("alice") == alice.public_key
    with pytest.raises(pt.UsageError):
        boot.address  # noqa: B018
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, port))


async def test_start_arguments_take_the_place_of_the_constructors(
    network: NetworkFactory,
) -> None:
    """start(host, port, bootstrap) overrides what the registry was built
    with, for later starts too; the registry can be started again after
    stop()."""
    (boot,) = await network(1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken_port = taken.getsockname()[1]
        node = pt.DhtRegistry("127.0.0.1", taken_port, ksize=8)
        await node.start("127.0.0.1", 0, [boot.address])
        try:
            assert node.address[1] != taken_port
            assert node.neighbors() == [boot.address]
            await node.stop()
            await node.start()  # port 0 and the bootstrap node given to start()
            assert node.address[1] != taken_port
            alice = await register(node, "alice")
            assert await boot.get_public_key("alice") == alice.public_key
        finally:
            await node.stop()


async def test_a_taken_port_is_a_listen_error_naming_the_address() -> None:
    """Starting on a UDP port another socket holds raises ListenError (a
    NetworkError, not RegistryUnavailable) naming the address; nothing is
    left open."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        node = pt.DhtRegistry("127.0.0.1", port)
        with pytest.raises(pt.ListenError) as caught:
            async with node:
                pytest.fail("started on a taken port")
    error = caught.value
    assert error.address == ("127.0.0.1", port)
    assert f"cannot listen on UDP 127.0.0.1:{port}: " in str(error)
    assert "in use" in str(error)
    assert isinstance(error, pt.NetworkError)
    assert not isinstance(error, pt.RegistryUnavailable)
    with pytest.raises(pt.UsageError):
        node.address  # noqa: B018
    with pytest.raises(pt.UsageError):
        pt.DhtRegistry("127.0.0.1", 70000)


async def test_a_cancelled_stop_still_frees_the_port_and_the_tasks(
    network: NetworkFactory,
) -> None:
    """stop() cancelled while it waits for its tasks still closes the socket
    and cancels every task: the lease and the maintenance."""
    nodes = await network(3)
    alice = await register(nodes[1], "alice")
    node = nodes[1]
    await node.set_presence("alice", alice, ("127.0.0.1", 1111), online=True)
    await node.set_presence("alice", alice, ("127.0.0.1", 1112), online=True)
    tasks = node._tasks
    assert len(tasks) == 2  # maintenance, and one lease (renewed, replaced)
    protocol = node._started().protocol
    host, port = node.address
    stopping = asyncio.create_task(node.stop())
    await asyncio.sleep(0)  # stop() now waits for its tasks to end
    stopping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopping
    assert protocol.transport is None
    await eventually(lambda: len(tasks) == 0)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, port))


async def test_a_cancelled_start_leaves_nothing_open() -> None:
    """start() cancelled while it joins (through a node that never answers)
    closes the socket it had bound."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))  # bound, never answering
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        node = pt.DhtRegistry(
            "127.0.0.1", port, [silent.getsockname()], rpc_timeout=5.0
        )
        starting = asyncio.create_task(node.start())
        await eventually(lambda: node._node is not None)  # bound, now joining
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting
    with pytest.raises(pt.UsageError):
        node.address  # noqa: B018
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", port))


async def test_follow_entries_are_stamped_by_the_clock_given(
    network: NetworkFactory,
) -> None:
    """A registry given a hybrid clock (the peer's) stamps follow entries
    with it: they order after anything that clock stamped before."""
    nodes = await network(4)
    hlc = pt.HybridLogicalClock(lambda: int(time.time() * 1000))
    ahead = pt.HybridTimestamp(physical_ms=int(time.time() * 1000) + 30_000, logical=0)
    hlc.observe(ahead)  # e.g. a post received from a peer 30 s ahead
    async with pt.DhtRegistry(
        "127.0.0.1", 0, [nodes[0].address], ksize=8, hlc=hlc
    ) as node:
        alice = await register(node, "alice")
        await register(nodes[1], "bob")
        entry = await node.follow("alice", "bob", alice)
    assert entry.timestamp > ahead
    assert hlc.last == entry.timestamp


async def test_a_node_back_with_its_id_replaces_its_old_address(
    network: NetworkFactory,
) -> None:
    """A node restarted with its node id on another port is no dead contact:
    the nodes it meets keep its new address in place of the old one, and
    hand it again the records it should hold."""
    nodes = await network(3)
    await register(nodes[0], "alice")  # held by all three (k = 8)
    node_id, old = nodes[2].node_id, nodes[2].address
    await nodes[2].stop()
    back = pt.DhtRegistry(ksize=8, node_id=node_id)
    await back.start("127.0.0.1", 0, bootstrap=[nodes[0].address])
    try:
        assert back.address != old
        # Taken in once it proved its address (nodes[0] pings it back).
        await eventually(lambda: back.address in nodes[0].neighbors())
        assert old not in nodes[0].neighbors()
        storage = back._started().storage
        await eventually(lambda: storage.get(claim_key("alice")) is not None)
    finally:
        await back.stop()


async def test_a_newcomer_closest_to_a_key_is_handed_its_value(
    network: NetworkFactory,
) -> None:
    """A node that joins closer to a key than any node holding its value is
    handed the value by the closest holder it meets (paper, section 2.5)."""
    nodes = await network(12)
    await register(nodes[0], "alice")
    key = claim_key("alice")
    nearest_id = (int.from_bytes(key) ^ 1).to_bytes(20, "big")
    newcomer = pt.DhtRegistry(ksize=8, node_id=nearest_id)
    await newcomer.start("127.0.0.1", 0, bootstrap=[nodes[5].address])
    try:
        storage = newcomer._started().storage
        await eventually(lambda: storage.get(key) is not None)
    finally:
        await newcomer.stop()


async def test_a_value_missing_at_the_closest_nodes_is_found_further_out(
    network: NetworkFactory,
) -> None:
    """If the nodes closest to a key do not hold its value (they joined after
    it was stored), a read looks further before calling it absent, and
    repairs them."""
    nodes = await network(12)
    alice = await register(nodes[0], "alice")
    key = claim_key("alice")
    holders = [n for n in nodes if n._started().storage.get(key) is not None]
    target = int.from_bytes(key)
    holders.sort(key=lambda n: int.from_bytes(n.node_id) ^ target)
    for node in holders[:6]:  # more than a read asks: as if they never got it
        node._started().storage._data.pop(key)
    reader = next(n for n in nodes if n not in holders)  # holding nothing itself
    record = await reader.get_user("alice")
    assert record is not None
    assert record.public_key == alice.public_key
    await eventually(lambda: all(n._started().storage.get(key) for n in holders[:6]))


async def test_holders_wrongly_marked_unreachable_are_asked_again(
    network: NetworkFactory,
) -> None:
    """A node skips for a while the nodes whose calls failed; when those
    were only slow (an overloaded host), a read that finds nothing asks them
    again before calling the record absent."""
    nodes = await network(12)
    alice = await register(nodes[0], "alice")
    key = claim_key("alice")
    reader = next(n for n in nodes if stored(n, key) is None)
    protocol = reader._started().protocol
    for node in nodes:  # as if all holders had just timed out
        if stored(node, key) is not None:
            protocol._unreachable[node.address] = time.monotonic()
    record = await reader.get_user("alice")
    assert record is not None
    assert record.public_key == alice.public_key


async def test_unreachable_bootstrap_is_registry_unavailable() -> None:
    """With no reachable node, operations raise RegistryUnavailable, and joining
    later (when the bootstrap node comes up) works."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        free_port = sock.getsockname()[1]
    node = pt.DhtRegistry(rpc_timeout=0.2)
    await node.start("127.0.0.1", 0, bootstrap=[("127.0.0.1", free_port)])
    boot = pt.DhtRegistry()
    try:
        with pytest.raises(pt.RegistryUnavailable):
            await node.get_user("alice")
        await boot.start("127.0.0.1", free_port)
        await eventually(lambda: bool(node.neighbors()), within=15)
        assert await node.get_user("alice") is None
    finally:
        await node.stop()
        await boot.stop()


def stored(node: pt.DhtRegistry, key: bytes) -> RegistryValue | None:
    """What `node` holds under `key` (its own storage, not a lookup)."""
    assert node._node is not None
    return node._node.storage.value(key)


def presence_port(node: pt.DhtRegistry, user: pt.Identity) -> int | None:
    """The port in the presence of `user` that `node` holds, if any."""
    value = stored(node, presence_key(user.public_key))
    return value.presence.port if value and value.presence else None


async def test_forged_writes_from_a_plain_kademlia_client_are_refused(
    network: NetworkFactory,
) -> None:
    """Garbage, forged, squatting, replayed and oversized writes sent by a plain
    kademlia node are refused by every storage node and never read back.

    A node that holds nothing under a key cannot know that a validly signed
    squat or replay is one: it may keep it, but readers outvote it (claims)
    or prefer the newest (presences)."""
    nodes = await network(12)
    alice = await register(nodes[1], "alice")
    carol = await register(nodes[2], "carol")
    mallory = pt.Identity.generate()
    await nodes[1].set_presence("alice", alice, ("127.0.0.1", 1001), online=True)
    old_presence = (await nodes[3].get_user("alice")).presence  # type: ignore[union-attr]
    await nodes[1].set_presence("alice", alice, ("127.0.0.1", 1002), online=True)

    attacker = Server(ksize=8)
    await attacker.listen(0, interface="127.0.0.1")
    try:
        await attacker.bootstrap([nodes[0].address])
        serializer = pt.CborSerializer()
        genuine_claim = await nodes[4].get_user("alice")
        squat = pt.UsernameClaim.create(mallory, "alice", b"mine", seq=99)
        tampered = attrs.evolve(squat, public_key=alice.public_key)
        forged_name = pt.FollowEntry.create(
            mallory,
            follower="carol",  # carol never followed alice; mallory signs as carol
            followee="alice",
            followee_key=alice.public_key,
            following=True,
            timestamp=pt.HybridTimestamp(physical_ms=int(time.time() * 1000)),
        )
        bad_signature = attrs.evolve(forged_name, follower_key=carol.public_key)
        followers_root = shard_key("followers", alice.public_key, "")
        attacks = {
            "garbage": (claim_key("alice"), b"\x00garbage\xff"),
            "squatting claim": (
                claim_key("alice"),
                serializer.encode(RegistryValue(claim=squat)),
            ),
            "tampered claim": (
                claim_key("alice"),
                serializer.encode(RegistryValue(claim=tampered)),
            ),
            "replayed presence": (
                presence_key(alice.public_key),
                serializer.encode(RegistryValue(presence=old_presence)),
            ),
            "oversized": (claim_key("alice"), b"\xa0" * 7500),
            "badly signed entry": (
                followers_root,
                serializer.encode(
                    RegistryValue(
                        shard=SetShard(
                            relation="followers",
                            owner_key=alice.public_key,
                            prefix="",
                            entries=(bad_signature,),
                        )
                    )
                ),
            ),
        }
        claim_holders = [n for n in nodes if stored(n, claim_key("alice"))]
        presence_holders = [  # of the newest presence: an older one is a replay
            n for n in nodes if presence_port(n, alice) == 1002
        ]
        for key, raw in attacks.values():
            await attacker.set_digest(key, raw)
        # A validly signed entry that lies about the follower's name is kept
        # by storage nodes (they cannot know every name), but no reader
        # believes it.
        shard = SetShard(
            relation="followers",
            owner_key=alice.public_key,
            prefix="",
            entries=(forged_name,),
        )
        await attacker.set_digest(
            followers_root, serializer.encode(RegistryValue(shard=shard))
        )

        for node in claim_holders:
            claim = stored(node, claim_key("alice"))
            assert claim.claim.public_key == alice.public_key  # type: ignore[union-attr]
        assert presence_holders
        assert all(presence_port(n, alice) == 1002 for n in presence_holders)
        for node in nodes:
            claim = stored(node, claim_key("alice"))
            assert claim is None or claim.claim != tampered  # type: ignore[union-attr]
            held = stored(node, followers_root)
            assert held is None or bad_signature not in held.shard.entries  # type: ignore[union-attr]
        for node in nodes[5:9]:  # the attacker also answers reads: still no effect
            record = await node.get_user("alice")
            assert record is not None
            assert record.public_key == alice.public_key
            assert record.sealed_key == genuine_claim.sealed_key  # type: ignore[union-attr]
            assert record.address == ("127.0.0.1", 1002)
            assert await node.get_followers("alice") == frozenset()
    finally:
        attacker.stop()


def _hostile(node: pt.DhtRegistry, behaviour: str, replay: dict[str, bytes]) -> None:
    """Make `node` answer lookups with garbage or stale records."""
    assert node._node is not None
    protocol = node._node.protocol
    honest = protocol._handle
    rng = random.Random(behaviour)

    def handle(request: Request, addr: tuple[str, int], proven: bool) -> object:
        answer = honest(request, addr, proven)
        if request.name not in ("find_node", "find_value"):
            return answer
        key = request.args[0]
        if behaviour == "random bytes":
            return {"nodes": rng.randbytes(40)}
        if behaviour == "bad node list":
            return {"nodes": [[b"short", "not an ip", -1], "x", None]}
        if behaviour == "garbage value":
            return {**answer, "value": rng.randbytes(100)}
        if behaviour == "stale records" and key in replay:
            return {**answer, "value": replay[key]}
        return {"value": b"\xa1\x63bad\x00", "nodes": [[b"x" * 20, "10.255.255.1", 9]]}

    protocol._handle = handle


async def test_hostile_nodes_answering_lookups_cannot_break_reads(
    network: NetworkFactory,
) -> None:
    """Nodes answering with garbage, bad node lists or old records do not change
    what honest nodes read, and do not break their lookups."""
    nodes = await network(24, rpc_timeout=0.5)
    alice = await register(nodes[1], "alice")
    bob = await register(nodes[2], "bob")
    await nodes[1].set_presence("alice", alice, ("127.0.0.1", 1001), online=True)
    serializer = pt.CborSerializer()
    old = stored(nodes[0], presence_key(alice.public_key)) or (
        RegistryValue(presence=(await nodes[0].get_user("alice")).presence)  # type: ignore[union-attr]
    )
    replay = {presence_key(alice.public_key): serializer.encode(old)}
    await nodes[1].set_presence("alice", alice, ("127.0.0.1", 1002), online=True)
    await nodes[2].follow("bob", "alice", bob)
    behaviours = ["random bytes", "bad node list", "garbage value", "stale records"]
    for i, node in enumerate(nodes[3:11]):
        _hostile(node, behaviours[i % len(behaviours)], replay)
    for node in nodes[11:]:
        record = await node.get_user("alice")
        assert record is not None
        assert record.public_key == alice.public_key
        assert record.address == ("127.0.0.1", 1002)
        assert await node.get_followers("alice") == {"bob"}


@pytest.mark.slow
async def test_ten_thousand_followers_are_stored_and_listed(
    network: NetworkFactory,
) -> None:
    """A user with 10,000 followers (far beyond one 8 KB datagram) has them all
    listed, from a node that never saw them written."""
    # A throughput test on one loaded event loop: a generous RPC timeout.
    nodes = await network(8, ksize=4, rpc_timeout=10.0)
    star = await register(nodes[1], "star")
    fans = [pt.Identity.generate() for _ in range(10_000)]
    slots = asyncio.Semaphore(32)

    async def claim(i: int) -> None:
        async with slots:
            await nodes[i % 8].claim_username(f"fan{i}", fans[i], SEALED)

    await asyncio.gather(*(claim(i) for i in range(len(fans))))
    now = pt.HybridTimestamp(physical_ms=int(time.time() * 1000))
    entries = [
        pt.FollowEntry.create(
            fan,
            follower=f"fan{i}",
            followee="star",
            followee_key=star.public_key,
            following=True,
            timestamp=now,
        )
        for i, fan in enumerate(fans)
    ]
    # Each fan's follow, as `follow()` writes it into the star's set; in one
    # batch here, to keep the test fast.
    assert nodes[2]._sets is not None
    await nodes[2]._sets.add("followers", star.public_key, entries)
    followers = await nodes[6].get_followers("star")
    assert followers == {f"fan{i}" for i in range(len(fans))}


async def test_a_restarted_bootstrap_node_rejoins_the_network_it_served() -> None:
    """A bootstrap node that restarts knows nobody; the nodes that joined
    through it greet it again (every `rejoin_interval`), so that a newcomer
    joining through it finds the network and its records, instead of a
    network of its own."""
    boot = pt.DhtRegistry(ksize=8)
    await boot.start("127.0.0.1", 0)
    address = boot.address
    nodes = []
    try:
        for _ in range(4):
            node = pt.DhtRegistry(ksize=8, rejoin_interval=0.2)
            await node.start("127.0.0.1", 0, bootstrap=[address])
            nodes.append(node)
        alice = await register(nodes[0], "alice")
        await boot.stop()
        boot = pt.DhtRegistry(ksize=8)
        await boot.start(*address)  # the same address, a fresh state
        await eventually(lambda: len(boot.neighbors()) >= 2, within=10)
        newcomer = pt.DhtRegistry(ksize=8)
        await newcomer.start("127.0.0.1", 0, bootstrap=[address])
        nodes.append(newcomer)
        assert await newcomer.get_public_key("alice") == alice.public_key
    finally:
        await asyncio.gather(boot.stop(), *(n.stop() for n in nodes))


async def test_a_lease_that_cannot_be_renewed_is_said_once(
    network: NetworkFactory,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A node cut off from the DHT warns once that the presence lease cannot
    be renewed, not at every renewal (every third of the lease)."""
    boot, node = await network(2, lease=0.3, rpc_timeout=0.1)
    alice = await register(node, "alice")
    publish = node._publish_presence
    tries = 0

    async def counting(*args: Any, **options: Any) -> Any:
        nonlocal tries
        tries += 1
        return await publish(*args, **options)

    monkeypatch.setattr(node, "_publish_presence", counting)
    await node.set_presence("alice", alice, ("127.0.0.1", 9001), online=True)
    await boot.stop()
    await eventually(lambda: tries >= 5)
    failed = [r for r in caplog.records if "could not renew" in r.message]
    assert len(failed) == 1
