"""Hostile DHT participants, speaking rpcudp datagrams directly.

* `LyingNode`: a DHT node with an id of its choosing that joins the network
  (answers pings, so honest nodes take it in) and lies in its answers as told:
  forged ``stale`` store replies, invented closer nodes, a chosen value.
* `RawClient`: sends any request to any node, as our nodes do (with the
  address token the node gave it) or as a plain kademlia node does, and
  counts the bytes that come back.
* `Sink`: UDP sockets that never answer and count what they receive (the
  addresses a liar invents, or the victim of a reflection).

Both speak the two versions of the protocol: the one of this release
(requests carry a token or padding, answers are maps) and the one before it
(kademlia's shapes), so `benchmarks/attacks.py` can replay an attack against
an older release too.
"""

from __future__ import annotations

import asyncio
import collections
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack

REQUEST, RESPONSE = b"\x00", b"\x01"

Address = tuple[str, int]
Answerer = Callable[[str, list[Any], Address], Any]


def pack(value: object) -> bytes:
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False)


def near(key: bytes, distance: int = 1) -> bytes:
    """A node id at XOR `distance` from `key`."""
    return (int.from_bytes(key) ^ distance).to_bytes(20, "big")


class _Endpoint(asyncio.DatagramProtocol):
    """A UDP socket that counts what it receives and hands it on."""

    def __init__(self, on_datagram: Callable[[bytes, Address], None]) -> None:
        self.on_datagram = on_datagram
        self.transport: asyncio.DatagramTransport | None = None
        self.received = 0  # datagrams
        self.received_bytes = 0
        self.sent_bytes = 0
        self.senders: collections.Counter[Address] = collections.Counter()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a datagram one

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.received += 1
        self.received_bytes += len(data)
        self.senders[addr] += 1
        self.on_datagram(data, addr)

    def send(self, data: bytes, addr: Address) -> None:
        assert self.transport is not None
        self.sent_bytes += len(data)
        self.transport.sendto(data, addr)


async def _open(on_datagram: Callable[[bytes, Address], None], host: str) -> _Endpoint:
    loop = asyncio.get_running_loop()
    _, endpoint = await loop.create_datagram_endpoint(
        lambda: _Endpoint(on_datagram), local_addr=(host, 0)
    )
    return endpoint


class RawClient:
    """Sends requests from one UDP socket, and waits for their answers.

    It asks the way our nodes do (a token, once a node gave one, else
    padding), or, with `plain`, as a kademlia node of the older shapes.
    """

    def __init__(self, endpoint: _Endpoint, node_id: bytes) -> None:
        self._endpoint = endpoint
        endpoint.on_datagram = self._datagram
        self.node_id = node_id
        self._waiting: dict[bytes, asyncio.Future[Any]] = {}
        self.tokens: dict[Address, bytes] = {}
        self.plain: set[Address] = set()  # nodes that speak only the old shapes

    @classmethod
    async def open(
        cls, host: str = "127.0.0.1", node_id: bytes | None = None
    ) -> RawClient:
        endpoint = await _open(lambda *_: None, host)
        return cls(endpoint, node_id or os.urandom(20))

    @property
    def address(self) -> Address:
        assert self._endpoint.transport is not None
        host, port = self._endpoint.transport.get_extra_info("sockname")[:2]
        return (host, port)

    @property
    def endpoint(self) -> _Endpoint:
        return self._endpoint

    def _datagram(self, data: bytes, addr: Address) -> None:
        if data[:1] != RESPONSE:
            return
        future = self._waiting.pop(data[1:21], None)
        if future is not None and not future.done():
            try:
                future.set_result(unpack(data[21:]))
            except Exception as exc:  # garbage: no answer
                future.set_exception(exc)

    def send(self, addr: Address, name: str, args: list[Any]) -> bytes:
        """Send one request without waiting; returns its message id."""
        msg_id = os.urandom(20)
        self._endpoint.send(REQUEST + msg_id + pack([name, args]), addr)
        return msg_id

    async def request(
        self,
        addr: Address,
        name: str,
        *args: Any,
        within: float = 2.0,
        extra: bytes | None = None,
    ) -> Any:
        """Ask `name` with `args` (after our node id); the unpacked answer,
        or None. In the current protocol a token (or padding) is added,
        unless `extra` is given."""
        full = [self.node_id, *args]
        if addr not in self.plain:
            if extra is None:
                extra = self.tokens.get(addr, bytes(16))
            full.append(extra)
        msg_id = os.urandom(20)
        future = asyncio.get_running_loop().create_future()
        self._waiting[msg_id] = future
        self._endpoint.send(REQUEST + msg_id + pack([name, full]), addr)
        try:
            async with asyncio.timeout(within):
                answer = await future
        except (TimeoutError, ValueError):
            return None
        finally:
            self._waiting.pop(msg_id, None)
        if isinstance(answer, dict) and isinstance(answer.get("token"), bytes):
            self.tokens[addr] = answer["token"]
        return answer

    async def greet(self, addr: Address) -> bool:
        """Ping `addr` to learn which protocol it speaks (and get a token);
        whether it answered at all."""
        if await self.request(addr, "ping", within=1.0) is not None:
            return True
        self.plain.add(addr)
        return await self.request(addr, "ping", within=1.0) is not None

    async def store(self, addr: Address, key: bytes, raw: bytes) -> Any:
        """Store `raw` under `key` at `addr` (greeting it first if need be)."""
        if addr not in self.tokens and addr not in self.plain:
            await self.greet(addr)
        return await self.request(addr, "store", key, raw)

    def close(self) -> None:
        if self._endpoint.transport is not None:
            self._endpoint.transport.close()


