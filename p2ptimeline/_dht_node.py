"""`DhtNode`: kademlia's `Server`, reading and writing validated registry values."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import logging
import random
import socket
import time
from collections.abc import Iterable
from typing import Any, TypeVar

import attrs
from kademlia.crawling import NodeSpiderCrawl
from kademlia.network import Server
from kademlia.node import Node, NodeHeap
from kademlia.routing import KBucket

from ._dht_protocol import (
    ALIVE_FOR,
    RecordStorage,
    RegistryProtocol,
    StoreReply,
    decode_value,
)
from ._errors import DecodeError, InvalidRecord, RegistryUnavailable
from ._records import RegistryValue
from ._serializer import Serializer

__all__ = ["DhtNode", "Replica"]

log = logging.getLogger("p2ptimeline.dht")

T = TypeVar("T")

_RECEIVE_BUFFER = 4 * 1024 * 1024
_LOOKUP_TTL = 5.0  # seconds a write reuses the result of a node lookup


@attrs.frozen
class Replica:
    """One node's answer for a key."""

    node: Node | None
    """Who answered (None: this node's own storage)."""
    value: RegistryValue | None
    """The valid value it holds, if any."""
    close: bool
    """Whether the node is one of the `ksize` closest to the key, so should
    hold it (stale close replicas get repaired; others are left alone)."""


class _NodeHeap(NodeHeap):  # type: ignore[misc]  # untyped base class
    """kademlia's `NodeHeap` with O(1) membership (its own is a linear scan)."""

    def __init__(self, node: Node, maxsize: int) -> None:
        super().__init__(node, maxsize)
        self._ids: set[bytes] = set()

    def push(self, nodes: Node | list[Node]) -> None:
        target = self.node.long_id
        for node in nodes if isinstance(nodes, list) else [nodes]:
            if node.id not in self._ids:
                self._ids.add(node.id)
                heapq.heappush(self.heap, (node.long_id ^ target, node))

    def remove(self, peers: Iterable[bytes]) -> None:
        super().remove(peers)
        self._ids = {node.id for _, node in self.heap}

    def __contains__(self, node: Node) -> bool:
        return node.id in self._ids


