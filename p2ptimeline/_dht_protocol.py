"""The UDP side of the registry: `kademlia`'s protocol, storage and routing, hardened.

`RegistryProtocol` extends `kademlia.protocol.KademliaProtocol` (itself an
`rpcudp.RPCProtocol`). It keeps the wire format (a kind byte, a 20-byte
message id, msgpack of ``[name, args]``) and the four Kademlia RPCs, and
changes what is unsafe or wrong for a registry:

* Messages are packed with the `msgpack` C library (the same bytes rpcudp's
  pure-Python `umsgpack` writes, at a twentieth of the cost).
* Datagrams are handled synchronously and defensively: anything that does
  not parse, names an unknown RPC or carries arguments of the wrong shape is
  dropped with a log line (rpcudp raises inside a task for some of these).
* ``store`` goes through `RecordStorage`, which validates and merges
  (`p2ptimeline._records`) and answers with an outcome, not just ``True``.
* ``find_value`` answers with the value *and* the closest nodes, so a reader
  can keep looking for newer replicas.
* Answers from remote nodes are validated before use: a malformed node list
  or value is treated like no answer.
* Known `kademlia` 2.2.3 bugs are worked around (see `docs/architecture.md`):
  `find_neighbors` returning nodes that are not the closest, `welcome_if_new`
  hashing an already hashed key, background tasks nobody owns.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import functools
import ipaddress
import logging
import os
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator
from typing import Any

import msgpack
from kademlia.node import Node
from kademlia.protocol import KademliaProtocol
from kademlia.routing import KBucket, RoutingTable
from kademlia.storage import IStorage
from rpcudp.protocol import RPCProtocol

from ._errors import DecodeError, InvalidRecord
from ._records import MAX_VALUE_SIZE, Outcome, RegistryValue, check_value, merge
from ._serializer import Serializer

__all__ = [
    "ALIVE_FOR",
    "MAX_DATAGRAM",
    "RecordStorage",
    "RegistryProtocol",
    "StoreReply",
]

log = logging.getLogger("p2ptimeline.dht")

UNREACHABLE_FOR = 15.0
"""Seconds a node that did not answer (twice) is treated as gone."""
ALIVE_FOR = 60.0
"""Seconds after a contact was last heard from that it is taken to be
there without asking (a ping)."""
MAX_DATAGRAM = 8192 + 64
"""Largest datagram read; rpcudp itself refuses to send requests over 8 KB."""
_REQUEST, _RESPONSE = b"\x00", b"\x01"
_ID_SIZE = 20

StoreReply = tuple[Outcome, Any]
"""A storage node's answer to ``store``: the outcome and a detail (for a
shard, the indices of refused entries; for a stale record, the held seq)."""
NodeTriple = tuple[bytes, str, int]


class RecordStorage(IStorage):  # type: ignore[misc]  # untyped base class
    """`kademlia` storage that only keeps valid registry values.

    Every write goes through `offer`: the value is decoded, checked against
    its key (`check_value`) and merged with what is held (`merge`). The
    storage holds at most `max_keys` keys, evicting the least recently
    written ones first.

    Args:
        serializer: Decodes the values.
        capacity: Entries per set shard (`shard_capacity`).
        max_keys: Most keys held at once.
    """

    def __init__(
        self, serializer: Serializer, capacity: int, *, max_keys: int = 100_000
    ) -> None:
        self._serializer = serializer
        self._capacity = capacity
        self._max_keys = max_keys
        # key -> (monotonic time of last change, encoded value, decoded value)
        self._data: collections.OrderedDict[
            bytes, tuple[float, bytes, RegistryValue]
        ] = collections.OrderedDict()

    def offer(self, key: bytes, raw: bytes) -> StoreReply:
        """Validate `raw` and merge it into what is held under `key`."""
        try:
            value = decode_value(self._serializer, key, raw)
        except (DecodeError, InvalidRecord) as exc:
            log.info("refused a value for %s: %s", key.hex()[:12], exc)
            return Outcome.INVALID, str(exc)
        return self.offer_value(key, value, raw)

    def offer_value(
        self, key: bytes, value: RegistryValue, raw: bytes | None = None
    ) -> StoreReply:
        """Merge an already validated `value` (encoded as `raw`) under `key`."""
        held = self._data.get(key)
        kept, outcome, refused = merge(
            held[2] if held else None, value, capacity=self._capacity
        )
        if held is None or kept != held[2]:
            if kept is not value or raw is None:
                raw = self._serializer.encode(kept)
            self._keep(key, raw, kept)
        elif kept == value:
            # Stored again as is (a replica republishing): as fresh as new, so
            # this node need not republish it within the hour (paper, 2.5).
            self._keep(key, held[1], kept)
        if outcome is Outcome.STALE:
            assert held is not None
            record = held[2].claim or held[2].presence
            return outcome, record.seq if record else None
        return outcome, refused

    def _keep(self, key: bytes, raw: bytes, value: RegistryValue) -> None:
        self._data[key] = (time.monotonic(), raw, value)
        self._data.move_to_end(key)
        while len(self._data) > self._max_keys:
            self._data.popitem(last=False)

    def value(self, key: bytes) -> RegistryValue | None:
        """The decoded value held under `key`, if any."""
        held = self._data.get(key)
        return held[2] if held else None

    # The IStorage interface, used by kademlia's Server and by RPCs.

    def __setitem__(self, key: bytes, value: bytes) -> None:
        self.offer(key, value)

    def __getitem__(self, key: bytes) -> bytes:
        return self._data[key][1]

    def get(self, key: bytes, default: bytes | None = None) -> bytes | None:
        held = self._data.get(key)
        return held[1] if held else default

    def iter_older_than(self, seconds_old: float) -> list[tuple[bytes, bytes]]:
        cutoff = time.monotonic() - seconds_old
        return [(k, raw) for k, (at, raw, _) in self._data.items() if at <= cutoff]

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        return iter([(k, raw) for k, (_, raw, _) in self._data.items()])

    def __len__(self) -> int:
        return len(self._data)


def decode_value(serializer: Serializer, key: bytes, raw: bytes) -> RegistryValue:
    """Decode and check a value read from or written to `key`.

    Raises:
        DecodeError: It is not a registry value.
        InvalidRecord: It is too large, forged, or not `key`'s.
    """
    if len(raw) > MAX_VALUE_SIZE:
        raise InvalidRecord(f"value of {len(raw)} bytes is too large")
    value = serializer.decode(raw, RegistryValue)
    check_value(key, value)
    return value


class _RoutingTable(RoutingTable):  # type: ignore[misc]  # untyped base class
    """`kademlia`'s routing table with its lookup and task handling fixed."""

    protocol: RegistryProtocol

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