class LyingNode:
    """A DHT node with the id it chooses, answering as `answer` says.

    `answer(name, args, sender)` returns the result to send for a request
    (already in the shape the sender expects: see `honest`), or None to stay
    silent. By default it answers honestly-looking: its id to pings, no
    nodes to lookups, and ``stored`` to stores.
    """

    def __init__(self, endpoint: _Endpoint, node_id: bytes) -> None:
        self._endpoint = endpoint
        endpoint.on_datagram = self._datagram
        self.node_id = node_id
        self.answer: Answerer = self.honest
        self.requests: collections.Counter[str] = collections.Counter()
        self.client = RawClient(endpoint, node_id)  # its own requests, same socket
        endpoint.on_datagram = self._datagram

    @classmethod
    async def start(cls, node_id: bytes, host: str = "127.0.0.1") -> LyingNode:
        endpoint = await _open(lambda *_: None, host)
        return cls(endpoint, node_id)

    @property
    def address(self) -> Address:
        return self.client.address

    @property
    def endpoint(self) -> _Endpoint:
        return self._endpoint

    async def join(self, nodes: list[Address]) -> None:
        """Make `nodes` take this node into their routing tables: greet each
        (they ping back, and it answers) and look up its own id there."""
        for addr in nodes:
            await self.client.greet(addr)
            await self.client.request(addr, "find_node", self.node_id)

    def _datagram(self, data: bytes, addr: Address) -> None:
        if data[:1] == RESPONSE:
            self.client._datagram(data, addr)
            return
        if data[:1] != REQUEST or len(data) < 22:
            return
        try:
            name, args = unpack(data[21:])
        except Exception:
            return
        self.requests[name] += 1
        result = self.answer(name, list(args), addr)
        if result is not None:
            self._endpoint.send(RESPONSE + data[1:21] + pack(result), addr)

    def honest(self, name: str, args: list[Any], sender: Address) -> Any:
        """An answer of the right shape saying nothing harmful."""
        return self.shaped(name, args, nodes=[], outcome="stored")

    def shaped(self, name: str, args: list[Any], **fields: Any) -> Any:
        """An answer to `name` of the shape the sender expects (a map with our
        id and a token for the current protocol: `args` then has one more
        argument than kademlia's), holding `fields`."""
        current = len(args) > {
            "ping": 1,
            "store": 3,
            "find_node": 2,
            "find_value": 2,
        }.get(name, 0)
        if not current:
            if name == "ping":
                return self.node_id
            if name == "store":
                return [fields.get("outcome", "stored"), fields.get("detail")]
            if "value" in fields:
                return {"value": fields["value"]}
            return fields.get("nodes", [])
        answer: dict[str, Any] = {"id": self.node_id, "token": b"\x00" * 8}
        if name == "store":
            answer["outcome"] = fields.get("outcome", "stored")
            if "held" in fields:
                answer["held"] = fields["held"]
        elif name.startswith("find"):
            answer["nodes"] = fields.get("nodes", [])
            if "value" in fields:
                answer["value"] = fields["value"]
        return answer

    def close(self) -> None:
        if self._endpoint.transport is not None:
            self._endpoint.transport.close()