async def settle(
    calls: list[asyncio.Task[T]], protocol: RegistryProtocol, first: int = 0
) -> list[T | None]:
    """The results of the calls that finish in time (None for the others).

    One dead node must not hold up a whole lookup or write until its call
    times out. So once most calls finished, and the `first` calls too, the
    others get a short grace (an eighth of the RPC timeout), and no call is
    waited for longer than half the RPC timeout, unless none has finished by
    then: the first answer is waited for as long as a call lasts (a call
    sends its request again halfway). Calls still running then go on in the
    background, owned by `protocol`, and still update its routing table when
    they end (a node whose call times out is then skipped for a while).
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + protocol.wait_timeout / 2
    pending = set(calls)
    needed = set(calls[:first])
    while pending and (
        len(calls) - len(pending) <= len(calls) // 2 or not needed.isdisjoint(pending)
    ):
        left = deadline - loop.time()
        if left <= 0 and len(pending) == len(calls):
            deadline = started + protocol.wait_timeout
            left = deadline - loop.time()
        if left <= 0:
            break
        _, pending = await asyncio.wait(
            pending, timeout=left, return_when=asyncio.FIRST_COMPLETED
        )
    left = min(protocol.wait_timeout / 8, deadline - loop.time())
    if pending and left > 0:
        _, pending = await asyncio.wait(pending, timeout=left)
    for call in pending:
        protocol.adopt(call)
    return [call.result() if call.done() else None for call in calls]


class _NodeCrawl(NodeSpiderCrawl):  # type: ignore[misc]  # untyped base class
    """kademlia's node lookup, on the faster heap, not waiting for stragglers
    unless `patient`."""

    def __init__(
        self,
        protocol: RegistryProtocol,
        node: Node,
        peers: list[Node],
        ksize: int,
        alpha: int,
        *,
        patient: bool = False,
    ) -> None:
        super().__init__(protocol, node, [], ksize, alpha)
        self.nearest = _NodeHeap(node, ksize)
        self.nearest.push(peers)
        self.patient = patient

    async def _settle(self, calls: list[asyncio.Task[T]]) -> list[T | None]:
        if self.patient:  # every call ends within the RPC timeout
            return list(await asyncio.gather(*calls))
        return await settle(calls, self.protocol)

    async def _find(self, rpcmethod: Any) -> Any:
        # As kademlia's `SpiderCrawl._find`, with `settle` instead of waiting
        # for every call, and without formatting a log line each round.
        count = self.alpha
        if self.nearest.get_ids() == self.last_ids_crawled:  # type: ignore[has-type]
            count = len(self.nearest)
        self.last_ids_crawled = self.nearest.get_ids()
        peers = self.nearest.get_uncontacted()[:count]
        for peer in peers:
            self.nearest.mark_contacted(peer)
        calls = [asyncio.ensure_future(rpcmethod(peer, self.node)) for peer in peers]
        results = await self._settle(calls)
        return await self._nodes_found(
            {
                peer.id: (False, None) if result is None else result
                for peer, result in zip(peers, results, strict=True)
            }
        )


class _ValueCrawl(_NodeCrawl):
    """Finds the replicas of a value among the nodes closest to its key.

    Unlike kademlia's `ValueSpiderCrawl`, which returns the first value it
    meets, it asks, all at once, the `quorum` closest nodes it knows that it
    has not asked yet, merges the closer nodes they name, and repeats until
    the `quorum` closest it knows have all answered. If none of them holds
    the value, it goes on to the `ksize` closest before concluding that
    nobody does: nodes that joined after a value was stored can be the
    closest to its key without holding it. It returns every answer: the
    caller picks the newest (and repairs the closest replicas).
    """

    protocol: RegistryProtocol

    def __init__(
        self,
        protocol: RegistryProtocol,
        node: Node,
        peers: list[Node],
        ksize: int,
        quorum: int,
    ) -> None:
        super().__init__(protocol, node, peers, ksize, alpha=quorum)
        self.quorum = quorum
        self.answers: dict[bytes, tuple[Node, bytes | None]] = {}
        self.failed: list[Node] = []  # asked, and did not answer

    async def find(self) -> dict[bytes, tuple[Node, bytes | None]]:
        asked: set[bytes] = set()
        while True:
            closest = list(self.nearest)[: self.quorum]
            ask = [n for n in closest if n.id not in asked]
            if not ask:
                found = any(value for _, value in self.answers.values())
                if found or self.quorum >= self.ksize:
                    return self.answers
                self.quorum = self.ksize  # absent from the closest: look wider
                continue
            asked.update(n.id for n in ask)
            calls = [
                asyncio.ensure_future(self.protocol.call_find_value(n, self.node))
                for n in ask
            ]
            responses = await self._settle(calls)
            failed = []
            for node, response in zip(ask, responses, strict=True):
                if response is None or not response[0] or response[1] is None:
                    failed.append(node)
                    continue
                value, nodes = response[1]
                self.answers[node.id] = (node, value)
                self.nearest.push([Node(*n) for n in nodes])
            self.failed.extend(failed)
            self.nearest.remove([node.id for node in failed])

    def closest_ids(self) -> set[bytes]:
        """Ids of the `ksize` closest nodes that answered or were never asked."""
        return {node.id for node in self.nearest}


def _random_id(bucket: KBucket) -> bytes:
    """A random node id in `bucket`'s range."""
    return random.randint(*bucket.range).to_bytes(20, "big")


