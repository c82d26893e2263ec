"""The routing table's nearest-contact search against a brute-force one."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st
from kademlia.node import Node

from p2ptimeline._dht_protocol import _RoutingTable


class _NoProtocol:
    """Enough of a protocol for a routing table that never pings."""

    async def call_ping(self, node: Node) -> tuple[bool, None]:
        return (False, None)

    def spawn(self, coroutine: object) -> None:
        coroutine.close()  # type: ignore[attr-defined]


@given(
    seed=st.integers(0, 2**32),
    count=st.integers(0, 300),
    k=st.integers(1, 20),
)
def test_find_neighbors_returns_the_k_closest(seed: int, count: int, k: int) -> None:
    """Whatever the table holds, the k closest contacts by XOR distance, in
    order, without the target itself or the excluded address."""
    rng = random.Random(seed)
    me = Node(rng.randbytes(20))
    table = _RoutingTable(_NoProtocol(), 8, me)
    for port in range(count):
        table.add_contact(Node(rng.randbytes(20), "127.0.0.1", port))
    contacts = table.contacts()
    target = rng.choice(contacts) if contacts and rng.random() < 0.3 else None
    target = target or Node(rng.randbytes(20))
    excluded = rng.choice(contacts) if contacts else None
    expected = sorted(
        (c for c in contacts if c.id != target.id and c is not excluded),
        key=lambda c: c.long_id ^ target.long_id,
    )[:k]
    found = table.find_neighbors(target, k, exclude=excluded)
    assert [n.id for n in found] == [n.id for n in expected]
