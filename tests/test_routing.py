"""The routing table: its nearest-contact search against a brute-force one,
and when it asks a full bucket's oldest contact whether it is still there."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st
from kademlia.node import Node

from p2ptimeline._dht.routing import RegistryRoutingTable


class _NoProtocol:
    """Enough of a protocol for a routing table; notes whom it would ping."""

    def __init__(self) -> None:
        self.pinged: list[Node] = []

    async def call_ping(self, node: Node) -> tuple[bool, None]:
        return (False, None)

    def spawn(self, coroutine: object) -> None:
        self.pinged.append(coroutine.cr_frame.f_locals["node"])  # type: ignore[attr-defined]
        coroutine.close()  # type: ignore[attr-defined]


def _random_id(rng: random.Random, shared: int) -> bytes:
    """An id whose first `shared` bits are zero, ending in zeros, ones or
    random bits (ids on the edges of id ranges, where off-by-ones hide)."""
    tail = rng.choice([0, 2 ** (160 - shared) - 1, rng.getrandbits(160 - shared)])
    return (tail >> rng.randrange(160 - shared + 1)).to_bytes(20, "big")


@given(
    seed=st.integers(0, 2**32),
    count=st.integers(0, 300),
    k=st.integers(1, 20),
    shared=st.sampled_from([0, 0, 100, 150, 156]),
)
def test_find_neighbors_returns_the_k_closest(
    seed: int, count: int, k: int, shared: int
) -> None:
    """Whatever the table holds (ids spread out or sharing long prefixes),
    and however it got there (contacts added, dropped, back at another
    address, each change followed by a search), the k closest contacts by
    XOR distance, in order, without the target itself or the excluded
    address."""
    rng = random.Random(seed)
    me = Node(_random_id(rng, shared))
    table = RegistryRoutingTable(_NoProtocol(), 8, me)
    for port in range(count):
        known = table.contacts()
        change = rng.random()
        if known and change < 0.1:
            table.remove_contact(rng.choice(known))
        elif known and change < 0.2:
            table.heard_from(Node(rng.choice(known).id, "127.0.0.1", 10_000 + port))
        else:
            table.add_contact(Node(_random_id(rng, shared), "127.0.0.1", port))
        table.find_neighbors(Node(_random_id(rng, shared)), k)  # fills the caches
    contacts = [n for bucket in table.buckets for n in bucket.nodes.values()]
    assert sorted(n.id for n in table.contacts()) == sorted(n.id for n in contacts)
    target = rng.choice(contacts) if contacts and rng.random() < 0.3 else None
    target = target or Node(_random_id(rng, shared))
    excluded = rng.choice(contacts) if contacts else None
    expected = sorted(
        (c for c in contacts if c.id != target.id and c is not excluded),
        key=lambda c: c.long_id ^ target.long_id,
    )[:k]
    found = table.find_neighbors(target, k, exclude=excluded)
    assert [(n.id, n.port) for n in found] == [(n.id, n.port) for n in expected]


def test_a_full_bucket_pings_its_head_only_when_it_has_been_silent() -> None:
    """A newcomer to a full bucket makes the table ping the bucket's least
    recently seen contact, unless that contact was heard from lately."""
    protocol = _NoProtocol()
    table = RegistryRoutingTable(protocol, 2, Node(bytes(20)))

    def far(byte: int) -> Node:  # ids sharing 5 bits: a bucket that cannot split
        return Node(bytes([byte]) + bytes(18) + b"\x01", "127.0.0.1", byte)

    head, second = far(0x80), far(0x84)
    table.add_contact(head)
    table.add_contact(second)
    table.heard_from(head)
    table.heard_from(second)
    table.add_contact(far(0x81))
    assert protocol.pinged == []
    assert {n.id for n in table.contacts()} == {head.id, second.id}
    table._heard.clear()  # as if both had been silent for long
    table.add_contact(far(0x82))
    assert [n.id for n in protocol.pinged] == [head.id]


def test_the_most_silent_head_is_the_one_to_ping() -> None:
    """Of the buckets' least recently seen contacts, the one silent the
    longest is pinged, once it has been silent for the given time."""
    table = RegistryRoutingTable(_NoProtocol(), 2, Node(bytes(20)))
    near = Node(bytes(19) + b"\x05", "127.0.0.1", 1)
    far = [Node(bytes([b]) + bytes(18) + b"\x01", "127.0.0.1", b) for b in (0x80, 0xC0)]
    for node in (near, *far):
        table.add_contact(node)
        table.heard_from(node)
    assert len({table.get_bucket_for(n) for n in (near, *far)}) > 1
    assert table.most_silent_head(60) is None  # all heard from just now
    table._heard[far[0].id] -= 120
    table._heard[near.id] -= 90
    assert table.most_silent_head(60) == far[0]
    assert table.most_silent_head(100) == far[0]
    assert table.most_silent_head(150) is None
    table.heard_from(far[0])  # it answered: now the tail of its bucket
    assert table.most_silent_head(60) == near