class DhtNode(Server):  # type: ignore[misc]  # untyped base class
    """kademlia's `Server` with the registry's protocol and storage.

    It adds typed reads and writes of `RegistryValue`s: a read collects the
    answers of the closest nodes (validated, invalid ones dropped), a write
    stores on the `ksize` closest nodes and reports each one's outcome.
    """

    protocol: RegistryProtocol
    storage: RecordStorage

    def __init__(
        self,
        *,
        ksize: int,
        alpha: int,
        serializer: Serializer,
        storage: RecordStorage,
        rpc_timeout: float,
        read_quorum: int,
        node_id: bytes | None = None,
    ) -> None:
        super().__init__(ksize=ksize, alpha=alpha, node_id=node_id)
        self.read_quorum = read_quorum
        """How many of the closest nodes a read asks: a write waits for them."""
        self.storage = storage  # not via __init__: it tests `storage or ...`
        self.serializer = serializer
        self.rpc_timeout = rpc_timeout
        self.bootstrap_addresses: list[tuple[str, int]] = []
        """Where to (re)join the network when no other node is known."""
        # key -> (when, closest nodes): writes to one key in a burst (a big
        # follow set filling up) share one lookup.
        self._lookups: collections.OrderedDict[bytes, tuple[float, list[Node]]] = (
            collections.OrderedDict()
        )

    def _create_protocol(self) -> RegistryProtocol:
        return RegistryProtocol(
            self.node, self.storage, self.ksize, wait_timeout=self.rpc_timeout
        )

    async def listen(self, port: int, interface: str = "0.0.0.0") -> None:
        # As kademlia's, but logging once bound, not before.
        loop = asyncio.get_running_loop()
        self.transport, self.protocol = await loop.create_datagram_endpoint(
            self._create_protocol, local_addr=(interface, port)
        )
        log.info("DHT node listening on %s", self.transport.get_extra_info("sockname"))
        # A node answers bursts of requests; the default receive buffer
        # (~200 KB) drops datagrams under load. The kernel caps this at
        # net.core.rmem_max.
        sock = self.transport.get_extra_info("socket")
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RECEIVE_BUFFER)

    def refresh_table(self, interval: float = 3600) -> None:
        # kademlia schedules this with call_later and an unowned task; the
        # registry calls `_refresh_table` from its own maintenance task.
        pass

    async def bootstrap(self, addrs: list[tuple[str, int]]) -> list[Node]:
        # As kademlia's, but with our crawl, which does not wait out dead
        # nodes, and ending as the paper's join does (section 2.3), which
        # kademlia 2.2.3 skips: a lookup in every bucket farther than the
        # closest neighbour. Without it, a newcomer meets only the nodes near
        # its own id, and nodes that joined before it may never learn of it:
        # a lookup from their side of the id space then ends among nodes
        # that know no one closer, and misses the replicas of a value.
        gathered = await asyncio.gather(*(self.bootstrap_node(a) for a in addrs))
        nodes = [node for node in gathered if node is not None]
        crawl = _NodeCrawl(self.protocol, self.node, nodes, self.ksize, self.alpha)
        found: list[Node] = await crawl.find()
        buckets = self.protocol.router.buckets
        await self._look_up(
            _random_id(b) for b in buckets if not b.has_in_range(self.node)
        )
        return found

    async def bootstrap_node(self, addr: tuple[str, int]) -> Node | None:
        answered, node_id = await self.protocol.call(
            addr, "ping", self.node.id, force=True
        )
        if answered and isinstance(node_id, bytes) and len(node_id) == 20:
            return Node(node_id, addr[0], addr[1])
        return None

    async def _look_up(self, ids: Iterable[bytes]) -> None:
        """Node lookups of `ids`, all at once: meets the nodes near each."""
        crawls = []
        for node_id in ids:
            target = Node(node_id)
            nearest = self.protocol.router.find_neighbors(target, self.alpha)
            crawl = _NodeCrawl(self.protocol, target, nearest, self.ksize, self.alpha)
            crawls.append(crawl.find())
        await asyncio.gather(*crawls)

    async def _refresh_table(self) -> None:
        await self._look_up(self.protocol.get_refresh_ids())
        # Republish what has not been written for an hour (paper, section 2.5).
        for key, raw in self.storage.iter_older_than(3600):
            if self.has_neighbors():
                await self._store_everywhere(key, raw)

    async def check_contacts(self) -> None:
        """Ping the contact silent the longest, among the least recently seen
        of each bucket, if it has not been heard from for `ALIVE_FOR` seconds.

        A contact that does not answer is dropped (kademlia removes a node
        only when a call of this node to it fails, and a bootstrap node
        rarely calls anyone), so nodes that left stop being handed to
        newcomers. One ping per check: a thousand nodes in one process
        pinging a head per bucket spent a quarter of their CPU on it.
        """
        node = self.protocol.router.most_silent_head(ALIVE_FOR)
        if node is not None:
            await self.protocol.call_ping(node)

    async def ensure_joined(self) -> None:
        """Join through the bootstrap nodes if no other node is known.

        Raises:
            RegistryUnavailable: No other node is known, even after trying.
        """
        if not self.has_neighbors() and self.bootstrap_addresses:
            await self.bootstrap(self.bootstrap_addresses)
        if not self.has_neighbors():
            raise RegistryUnavailable("no DHT node is reachable")

    def has_neighbors(self) -> bool:
        """Whether the routing table holds any node."""
        return any(len(bucket) for bucket in self.protocol.router.buckets)

    async def read(self, key: bytes, quorum: int) -> list[Replica]:
        """Every valid answer for `key`, from the closest nodes and from here.

        The lookup ends once the `quorum` closest nodes it knows answered
        (the `ksize` closest, if none of those holds a value).

        Raises:
            RegistryUnavailable: No other node is known, or none answered.
        """
        await self.ensure_joined()
        target = Node(key)
        nearest = self.protocol.router.find_neighbors(target)
        started = time.monotonic()
        crawl = _ValueCrawl(self.protocol, target, nearest, self.ksize, quorum)
        answers = await crawl.find()
        if not any(raw for _, raw in answers.values()) and self.protocol.forgive(
            crawl.failed, marked_before=started
        ):
            # Nodes skipped as unreachable may only have been slow once (on
            # an overloaded host): ask them again before calling it absent.
            # (Not those that failed during this read: they were asked.)
            crawl = _ValueCrawl(self.protocol, target, nearest, self.ksize, quorum)
            answers = await crawl.find()
        if not answers:
            # Silence is not absence: without a single answer, nothing is known.
            raise RegistryUnavailable("no DHT node answered the read")
        close = crawl.closest_ids()
        decoded: dict[bytes, RegistryValue | None] = {}  # replicas mostly agree
        replicas = [
            Replica(
                None,
                self._decode(key, self.storage.get(key), decoded),
                self._is_close(target, list(crawl.nearest)),
            )
        ]
        for node, raw in answers.values():
            value = self._decode(key, raw, decoded)
            replicas.append(Replica(node, value, node.id in close))
        return replicas

    def _decode(
        self, key: bytes, raw: bytes | None, cache: dict[bytes, RegistryValue | None]
    ) -> RegistryValue | None:
        if raw is None:
            return None
        if raw not in cache:
            try:
                cache[raw] = decode_value(self.serializer, key, raw)
            except (DecodeError, InvalidRecord) as exc:
                log.info("ignored an invalid value for %s: %s", key.hex()[:12], exc)
                cache[raw] = None
        return cache[raw]

    def _is_close(self, target: Node, nearest: list[Node]) -> bool:
        """Whether this node is among the `ksize` closest to `target`."""
        if len(nearest) < self.ksize:
            return True
        mine = target.long_id ^ self.node.long_id
        return bool(mine < max(target.long_id ^ n.long_id for n in nearest))

    async def write(
        self, key: bytes, value: RegistryValue, *, patient: bool = False
    ) -> list[tuple[Node | None, StoreReply | None]]:
        """Store `value` on the nodes closest to `key` (and here, if close).

        Returns each node's reply (None: no answer; node None: this node).
        Slow nodes are not waited for (see `settle`) unless `patient`: then
        every node's reply, or its timeout, is awaited, for writes whose
        outcome depends on every reply (a claim must hear the nodes that
        hold a taken name).

        Raises:
            RegistryUnavailable: No other node is known, or none answered.
        """
        await self.ensure_joined()
        raw = self.serializer.encode(value)
        replies = await self._store_everywhere(key, raw, patient=patient)
        if not any(reply for node, reply in replies if node is not None):
            raise RegistryUnavailable("no DHT node answered the write")
        return replies

    async def _store_everywhere(
        self, key: bytes, raw: bytes, *, patient: bool = False
    ) -> list[tuple[Node | None, StoreReply | None]]:
        target = Node(key)
        nodes = await self._closest_nodes(target, patient=patient)
        replies: list[tuple[Node | None, StoreReply | None]] = []
        if self._is_close(target, nodes):
            replies.append((None, self.storage.offer(key, raw)))
        calls = [
            asyncio.ensure_future(self.protocol.call_store(n, key, raw)) for n in nodes
        ]
        answers: list[StoreReply | None]
        if patient:
            answers = list(await asyncio.gather(*calls))
        else:
            # The closest nodes first (a read asks those): wait for them.
            settled = await settle(calls, self.protocol, first=self.read_quorum)
            answers = settled
        replies.extend(zip(nodes, answers, strict=True))
        if None in answers:  # someone left: look again next time
            self._lookups.pop(key, None)
        return replies

    async def _closest_nodes(self, target: Node, *, patient: bool) -> list[Node]:
        cached = self._lookups.get(target.id)
        if cached is not None and time.monotonic() - cached[0] < _LOOKUP_TTL:
            return cached[1]
        nearest = self.protocol.router.find_neighbors(target)
        spider = _NodeCrawl(
            self.protocol, target, nearest, self.ksize, self.alpha, patient=patient
        )
        nodes: list[Node] = await spider.find()
        self._lookups[target.id] = (time.monotonic(), nodes)
        self._lookups.move_to_end(target.id)
        while len(self._lookups) > 1024:
            self._lookups.popitem(last=False)
        return nodes

    def repair(
        self, key: bytes, value: RegistryValue, replicas: list[Node | None]
    ) -> None:
        """Write `value` back to stale replicas (read repair), in the background."""
        raw = self.serializer.encode(value)
        for node in replicas:
            if node is None:
                self.storage.offer(key, raw)
            else:
                self.protocol.spawn(self.protocol.call_store(node, key, raw))

    def repair_if_stale(
        self, key: bytes, best: RegistryValue, replicas: list[Replica]
    ) -> None:
        """Repair the close replicas that do not hold exactly `best`."""
        stale = [r.node for r in replicas if r.close and r.value != best]
        if stale:
            self.repair(key, best, stale)

    async def close(self) -> None:
        """Close the socket and stop the node's tasks. Idempotent."""
        if self.protocol is not None:
            await self.protocol.close()
        self.stop()