class RegistryProtocol(KademliaProtocol):  # type: ignore[misc]  # untyped base
    """The hardened Kademlia protocol of a registry node."""

    storage: RecordStorage
    transport: asyncio.DatagramTransport | None

    def __init__(
        self,
        source_node: Node,
        storage: RecordStorage,
        ksize: int,
        *,
        wait_timeout: float,
    ) -> None:
        RPCProtocol.__init__(self, wait_timeout=wait_timeout)
        self.router = _RoutingTable(self, ksize, source_node)
        self.storage = storage
        self.source_node = source_node
        self._tasks: set[asyncio.Future[Any]] = set()
        self._closed: asyncio.Future[None] = asyncio.Future()
        # address -> when it last failed to answer. Lookups skip such nodes
        # for a while instead of waiting for them again and again: other
        # nodes keep naming a dead node until their own requests to it fail.
        self._unreachable: dict[tuple[str, int], float] = {}
        self._welcomed: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._handlers: dict[str, Callable[..., Any]] = {
            "ping": self.rpc_ping,
            "store": self.rpc_store,
            "find_node": self.rpc_find_node,
            "find_value": self.rpc_find_value,
        }

    # Lifecycle

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run `coro` in a task this protocol owns (cancelled by `close`)."""
        self.adopt(asyncio.ensure_future(coro))

    @property
    def wait_timeout(self) -> float:
        """Seconds a call waits for its answer."""
        return float(self._wait_timeout)

    def adopt(self, task: asyncio.Future[Any]) -> None:
        """Own a running task: `close` cancels it."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Close the socket, cancel owned tasks and fail pending calls."""
        if self.transport is not None:
            self.transport.close()
            # The socket closes on the next loop iteration: wait for it, so
            # the port is free once close() returns.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._closed
        for future, timeout in list(self._outstanding.values()):
            timeout.cancel()
            if not future.done():
                future.set_result((False, None))
        self._outstanding.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._closed = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self._closed.done():
            self._closed.set_result(None)

    # Incoming datagrams

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if not _ID_SIZE + 2 <= len(data) <= MAX_DATAGRAM:
            log.info("dropped a datagram of %d bytes from %s", len(data), addr)
            return
        kind, msg_id = data[:1], data[1 : _ID_SIZE + 1]
        try:
            message = _unpack(data[_ID_SIZE + 1 :])
        except Exception as exc:  # anything msgpack raises on garbage
            log.info("dropped an undecodable datagram from %s: %r", addr, exc)
            return
        if kind == _REQUEST:
            self._answer(msg_id, message, addr)
        elif kind == _RESPONSE:
            self._accept_response(msg_id, message, addr)
        else:
            log.info("dropped a datagram of unknown kind from %s", addr)

    def _answer(self, msg_id: bytes, message: Any, addr: tuple[str, int]) -> None:
        if (
            not isinstance(message, list)
            or len(message) != 2
            or not isinstance(message[0], str)
            or not isinstance(message[1], list)
        ):
            log.info("dropped a malformed request from %s", addr)
            return
        name, args = message
        handler = self._handlers.get(name)
        if handler is None:
            log.info("dropped a request for unknown RPC %.40r from %s", name, addr)
            return
        try:
            response = handler(addr, *args)
        except (TypeError, ValueError) as exc:
            log.info("dropped a bad %s request from %s: %s", name, addr, exc)
            return
        if self.transport is not None:
            self.transport.sendto(_RESPONSE + msg_id + _pack(response), addr)

    def _accept_response(self, msg_id: bytes, data: Any, address: Any) -> None:
        pending = self._outstanding.pop(msg_id, None)
        if pending is None:
            log.debug("dropped an unexpected response from %s", address)
            return
        future, timeout = pending
        timeout.cancel()
        if not future.done():
            future.set_result((True, data))

    def _timeout(self, msg_id: bytes) -> None:
        pending = self._outstanding.pop(msg_id, None)
        if pending is not None and not pending[0].done():
            pending[0].set_result((False, None))

    # RPC handlers. Arguments come from the network: check them first.

    def _source(self, sender: tuple[str, int], nodeid: object) -> Node:
        source = Node(_node_id(nodeid), sender[0], sender[1])
        self._unreachable.pop(sender, None)  # it is back
        self.welcome_if_new(source)
        return source

    def rpc_ping(self, sender: tuple[str, int], nodeid: object) -> bytes:
        self._source(sender, nodeid)
        return bytes(self.source_node.id)

    def rpc_store(
        self, sender: tuple[str, int], nodeid: object, key: object, value: object
    ) -> list[Any]:
        self._source(sender, nodeid)
        if not isinstance(value, bytes):
            raise TypeError("value must be bytes")
        outcome, detail = self.storage.offer(_node_id(key), value)
        return [outcome.value, detail if outcome is not Outcome.INVALID else None]

    def rpc_find_node(
        self, sender: tuple[str, int], nodeid: object, key: object
    ) -> list[NodeTriple]:
        source = self._source(sender, nodeid)
        neighbors = self.router.find_neighbors(Node(_node_id(key)), exclude=source)
        return [tuple(n) for n in neighbors]

    def rpc_find_value(
        self, sender: tuple[str, int], nodeid: object, key: object
    ) -> dict[str, Any] | list[NodeTriple]:
        nodes = self.rpc_find_node(sender, nodeid, key)
        value = self.storage.get(_node_id(key))
        if value is None:
            return nodes
        return {"value": value, "nodes": nodes}

    def welcome_if_new(self, node: Node) -> None:
        """Add a node we just heard from; hand it the values it should hold.

        As in kademlia (section 2.5 of the paper: a node hands over a value
        when the newcomer is among the k closest to its key and it is the
        closest itself), but hashing each key once, not twice; checking the
        cheap condition first (is any contact closer than this node?) so
        that a newcomer costs a scan, not a sort, per stored key; welcoming
        a node once even while its bucket is full; and again when it comes
        back at another address, restarted and maybe with nothing stored.
        """
        restarted = self.router.heard_from(node)  # with an empty storage, maybe
        if not restarted and not self.router.is_new_node(node):
            return
        if restarted or node.id not in self._welcomed:
            self._welcomed[node.id] = None
            if len(self._welcomed) > 10_000:
                self._welcomed.popitem(last=False)
            for key, value in self.storage:
                if self._should_hand_over(node, key):
                    self.spawn(self.call_store(node, key, value))
        self.router.add_contact(node)

    def _should_hand_over(self, newcomer: Node, key: bytes) -> bool:
        # The newcomer itself is among the contacts when it came back (at
        # the address it is excluded by).
        nearest = self.router.find_neighbors(Node(key), exclude=newcomer)
        target = int.from_bytes(key)
        if nearest and nearest[0].long_id ^ target < self.source_node.long_id ^ target:
            return False  # a closer contact hands it over, if anyone does
        if len(nearest) < self.router.ksize:
            return True
        return bool(newcomer.long_id ^ target < nearest[-1].long_id ^ target)

    # Outgoing calls. Each returns None when the node did not answer or
    # answered garbage, and keeps the routing table up to date.

    async def call(
        self, address: tuple[str, int], name: str, *args: Any, force: bool = False
    ) -> Any:
        """Call `name` on `address`; returns ``(answered, result)``.

        UDP loses datagrams: a request not answered within half the RPC
        timeout is sent once more, under the same id, and the first answer to
        either copy counts, so one lost datagram does not fail the call and a
        slow node still has the whole timeout. A node whose last call failed
        is not asked again for `UNREACHABLE_FOR` seconds (the call fails at
        once), unless `force` is set or every contact is in that state.
        """
        if self.transport is None:
            return (False, None)
        if not force and self._recently_unreachable(address):
            return (False, None)
        payload = _pack([name, list(args)])
        if len(payload) > 8192:
            raise ValueError(f"{name} request of {len(payload)} bytes is too large")
        msg_id = os.urandom(_ID_SIZE)
        datagram = _REQUEST + msg_id + payload
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[bool, Any]] = loop.create_future()
        timeout = loop.call_later(self._wait_timeout, self._timeout, msg_id)
        resend = loop.call_later(
            self._wait_timeout / 2, self._resend, msg_id, datagram, address
        )
        self._outstanding[msg_id] = (future, timeout)
        self.transport.sendto(datagram, address)
        try:
            result = await future
        finally:
            resend.cancel()
            if not future.done():  # cancelled while waiting
                timeout.cancel()
                self._outstanding.pop(msg_id, None)
        if result[0]:
            self._unreachable.pop(address, None)
        else:
            self._unreachable[address] = time.monotonic()
            if len(self._unreachable) > 10_000:
                self._unreachable.pop(next(iter(self._unreachable)))
        return result

    def _resend(self, msg_id: bytes, datagram: bytes, address: tuple[str, int]) -> None:
        if msg_id in self._outstanding and self.transport is not None:
            self.transport.sendto(datagram, address)

    def forgive(self, nodes: Iterable[Node], marked_before: float) -> bool:
        """Forget that those of `nodes` marked unreachable before the time
        `marked_before` (of `time.monotonic`) failed to answer; whether any
        were."""
        forgiven = False
        for node in nodes:
            address = (node.ip, node.port)
            if self._unreachable.get(address, marked_before) < marked_before:
                del self._unreachable[address]
                forgiven = True
        return forgiven

    def _recently_unreachable(self, address: tuple[str, int]) -> bool:
        failed = self._unreachable.get(address)
        if failed is None:
            return False
        if time.monotonic() - failed >= UNREACHABLE_FOR:
            del self._unreachable[address]
            return False
        # Never cut this node off from everyone: if no contact is left that
        # is not in this state, ask anyway.
        return any(
            (n.ip, n.port) not in self._unreachable for n in self.router.contacts()
        )

    async def _call_node(
        self, node: Node, name: str, *args: Any, force: bool = False
    ) -> Any:
        address = (node.ip, node.port)
        result = await self.call(address, name, self.source_node.id, *args, force=force)
        return self.handle_call_response(result, node)

    async def call_ping(self, node: Node) -> tuple[bool, Any]:
        ok, data = await self._call_node(node, "ping")
        return (ok and _is_node_id(data), data)

    async def call_store(
        self, node: Node, key: bytes, value: bytes
    ) -> StoreReply | None:
        """Ask `node` to store; None when it did not answer sensibly.

        A store is sent even to a node recently found unreachable: it is one
        of the few that should hold the value, and a loaded node is slow,
        not gone (writes do not wait for it long; see `settle`).
        """
        ok, data = await self._call_node(node, "store", key, value, force=True)
        if ok and isinstance(data, list) and len(data) == 2:
            try:
                return Outcome(data[0]), data[1]
            except ValueError:
                pass
        elif ok and data is True:  # a plain kademlia node
            return Outcome.STORED, None
        if ok:
            log.info("garbage store reply from %s", node)
        return None

    async def call_find_node(
        self, node_to_ask: Node, node_to_find: Node
    ) -> tuple[bool, list[NodeTriple] | None]:
        ok, data = await self._call_node(node_to_ask, "find_node", node_to_find.id)
        nodes = _node_list(data) if ok else None
        if ok and nodes is None:
            log.info("garbage find_node reply from %s", node_to_ask)
        return (nodes is not None, nodes)

    async def call_find_value(
        self, node_to_ask: Node, node_to_find: Node
    ) -> tuple[bool, tuple[bytes | None, list[NodeTriple]] | None]:
        """Ask for a value; the result is ``(answered, (value, closer nodes))``."""
        ok, data = await self._call_node(node_to_ask, "find_value", node_to_find.id)
        if not ok:
            return (False, None)
        if isinstance(data, dict) and isinstance(data.get("value"), bytes):
            nodes = _node_list(data.get("nodes", []))
            return (True, (data["value"], nodes or []))
        nodes = _node_list(data)
        if nodes is None:
            log.info("garbage find_value reply from %s", node_to_ask)
            return (False, None)
        return (True, (None, nodes))

    def handle_call_response(self, result: Any, node: Node) -> Any:
        if not result[0]:
            log.debug("no response from %s, removing it from the routing table", node)
            self.router.remove_contact(node)
            return result
        self.welcome_if_new(node)
        return result


def _pack(value: Any) -> bytes:
    """msgpack, as rpcudp writes it (with `umsgpack`), but 20x faster."""
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)


def _is_node_id(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == _ID_SIZE


def _node_id(value: object) -> bytes:
    if not _is_node_id(value):
        raise TypeError("node ids and keys are 20 bytes")
    assert isinstance(value, bytes)
    return value


def _node_list(data: object) -> list[NodeTriple] | None:
    """The node triples in `data`, or None if it is not a valid node list."""
    if not isinstance(data, list) or len(data) > 64:
        return None
    nodes = []
    for item in data:
        if not (isinstance(item, list | tuple) and len(item) == 3):
            return None
        node_id, ip, port = item
        if not (_is_node_id(node_id) and isinstance(ip, str) and _is_port(port)):
            return None
        if not _is_ip(ip):
            return None
        nodes.append((node_id, ip, port))
    return nodes


@functools.lru_cache(maxsize=4096)
def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_port(value: object) -> bool:
    return type(value) is int and 0 < value < 65536