class Sink:
    """UDP sockets that never answer, counting the datagrams they get."""

    def __init__(self, endpoints: list[_Endpoint]) -> None:
        self.endpoints = endpoints

    @classmethod
    async def open(cls, count: int, host: str = "127.0.0.1") -> Sink:
        return cls([await _open(lambda *_: None, host) for _ in range(count)])

    @property
    def addresses(self) -> list[Address]:
        out = []
        for endpoint in self.endpoints:
            assert endpoint.transport is not None
            out.append(endpoint.transport.get_extra_info("sockname")[:2])
        return out

    @property
    def received(self) -> int:
        return sum(e.received for e in self.endpoints)

    @property
    def received_bytes(self) -> int:
        return sum(e.received_bytes for e in self.endpoints)

    def close(self) -> None:
        for endpoint in self.endpoints:
            if endpoint.transport is not None:
                endpoint.transport.close()


async def quiet(count: Callable[[], int], *, silence: float, within: float) -> None:
    """Wait until `count()` stops growing for `silence` seconds, or `within`
    seconds pass (datagrams may still be on their way: nothing announces
    that a node has done sending)."""
    deadline = time.monotonic() + within
    last = -1
    while (now := count()) != last and time.monotonic() < deadline:
        last = now
        await asyncio.sleep(silence)


async def count_requests(
    node: Any, job: Callable[[], Awaitable[Any]]
) -> tuple[Any, int, float]:
    """Run `job`; its result, the DHT requests `node` (a `DhtRegistry`) sent
    meanwhile, and the seconds it took."""
    protocol = node._started().protocol
    honest = protocol.call
    calls = 0

    async def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return await honest(*args, **kwargs)

    protocol.call = counting
    started = time.perf_counter()
    try:
        return await job(), calls, time.perf_counter() - started
    finally:
        protocol.call = honest


def shard_of(owner: bytes, followers: list[Any]) -> Any:
    """A root shard of `owner`'s followers set holding one entry, validly
    signed, per identity of `followers` (with the longest names: the
    biggest value of its kind), as a `RegistryValue`."""
    import p2ptimeline as pt
    from p2ptimeline._dht.records import RegistryValue, SetShard

    now = pt.HybridTimestamp(physical_ms=int(time.time() * 1000))
    entries = tuple(
        pt.FollowEntry.create(
            follower,
            follower="f" * 32,
            followee="o" * 32,
            followee_key=owner,
            following=True,
            timestamp=now,
        )
        for follower in followers
    )
    shard = SetShard(relation="followers", owner_key=owner, prefix="", entries=entries)
    return RegistryValue(shard=shard)


def ghost_entries(count: int, followee: str, followee_key: bytes) -> list[Any]:
    """`count` follow entries of `followee`, each validly signed by a new key
    of its own under a made-up name nobody registered (``ghost0``, ...): what
    stuffs a followers set."""
    import p2ptimeline as pt

    now = pt.HybridTimestamp(physical_ms=int(time.time() * 1000))
    return [
        pt.FollowEntry.create(
            pt.Identity.generate(),
            follower=f"ghost{i}",
            followee=followee,
            followee_key=followee_key,
            following=True,
            timestamp=now,
        )
        for i in range(count)
    ]
