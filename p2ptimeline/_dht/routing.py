"""The registry's routing table: `kademlia`'s, with its lookups and checks fixed.

See the table of `kademlia` 2.2.3 workarounds in `docs/architecture.md`:
`find_neighbors` returns the exact k closest contacts, by binary searches
over their sorted ids; a contact that is heard from moves to its bucket's
tail (so a bucket's head is its least recently seen contact); a full bucket
asks its head whether it is still there only if it has been silent for
`ALIVE_FOR` seconds.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Coroutine, Iterator
from typing import Any, Protocol

from kademlia.node import Node
from kademlia.routing import KBucket, RoutingTable

__all__ = ["ALIVE_FOR", "Pinger", "RegistryRoutingTable"]

ALIVE_FOR = 60.0
"""Seconds after a contact was last heard from that it is taken to be
there without asking (a ping)."""


class Pinger(Protocol):
    """What the routing table needs of its protocol: ask a node whether it is
    still there, in a task the protocol owns."""

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None: ...

    def call_ping(self, node: Node) -> Coroutine[Any, Any, Any]: ...


class RegistryRoutingTable(RoutingTable):  # type: ignore[misc]  # untyped base class
    """`kademlia`'s routing table with its lookup and task handling fixed."""

    protocol: Pinger

    def flush(self) -> None:
        super().flush()
        self._contacts: list[Node] | None = None  # all contacts, rebuilt on change
        self._by_long_id: dict[int, Node] = {}  # the contacts by id as a number
        self._sorted_ids: list[int] = []  # those numbers, in order
        self._uppers: list[int] | None = None  # bucket upper bounds, for bisect
        self._heard: dict[bytes, float] = {}  # node id -> when it last answered

    def heard_from(self, node: Node) -> bool:
        """Note that `node` answered or asked something just now; whether it
        is a known contact back at another address (a restarted node).

        kademlia 2.2.3 leaves a known contact where it is in its bucket, so
        that a bucket's head is the oldest contact rather than the least
        recently seen; a known contact moves to the tail here, with its new
        address if it came back on another one.
        """
        self._heard[node.id] = time.monotonic()
        bucket = self.buckets[self.get_bucket_for(node)]
        known = bucket.nodes.get(node.id)
        if known is None:
            return False
        moved = (known.ip, known.port) != (node.ip, node.port)
        if moved:
            bucket.nodes[node.id] = node
            self._contacts = None
        bucket.nodes.move_to_end(node.id)
        return moved

    def knows(self, node: Node) -> bool:
        """Whether `node` is a contact, at the address it has now."""
        known = self.buckets[self.get_bucket_for(node)].nodes.get(node.id)
        return known is not None and (known.ip, known.port) == (node.ip, node.port)

    def most_silent_head(self, silence: float) -> Node | None:
        """Of the least recently seen contacts of the buckets, the one silent
        the longest, if it has not been heard from for `silence` seconds."""
        contacts = self.contacts()
        if len(self._heard) > 2 * len(contacts) + 1024:  # forget old contacts
            known = {n.id for n in contacts}
            self._heard = {i: t for i, t in self._heard.items() if i in known}
        heads = [_head(b) for b in self.buckets if len(b)]
        head = min(heads, key=self._last_heard, default=None)
        if head is None or self._last_heard(head) >= time.monotonic() - silence:
            return None
        return head

    def _last_heard(self, node: Node) -> float:
        return self._heard.get(node.id, 0.0)

    def find_neighbors(
        self, node: Node, k: int | None = None, exclude: Node | None = None
    ) -> list[Node]:
        # kademlia 2.2.3 stops after the first k nodes met walking outwards
        # bucket by bucket, which are not the k closest by XOR distance.
        k = k or self.ksize
        target = node.long_id
        self.contacts()  # rebuilds the sorted ids if the table changed
        ids, by_id = self._sorted_ids, self._by_long_id
        home = None if exclude is None else (exclude.ip, exclude.port)
        nearest = [
            n
            for n in (by_id[ids[i]] for i in _nearest(ids, target, k + 2))
            if n.long_id != target and (home is None or (n.ip, n.port) != home)
        ]
        nearest.sort(key=lambda n: n.long_id ^ target)
        return nearest[:k]

    def contacts(self) -> list[Node]:
        """Every node in the table (a cached list, rebuilt after changes)."""
        if self._contacts is None:
            self._contacts = [n for b in self.buckets for n in b.nodes.values()]
            self._by_long_id = {n.long_id: n for n in self._contacts}
            self._sorted_ids = sorted(self._by_long_id)
        return self._contacts

    def get_bucket_for(self, node: Node) -> int:
        # kademlia 2.2.3 scans the buckets and compares with < against the
        # inclusive upper bound; bisect over the upper bounds instead.
        if self._uppers is None:
            self._uppers = [bucket.range[1] for bucket in self.buckets]
        return min(
            bisect.bisect_left(self._uppers, node.long_id), len(self._uppers) - 1
        )

    def split_bucket(self, index: int) -> None:
        super().split_bucket(index)
        self._uppers = None
        self._contacts = None  # the bucket's replacement nodes moved in

    def add_contact(self, node: Node) -> None:
        index = self.get_bucket_for(node)
        bucket = self.buckets[index]
        known = bucket.nodes.get(node.id)
        if bucket.add_node(node):
            if known is None or (known.ip, known.port) != (node.ip, node.port):
                self._contacts = None
            return
        if bucket.has_in_range(self.node) or _depth(bucket) % 5 != 0:
            self.split_bucket(index)
            self.add_contact(node)
            return
        # A full bucket: ask its least recently seen contact whether it is
        # still there (an owned task), unless it was heard from lately.
        # kademlia pings it for every message from a node not in the table.
        head = _head(bucket)
        if self._last_heard(head) < time.monotonic() - ALIVE_FOR:
            self.protocol.spawn(self.protocol.call_ping(head))

    def remove_contact(self, node: Node) -> None:
        if node.id in self.buckets[self.get_bucket_for(node)].nodes:
            self._contacts = None
        super().remove_contact(node)


def _nearest(ids: list[int], target: int, count: int) -> Iterator[int]:
    """Indices of the `count` ids nearest to `target` by XOR distance, in no
    particular order, among `ids` (sorted, distinct), by a few binary
    searches rather than a pass over every id.

    The ids sharing a prefix are a slice of `ids`. Starting from all of
    them, split the slice at the first bit where its ids differ: the half
    that agrees with `target` on that bit is nearer than the other half. If
    it holds fewer ids than still wanted, all of it is taken and the search
    goes on in the other half; otherwise in it alone.
    """
    low, high = 0, len(ids)
    while high - low > count:
        bit = (ids[low] ^ ids[high - 1]).bit_length() - 1
        middle = bisect.bisect_left(ids, (ids[low] >> bit | 1) << bit, low, high)
        if target >> bit & 1:
            near, far = (middle, high), (low, middle)
        else:
            near, far = (low, middle), (middle, high)
        if near[1] - near[0] >= count:
            low, high = near
        else:
            yield from range(*near)
            count -= near[1] - near[0]
            low, high = far
    yield from range(low, high)


def _head(bucket: KBucket) -> Node:
    """A bucket's least recently seen contact (`KBucket.head` copies all)."""
    return next(iter(bucket.nodes.values()))


def _depth(bucket: KBucket) -> int:
    """Bits shared by all ids in a bucket (kademlia's `KBucket.depth`, in O(n))."""
    ids = [n.long_id for n in bucket.nodes.values()]
    return 160 - (min(ids) ^ max(ids)).bit_length() if ids else 160
