"""`DhtNode`: kademlia's `Server`, reading and writing validated registry values."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import attrs
from kademlia.network import Server
from kademlia.node import Node
from kademlia.routing import KBucket

from .._errors import RegistryUnavailable
from .._serializer import Serializer
from .lookup import Lookup, LookupResult
from .protocol import RegistryProtocol
from .records import RegistryValue
from .routing import ALIVE_FOR
from .storage import RecordStorage, StoreResult
from .wire import StoreReply

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
    """Whether the node is one of the `ksize` closest to the key found by the
    lookup, so should hold it: only those count in a vote, and stale ones
    get repaired; others are left alone."""
    distance: int
    """XOR distance of the node from the key."""


async def settle(
    calls: Sequence[asyncio.Future[T]], protocol: RegistryProtocol, first: int = 0
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


def _random_id(bucket: KBucket) -> bytes:
    """A random node id in `bucket`'s range."""
    return random.randint(*bucket.range).to_bytes(20, "big")


class DhtNode(Server):  # type: ignore[misc]  # untyped base class
    """kademlia's `Server` with the registry's protocol, storage and lookups.

    It adds typed reads and writes of `RegistryValue`s: a read collects the
    answers of the closest nodes (validated, invalid ones dropped), a write
    stores on the `ksize` closest nodes and reports each one's reply.
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
        lookup_timeout: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(ksize=ksize, alpha=alpha, node_id=node_id)
        self.read_quorum = read_quorum
        """How many of the closest nodes a read asks: a write waits for them."""
        self.storage = storage  # not via __init__: it tests `storage or ...`
        self.serializer = serializer
        self.rpc_timeout = rpc_timeout
        self.lookup_timeout = lookup_timeout or 4 * rpc_timeout
        """Seconds after which a lookup returns what it found."""
        self.clock = clock
        self.bootstrap_addresses: list[tuple[str, int]] = []
        """Where to (re)join the network when no other node is known."""
        # key -> (when, closest nodes): writes to one key in a burst (a big
        # follow set filling up) share one lookup.
        self._lookups: collections.OrderedDict[bytes, tuple[float, LookupResult]] = (
            collections.OrderedDict()
        )

    def _create_protocol(self) -> RegistryProtocol:
        return RegistryProtocol(
            self.node,
            self.storage,
            self.ksize,
            wait_timeout=self.rpc_timeout,
            clock=self.clock,
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
        # registry calls `refresh` from its own maintenance task.
        pass

    async def bootstrap(self, addrs: list[tuple[str, int]]) -> list[Node]:
        # As kademlia's, but with our lookup, and ending as the paper's join
        # does (section 2.3), which kademlia 2.2.3 skips: a lookup in every
        # bucket farther than the closest neighbour. Without it, a newcomer
        # meets only the nodes near its own id, and nodes that joined before
        # it may never learn of it: a lookup from their side of the id space
        # then ends among nodes that know no one closer, and misses the
        # replicas of a value.
        await self.contact(addrs)
        return await self.join()

    async def contact(self, addrs: Iterable[tuple[str, int]]) -> None:
        """Ping the nodes at `addrs`; those that answer become contacts."""
        await asyncio.gather(*(self.bootstrap_node(a) for a in addrs))

    async def join(self) -> list[Node]:
        """The lookups that make this node known (see `bootstrap`): of its
        own id, then of an id in every bucket farther than its closest
        neighbour. The nodes closest to this one."""
        found = (await self._lookup(self.node.id)).closest
        buckets = self.protocol.router.buckets
        await self.look_up(
            _random_id(b) for b in buckets if not b.has_in_range(self.node)
        )
        return found

    async def greet(self, addrs: Iterable[tuple[str, int]]) -> None:
        """Make sure the nodes at `addrs` know this one: ping each (which
        gives a token), then ask it for the nodes closest to this node's
        id, a request that proves this node's address, so that the node
        asked pings back and takes it in."""

        async def one(addr: tuple[str, int]) -> None:
            node_id = await self.protocol.ping_address(addr)
            if node_id is not None:
                await self.protocol.call_find(
                    Node(node_id, addr[0], addr[1]), self.node.id, value=False
                )

        await asyncio.gather(*(one(addr) for addr in addrs))

    async def bootstrap_node(self, addr: tuple[str, int]) -> Node | None:
        node_id = await self.protocol.ping_address(addr)
        return None if node_id is None else Node(node_id, addr[0], addr[1])

    async def look_up(self, ids: Iterable[bytes]) -> None:
        """Node lookups of `ids`, all at once: meets the nodes near each."""
        await asyncio.gather(*(self._lookup(node_id) for node_id in ids))

    def _new_lookup(self, key: bytes, **options: Any) -> Lookup:
        alpha = options.pop("alpha", self.alpha)
        seeds = self.protocol.router.find_neighbors(Node(key), k=self.ksize)
        return Lookup(
            self.protocol,
            key,
            seeds,
            ksize=self.ksize,
            alpha=alpha,
            timeout=self.lookup_timeout,
            **options,
        )

    async def _lookup(self, key: bytes, *, patient: bool = False) -> LookupResult:
        return await self._new_lookup(key, patient=patient).run()

    async def refresh(self) -> None:
        """Look up a random id in every bucket not looked into for an hour,
        and republish the values not written for an hour (paper, sections
        2.3 and 2.5)."""
        await self.look_up(self.protocol.get_refresh_ids())
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
            hint = "" if self.bootstrap_addresses else " (no bootstrap node was given)"
            raise RegistryUnavailable(f"no DHT node is reachable{hint}")

    def has_neighbors(self) -> bool:
        """Whether the routing table holds any node."""
        return any(len(bucket) for bucket in self.protocol.router.buckets)

    async def read(
        self, key: bytes, quorum: int, *, patient: bool = False
    ) -> list[Replica]:
        """Every valid answer for `key`, from the closest nodes and from here,
        closest first.

        The lookup ends once the `quorum` closest nodes it knows answered
        (the `ksize` closest, if none of those holds a value). With
        `patient`, a node that is slow to answer is waited for until its
        request times out, rather than passed over for the next closest.

        Raises:
            RegistryUnavailable: No other node is known, or none answered.
        """
        await self.ensure_joined()
        started = time.monotonic()
        options = {
            "values": True,
            "quorum": quorum,
            "alpha": quorum,
            "patient": patient,
        }
        found = await self._new_lookup(key, **options).run()
        if not any(r.value for _, r in found.answers) and (
            self.protocol.forgive(found.failed, marked_before=started)
            or found.passed_silent
        ):
            # Nodes skipped as unreachable, or passed over while another
            # lookup waited on them, may only be slow (on an overloaded
            # host): ask them again, and wait for them, before calling it
            # absent. (Not those that failed during this read: they were.)
            found = await self._new_lookup(key, **options, pass_silent=False).run()
        if not found.answers:
            # Silence is not absence: without a single answer, nothing is known.
            raise RegistryUnavailable("no DHT node answered the read")
        close = {node.id for node in found.closest}
        target = int.from_bytes(key)
        replicas = [
            Replica(node, reply.value, node.id in close, node.long_id ^ target)
            for node, reply in found.answers
        ]
        mine = self.node.long_id ^ target
        replicas.append(
            Replica(None, self.storage.value(key), self._is_close(key, found), mine)
        )
        replicas.sort(key=lambda r: r.distance)
        return replicas

    def keep_if_close(self, key: bytes, value: RegistryValue) -> None:
        """Offer `value` to this node's own storage if the last lookup of
        `key` found this node among the `ksize` closest to it."""
        cached = self._lookups.get(key)
        if cached is None or self._is_close(key, cached[1]):
            self.storage.offer_value(key, value)

    def _is_close(self, key: bytes, found: LookupResult) -> bool:
        """Whether this node is among the `ksize` closest to `key`."""
        if len(found.closest) < self.ksize:
            return True
        target = int.from_bytes(key)
        farthest = max(n.long_id ^ target for n in found.closest)
        return bool(self.node.long_id ^ target < farthest)

    async def write(
        self,
        key: bytes,
        value: RegistryValue,
        *,
        patient: bool = False,
        local: bool = True,
    ) -> list[tuple[Node | None, StoreReply | None]]:
        """Store `value` on the nodes closest to `key` (and here, if close).

        Returns each node's reply (None: no usable answer; node None: this
        node's own storage). Slow nodes are not waited for (see
        `settle`) unless `patient`: then every node's reply, or its timeout,
        is awaited, for writes whose outcome depends on every reply (a claim
        must hear the nodes that hold a taken name). Unless `local`, this
        node's own storage is left alone (a claimer keeps its claim out of
        it until it won: its own copy must not vote for it).

        Raises:
            RegistryUnavailable: No other node is known, or none answered.
        """
        await self.ensure_joined()
        raw = self.serializer.encode(value)
        replies = await self._store_everywhere(key, raw, patient=patient, local=local)
        if not any(reply for node, reply in replies if node is not None):
            raise RegistryUnavailable("no DHT node answered the write")
        return replies

    async def _store_everywhere(
        self, key: bytes, raw: bytes, *, patient: bool = False, local: bool = True
    ) -> list[tuple[Node | None, StoreReply | None]]:
        found = await self._closest_nodes(key, patient=patient)
        nodes = found.closest
        replies: list[tuple[Node | None, StoreReply | None]] = []
        if local and self._is_close(key, found):
            replies.append((None, self._local_reply(key, self.storage.offer(key, raw))))
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

    def _local_reply(self, key: bytes, result: StoreResult) -> StoreReply:
        """This node's own storage outcome, as a reply like any other's."""
        held = None
        if result.held is not None:
            held = self.serializer.decode(result.held, RegistryValue)
        return StoreReply(
            responder=self.node.id,
            token=b"",
            outcome=result.outcome,
            held=held,
            refused=result.refused,
            withheld=False,
        )

    async def _closest_nodes(self, key: bytes, *, patient: bool) -> LookupResult:
        cached = self._lookups.get(key)
        if cached is not None and time.monotonic() - cached[0] < _LOOKUP_TTL:
            return cached[1]
        found = await self._lookup(key, patient=patient)
        self._lookups[key] = (time.monotonic(), found)
        self._lookups.move_to_end(key)
        while len(self._lookups) > 1024:
            self._lookups.popitem(last=False)
        return found

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
        try:
            if self.protocol is not None:
                await self.protocol.close()
        finally:
            self.stop()
